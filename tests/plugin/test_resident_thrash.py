"""More adapters than the resident budget holds, requested round-robin: every miss is
read off the forward path (vLLM's asynchronous KV loads), no step waits on a disk read
(the forward-path metric stays 0), and every output keeps HF parity (tiny Llama)."""

from __future__ import annotations

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.engines import QUERIES, assert_parity, parity_params, shutdown, start_engine
from tests.helpers.references import hf_reference
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.plugin.api import connector_stats
from vllm_deepthink.plugin.connector.residency import MAX_FILE_ITEMSIZE, load_footprint

pytestmark = pytest.mark.engine

NAMES = "abcd"
PREFIX_LEN = 40  # 32 positions come from the prefix cache, 8 are loaded every time


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    model_dir = tiny_llama_dir
    model, tokenizer = load_tiny("llama", model_dir)
    root = tmp_path_factory.mktemp("adapters")
    adapters = {name: noisy_adapter(model, tokenizer, root / name, PREFIX_LEN, seed=i, offset=i)
                for i, name in enumerate(NAMES)}
    return model_dir, model, tokenizer, adapters, {n: root / n for n in adapters}


@pytest.fixture(scope="module")
def llm(setup):
    model_dir, _, _, adapters, paths = setup
    fp = adapters["a"].config.fingerprint
    one = load_footprint(PREFIX_LEN, fp.num_layers, fp.num_kv_heads, fp.head_dim,
                         fp.num_kv_heads, MAX_FILE_ITEMSIZE)
    # Room for one resident adapter and one read: four adapters thrash.
    budget = one.total + one.resident
    llm = start_engine(model_dir, paths, disable_log_stats=False,
                       resident_gib=budget / (1 << 30))
    yield llm
    shutdown(llm)


def check_parity(setup, requests, outputs, label):
    _, model, tokenizer, adapters, _ = setup
    for (name, query), output in zip(requests, outputs):
        ids = tokenizer.encode(query, add_special_tokens=False)
        assert_parity(output, hf_reference(model, adapters[name], ids), ids,
                      label=f"{label} {name}: {query[:20]!r}")


def test_round_robin_over_more_adapters_than_the_budget(setup, llm):
    requests = [(name, QUERIES[i % len(QUERIES)]) for i in range(2) for name in NAMES]
    before = connector_stats(llm)
    for name, query in requests:  # one at a time: each finds another adapter resident
        (output,) = llm.generate([query], parity_params(name), use_tqdm=False)
        check_parity(setup, [(name, query)], [output], "sequential")
    # All at once: the reads queue for room in the budget while the others run.
    batch = [(name, QUERIES[(i + 1) % len(QUERIES)]) for i in range(2) for name in NAMES]
    outputs = llm.generate([q for _, q in batch], [parity_params(n) for n, _ in batch],
                           use_tqdm=False)
    check_parity(setup, batch, outputs, "batched")
    after = connector_stats(llm)
    reads = after["adapter_reads"] - before["adapter_reads"]
    # The budget holds one adapter: the sequential round-robin reads each one each time.
    assert reads >= len(requests), after
    assert after["forward_path_load_steps"] == 0, after


def test_the_same_adapter_again_is_a_hit_without_a_read(setup, llm):
    (output,) = llm.generate([QUERIES[0]], parity_params("a"), use_tqdm=False)
    before = connector_stats(llm)
    (output,) = llm.generate([QUERIES[1]], parity_params("a"), use_tqdm=False)
    check_parity(setup, [("a", QUERIES[1])], [output], "hit")
    after = connector_stats(llm)
    assert after["adapter_reads"] == before["adapter_reads"]
    assert after["adapter_loads"] == before["adapter_loads"] + 1  # the 8 tail positions
    assert after["forward_path_load_steps"] == 0


def test_the_plugins_own_costs_advance_per_request_and_per_step(setup, llm):
    """connector_stats' plugin_cost: every part of our code counts its time, the adapter
    requests it handled and the steps it ran in (frontend and output: per request; the
    scheduler side and the workers: per step too)."""
    def counts(cost, part):
        entry = cost.get(part, {"microseconds": 0, "requests": 0, "steps": 0})
        return entry["microseconds"], entry["requests"], entry["steps"]

    before = connector_stats(llm)["plugin_cost"]
    requests = [("c", QUERIES[0]), ("d", QUERIES[1])]  # not resident: read, then written
    outputs = llm.generate([q for _, q in requests], [parity_params(n) for n, _ in requests],
                           use_tqdm=False)
    check_parity(setup, requests, outputs, "costs")
    after = connector_stats(llm)["plugin_cost"]
    for part in ("frontend", "output"):
        (s0, r0, _), (s1, r1, _) = counts(before, part), counts(after, part)
        assert s1 > s0 and r1 == r0 + 2, (part, after)
    for part in ("scheduler", "worker"):
        (s0, r0, t0), (s1, r1, t1) = counts(before, part), counts(after, part)
        assert s1 > s0 and r1 >= r0 + 2 and t1 > t0, (part, after)
        assert after[part]["us_per_request"] > 0 and after[part]["us_per_step"] > 0
    # Both were read; a request whose load arrives after its read ended is a plain write.
    (s0, r0, _), (s1, r1, _) = counts(before, "worker_read"), counts(after, "worker_read")
    assert s1 > s0 and r1 > r0, after


def test_requests_aborted_while_their_adapters_are_read(setup, llm):
    """Aborted while waiting for a read (or for room in the budget): vLLM frees their
    blocks once every worker reported them, the reads still end, nothing is written for
    them, and the engine goes on serving the others."""
    engine = llm.llm_engine
    ids = [f"abort-{name}-{i}" for i in range(2) for name in "bcd"]
    for request_id in ids:
        engine.add_request(request_id, QUERIES[2], parity_params(request_id.split("-")[1]))
    engine.add_request("kept", QUERIES[3], parity_params("b"))
    engine.abort_request(ids)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == {"kept"}
    check_parity(setup, [("b", QUERIES[3])], [finished["kept"]], "beside aborted")
    outputs = llm.generate([QUERIES[0]] * 4, [parity_params(n) for n in NAMES],
                           use_tqdm=False)
    check_parity(setup, [(n, QUERIES[0]) for n in NAMES], outputs, "after aborts")
    assert connector_stats(llm)["forward_path_load_steps"] == 0
