"""PEFT prompt-learning adapters made in the tests, and PEFT's own results for them.

`make_peft_adapter(model_dir, kind, out_dir)` creates an adapter of one type on a
model with `get_peft_model` (random init, nudged so no part of it is at a trivial
init) and writes it with `save_pretrained`. `peft_reference` is the ground truth the
imported adapter must reproduce: `PeftModel.from_pretrained` run on one unpadded
sequence, the prompt logprobs of the query and its greedy continuation (each step a
full PeftModel forward of the sequence so far).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.references import Reference

# kind -> what it is
KINDS = {
    "prefix": "PREFIX_TUNING",
    "prefix-proj": "PREFIX_TUNING with prefix_projection",
    "prompt": "PROMPT_TUNING (random init)",
    "prompt-text": "PROMPT_TUNING (TEXT init)",
    "ptuning": "P_TUNING (MLP encoder)",
    "ptuning-lstm": "P_TUNING (LSTM encoder)",
    "multitask": "MULTITASK_PROMPT_TUNING (3 tasks)",
    "cpt": "CPT",
    "cartridge": "CARTRIDGE",
}
METHODS = {"prefix": "peft-prefix-tuning", "prefix-proj": "peft-prefix-tuning",
           "prompt": "peft-prompt-tuning", "prompt-text": "peft-prompt-tuning",
           "ptuning": "peft-p-tuning", "ptuning-lstm": "peft-p-tuning",
           "multitask": "peft-multitask-prompt-tuning", "cpt": "peft-cpt",
           "cartridge": "peft-cartridge"}
CPT_TEXT = "Review: a charming film\nSentiment: positive"


def peft_config(kind: str, model_dir: str | Path, num_virtual_tokens: int = 5):
    import peft
    from peft.tuners.cartridge import CartridgeConfig

    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    if kind == "prefix":
        return peft.PrefixTuningConfig(**common)
    if kind == "prefix-proj":
        return peft.PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=64)
    if kind == "prompt":
        return peft.PromptTuningConfig(**common)
    if kind == "prompt-text":
        return peft.PromptTuningConfig(**common, prompt_tuning_init="TEXT",
                                       prompt_tuning_init_text="Classify the review",
                                       tokenizer_name_or_path=str(model_dir))
    if kind == "ptuning":
        return peft.PromptEncoderConfig(**common, encoder_hidden_size=64)
    if kind == "ptuning-lstm":
        return peft.PromptEncoderConfig(**common, encoder_hidden_size=32,
                                        encoder_reparameterization_type="LSTM")
    if kind == "multitask":
        return peft.MultitaskPromptTuningConfig(**common, num_tasks=3, num_ranks=1)
    if kind == "cpt":
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(model_dir)(CPT_TEXT, add_special_tokens=False)[
            "input_ids"]
        return peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=ids, cpt_mask=[1] * len(ids),
                              cpt_tokens_type_mask=[1] * (len(ids) - 1) + [2])
    if kind == "cartridge":
        return CartridgeConfig(**common)
    raise ValueError(f"unknown PEFT adapter kind {kind!r}; expected one of {sorted(KINDS)}")


def make_peft_adapter(model_dir: str | Path, kind: str, out_dir: str | Path, *,
                      num_virtual_tokens: int = 5, seed: int = 0, noise: float = 0.3) -> Path:
    """Create a PEFT adapter of `kind` on the model in `model_dir` and save it."""
    from peft import get_peft_model

    base = load_base(model_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, peft_config(kind, model_dir, num_virtual_tokens))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Nudge every trainable tensor (CPT's delta and multitask's task factors start
        # at zero / one), so each part of the adapter matters.
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(noise * torch.randn(param.shape, generator=generator))
        if kind == "cpt":
            peft_model.prompt_encoder["default"].delta_embedding.weight.normal_(
                0.0, 0.05, generator=generator)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    return out_dir


def load_base(model_dir: str | Path):
    """A fresh float32 copy of the base model (PEFT wraps the model it is given)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def load_reference_model(model_dir: str | Path, adapter_dir: str | Path):
    """PeftModel.from_pretrained on a fresh copy of the base model (PEFT's own loader)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(model_dir), str(adapter_dir)).eval()


@torch.no_grad()
def peft_reference(peft_model, ids: list[int], num_scored_from: int, *, task_id: int | None = None,
                   num_greedy: int = 8) -> Reference:
    """PeftModel on one unpadded sequence `ids` (e.g. [BOS] + query ids): logprobs of
    ids[j] for j > num_scored_from (the query tokens after the first), and the greedy
    continuation."""
    extra = {} if task_id is None else {"task_ids": torch.tensor([task_id])}
    # Soft-prompt types return logits for the virtual tokens too: keep the last len(ids).
    logits = peft_model(input_ids=torch.tensor([ids]), **extra).logits[0, -len(ids):]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    prompt = [logprobs[j - 1, ids[j]].item() for j in range(num_scored_from + 1, len(ids))]
    sequence = list(ids)
    greedy = []
    for _ in range(num_greedy):
        next_id = int(peft_model(input_ids=torch.tensor([sequence]), **extra).logits[0, -1].argmax())
        greedy.append(next_id)
        sequence.append(next_id)
    return Reference(prompt_logprobs=prompt, greedy_tokens=greedy)
