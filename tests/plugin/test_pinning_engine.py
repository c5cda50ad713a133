"""A pinned adapter on a real engine (tiny Llama) whose resident budget holds it and one
read: round-robin over the others evicts them every time, the pinned one is read once
(at engine start) and stays resident, every output keeps HF parity, and the pin shows in
the metrics. The adapters and helpers are test_resident_thrash's."""

from __future__ import annotations

import pytest

from tests.helpers.engines import QUERIES, parity_params, shutdown, start_engine
from tests.plugin.test_resident_thrash import (  # noqa: F401  (setup is a fixture)
    NAMES,
    PREFIX_LEN,
    check_parity,
    setup,
)
from vllm_deepthink.plugin.api import add_adapter, connector_stats, remove_adapter
from vllm_deepthink.plugin.connector.residency import MAX_FILE_ITEMSIZE, load_footprint

pytestmark = pytest.mark.engine

PINNED = "a"


def footprint(setup):
    fp = setup[3][PINNED].config.fingerprint
    return load_footprint(PREFIX_LEN, fp.num_layers, fp.num_kv_heads, fp.head_dim,
                          fp.num_kv_heads, MAX_FILE_ITEMSIZE)  # float32 engine


@pytest.fixture(scope="module")
def llm(setup):
    model_dir, _, _, _, paths = setup
    one = footprint(setup)
    # The pinned copy and room for one read: the smallest budget the pin rule admits.
    llm = start_engine(model_dir, paths, disable_log_stats=False, pin=[PINNED],
                       resident_gib=(one.resident + one.total) / (1 << 30))
    yield llm
    shutdown(llm)


def reads(stats, name):
    return stats["by_adapter"].get(name, {}).get("reads", 0)


def test_the_pinned_adapter_stays_resident_while_round_robin_evicts_the_others(setup, llm):
    requests = [(name, QUERIES[i % len(QUERIES)]) for i in range(2) for name in NAMES]
    for name, query in requests:  # one at a time: every other adapter evicts the last
        (output,) = llm.generate([query], parity_params(name), use_tqdm=False)
        check_parity(setup, [(name, query)], [output], "sequential")
    batch = [(name, QUERIES[(i + 1) % len(QUERIES)]) for i in range(2) for name in NAMES]
    outputs = llm.generate([q for _, q in batch], [parity_params(n) for n, _ in batch],
                           use_tqdm=False)
    check_parity(setup, batch, outputs, "batched")
    stats = connector_stats(llm)
    assert reads(stats, PINNED) == 1, stats  # at engine start, never again
    for name in NAMES:
        if name != PINNED:  # read again after each eviction (sequential: twice at least)
            assert reads(stats, name) >= 2, stats
    assert stats["by_adapter"][PINNED]["loads"] >= 4  # it was served: the tail each time
    assert stats["forward_path_load_steps"] == 0, stats


def test_the_pin_shows_in_the_metrics(setup, llm):
    stats = connector_stats(llm)
    assert stats["pinned_adapters"] == 1
    assert stats["pinned_bytes"] == footprint(setup).resident


def test_a_pinned_adapter_cannot_be_removed_or_replaced(setup, llm):
    paths = setup[4]
    for change in (lambda: remove_adapter(llm, PINNED),
                   lambda: add_adapter(llm, PINNED, paths["b"])):
        with pytest.raises(ValueError, match="is pinned"):
            change()
    (output,) = llm.generate([QUERIES[0]], parity_params(PINNED), use_tqdm=False)
    check_parity(setup, [(PINNED, QUERIES[0])], [output], "still served")
