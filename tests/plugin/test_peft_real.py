"""Imported PEFT adapters on the real default models through `vllm.LLM`, against
PeftModel: SmolLM2-135M (Llama, GQA 9/3, a tokenizer that adds no BOS) and Gemma 3 270M
(one KV head of 256, sliding-window layers, a tokenizer that adds BOS)."""

from __future__ import annotations

import pytest

peft = pytest.importorskip("peft")

from tests.helpers.engines import (  # noqa: E402
    assert_parity,
    parity_params,
    shutdown,
    start_engine,
)
from tests.helpers.references import hf_reference, max_abs_diff  # noqa: E402
from tests.helpers.peft_adapters import (load_base, load_reference_model,  # noqa: E402
                                         make_peft_adapter, peft_reference)
from vllm_deepthink.producers.peft import import_peft_adapter, special_prefix_ids  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.engine]

# fp32 on real models: PeftModel and the served prefix split the computation differently
# (the research for this feature saw up to 3.9e-4 on untrained soft prompts in HF).
TOLERANCE = 1e-3
NUM_GREEDY = 8
QUERY = "Review: a charming and often affecting journey .\nSentiment:"
# name -> (PEFT kind, num_virtual_tokens, noise added to the trainable init)
ADAPTERS = {"prefix": ("prefix", 20, 0.0), "prompt-text": ("prompt-text", 8, 0.01),
            "ptuning": ("ptuning", 6, 0.0)}


@pytest.fixture(scope="module", params=["smollm2_dir", "gemma3_dir"])
def served(request, tmp_path_factory):
    from transformers import AutoTokenizer

    model_dir = request.getfixturevalue(request.param)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    root = tmp_path_factory.mktemp("peft-real")
    references, specials = {}, special_prefix_ids(tokenizer)
    for i, (name, (kind, virtual, noise)) in enumerate(ADAPTERS.items()):
        source = make_peft_adapter(model_dir, kind, root / "peft" / name,
                                   num_virtual_tokens=virtual, seed=i, noise=noise)
        import_peft_adapter(source, model_dir).save_pretrained(root / "store" / name)
        pm = load_reference_model(model_dir, source)
        references[name] = lambda ids, pm=pm: peft_reference(pm, specials + ids, len(specials),
                                                             num_greedy=NUM_GREEDY)
    llm = start_engine(model_dir, {n: root / "store" / n for n in ADAPTERS}, max_num_seqs=4)
    try:
        yield request.param, model_dir, tokenizer, references, llm, specials
    finally:
        shutdown(llm)


def test_imported_adapters_match_peft_on_real_models(served):
    label, model_dir, tokenizer, references, llm, specials = served
    assert specials == ([] if label == "smollm2_dir" else [tokenizer.bos_token_id])
    ids = tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    outputs = llm.generate([QUERY] * len(ADAPTERS),
                           [parity_params(n, num_greedy=NUM_GREEDY) for n in ADAPTERS],
                           use_tqdm=False)
    plain = hf_reference(load_base(model_dir), None, specials + ids, num_greedy=0)
    for name, output in zip(ADAPTERS, outputs):
        reference = references[name](ids)
        assert max_abs_diff(plain.prompt_logprobs[len(specials):],
                            reference.prompt_logprobs) > 0.05, name
        assert_parity(output, reference, ids, tol=TOLERANCE, label=f"{label} {name}")
