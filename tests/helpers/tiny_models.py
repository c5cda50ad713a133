"""Tiny random HF models and a byte-level BPE tokenizer, built locally (no hub).

`make_tiny_model(kind, directory)` writes a checkpoint directory (fp32 safetensors,
config, tokenizer) that both transformers and vLLM load. Building is deterministic
and a no-op when the directory is complete.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Review: a charming film\nSentiment: positive",
    "Review: contains no wit , only labored gags\nSentiment: negative",
    "Question: who wrote Hamlet ?\nType: HUM",
    "Question: what is the capital of France ?\nType: LOC",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Premise: the sun was rising. Answer: the grass was cut.",
]

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]


def make_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    from tokenizers import processors

    bos_id = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
        special_tokens=[("<|bos|>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>",
                                   eos_token="<|eos|>", pad_token="<|pad|>",
                                   unk_token="<|unk|>")


def _config(kind: str, vocab_size: int, tokenizer):
    common = dict(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if kind == "llama":
        from transformers import LlamaConfig

        # GQA: 4 query heads share 2 KV heads; head_dim 64 (supported by vLLM's CPU backend).
        return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           max_position_embeddings=2048, rope_theta=10000.0,
                           tie_word_embeddings=False, torch_dtype="float32", **common)
    if kind == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(n_embd=128, n_layer=2, n_head=2, n_positions=1024,
                          torch_dtype="float32", **common)
    raise ValueError(f"unknown tiny model kind {kind!r}; expected 'llama' or 'gpt2'")


def make_tiny_model(kind: str, directory: str | Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file() \
            and (directory / "tokenizer.json").is_file():
        return directory
    tokenizer = make_tokenizer()
    vocab_size = 512  # > tokenizer size; a multiple of 64 as vLLM likes
    config = _config(kind, vocab_size, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    # Larger-than-default init so logits are far from uniform and parity is meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def load_tiny(kind: str, directory: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(kind, directory)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def make_tiny_lora(model_dir: str | Path, directory: str | Path, rank: int = 8,
                   seed: int = 3) -> Path:
    """A PEFT-format LoRA (q/v projections, random non-zero A and B) for the tiny Llama
    at `model_dir`, written directly (adapter_config.json + adapter_model.safetensors)."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoConfig

    directory = Path(directory)
    if (directory / "adapter_model.safetensors").is_file():
        return directory
    config = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    out = {"q_proj": config.num_attention_heads * head_dim,
           "v_proj": config.num_key_value_heads * head_dim}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, out_features in out.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = 0.1 * torch.randn(
                rank, config.hidden_size, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(
                out_features, rank, generator=generator)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(out), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "base_model_name_or_path": str(model_dir)}))
    return directory


def make_tiny_bert(directory: str | Path, seed: int = 0) -> Path:
    """A tiny BERT encoder: an embedding model whose attention is encoder-only, so vLLM's
    KV cache has no group (an attention-free engine for the KV cache manager)."""
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    if (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    tokenizer = make_tokenizer()
    config = BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=256,
                        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                        torch_dtype="float32")
    torch.manual_seed(seed)
    model = BertModel(config)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_llava_config(directory: str | Path) -> Path:
    """A tiny LLaVA (multimodal) checkpoint directory without weights: config, tokenizer
    and processor, enough for vLLM to build its engine configuration (no `architectures`:
    vLLM resolves it to its Transformers multimodal backend without importing LLaVA)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaProcessor,
    )

    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=16),
        text_config=LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                                vocab_size=512),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    LlavaProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=16, image_token="<image>",
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    ).save_pretrained(directory)
    return directory
