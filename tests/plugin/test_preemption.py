"""A KV cache too small for the batch: requests are preempted, their blocks
freed, and the adapter is loaded again when they resume (tiny Llama)."""

from __future__ import annotations

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.engines import QUERIES, assert_parity, parity_params, shutdown, start_engine
from tests.helpers.references import hf_reference
from tests.helpers.tiny_models import load_tiny

pytestmark = pytest.mark.engine

NUM_GREEDY = 40


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    model_dir = tiny_llama_dir
    model, tokenizer = load_tiny("llama", model_dir)
    root = tmp_path_factory.mktemp("adapters")
    adapters = {"a": noisy_adapter(model, tokenizer, root / "a", 45, seed=2, offset=1),
                "b": noisy_adapter(model, tokenizer, root / "b", 64, seed=1)}
    return model_dir, model, tokenizer, adapters, {n: root / n for n in adapters}


@pytest.fixture(scope="module")
def llm(setup):
    model_dir, _, _, _, paths = setup
    # 12 blocks of 32 tokens for six requests of ~140 tokens each.
    llm = start_engine(model_dir, paths, num_gpu_blocks_override=12, disable_log_stats=False,
                       max_num_batched_tokens=64)
    yield llm
    shutdown(llm)


def preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preempted_requests_reload_their_adapter(setup, llm):
    _, model, tokenizer, adapters, _ = setup
    requests = [("a", QUERIES[0]), ("b", QUERIES[1]), ("a", QUERIES[3]),
                ("b", QUERIES[0]), ("a", QUERIES[1]), ("b", QUERIES[3])]
    before = preemptions(llm)
    outputs = llm.generate([q for _, q in requests],
                           [parity_params(n, num_greedy=NUM_GREEDY) for n, _ in requests],
                           use_tqdm=False)
    assert preemptions(llm) > before, "the test needs the engine to preempt requests"
    for (name, query), output in zip(requests, outputs):
        ids = tokenizer.encode(query, add_special_tokens=False)
        reference = hf_reference(model, adapters[name], ids, num_greedy=NUM_GREEDY)
        assert_parity(output, reference, ids, label=f"preemption {name}: {query[:20]!r}")
