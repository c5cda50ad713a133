"""Tensor parallel 2 on CPU: each rank writes its own KV heads (tiny Llama, 2 KV
heads, so one per rank) and the result still matches HF."""

from __future__ import annotations

import os

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.engines import QUERIES, assert_parity, parity_params, shutdown, start_engine
from tests.helpers.references import hf_reference
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.plugin.api import connector_stats

pytestmark = pytest.mark.engine

PREFIX_LENS = {"aligned": 64, "unaligned": 45}


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    model_dir = tiny_llama_dir
    model, tokenizer = load_tiny("llama", model_dir)
    assert model.config.num_key_value_heads == 2
    root = tmp_path_factory.mktemp("adapters")
    adapters = {name: noisy_adapter(model, tokenizer, root / name, length, seed=i, offset=i)
                for i, (name, length) in enumerate(PREFIX_LENS.items())}
    return model_dir, model, tokenizer, adapters, {n: root / n for n in adapters}


@pytest.fixture(scope="module")
def llm(setup):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("tensor parallel 2 needs two GPUs")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    model_dir, _, _, _, paths = setup
    llm = start_engine(model_dir, paths, tensor_parallel_size=2,
                       distributed_executor_backend="mp", disable_log_stats=False)
    yield llm
    shutdown(llm)


def test_tensor_parallel_parity(setup, llm):
    _, model, tokenizer, adapters, _ = setup
    requests = [("aligned", QUERIES[0]), ("unaligned", QUERIES[1]), ("unaligned", QUERIES[3])]
    outputs = llm.generate([q for _, q in requests], [parity_params(n) for n, _ in requests],
                           use_tqdm=False)
    for (name, query), output in zip(requests, outputs):
        ids = tokenizer.encode(query, add_special_tokens=False)
        assert_parity(output, hf_reference(model, adapters[name], ids), ids,
                      label=f"tp=2 {name}: {query[:20]!r}")


def test_every_rank_reads_before_an_adapter_is_a_hit(setup, llm):
    """The first requests read each adapter once, in the background of both ranks; the
    scheduler counts a read done only when both ranks reported it, after which a
    request is a hit (no read), and no step waited on a read."""
    _, model, tokenizer, adapters, _ = setup
    before = connector_stats(llm)
    (output,) = llm.generate([QUERIES[2]], parity_params("unaligned"), use_tqdm=False)
    ids = tokenizer.encode(QUERIES[2], add_special_tokens=False)
    assert_parity(output, hf_reference(model, adapters["unaligned"], ids), ids,
                  label="tp=2 hit")
    after = connector_stats(llm)
    assert after["adapter_reads"] == before["adapter_reads"] == len(PREFIX_LENS)
    assert after["adapter_loads"] == before["adapter_loads"] + 1
    assert after["forward_path_load_steps"] == 0
