"""Worker-side adapter residency: token-major tensors, LRU under a byte budget (no engine)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.adapter_factory import build_adapter
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.plugin.connector.resident import AdapterLoadError, ResidentAdapters
from vllm_deepthink.plugin.protocol import resident_budget_bytes


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("resident")
    model, tokenizer = load_tiny("llama", root / "tiny-llama")
    return {name: (root / name, build_adapter(model, tokenizer, root / name, 40, seed=n, offset=n))
            for n, name in enumerate("abc")}


def store(max_bytes=None, tp_size=1, tp_rank=0):
    return ResidentAdapters(torch.float32, tp_size, tp_rank, max_bytes)


def test_resident_tensors_are_token_major_rank_heads(adapters):
    path, adapter = adapters["a"]
    resident = store(tp_size=2, tp_rank=1).load("a", str(path))
    # adapter: [kv_heads=2, L, D]; rank 1 of 2 holds head 1 as [L, 1, D].
    assert resident.keys[0].shape == (40, 1, 64)
    assert torch.equal(resident.keys[2][:, 0], adapter.keys[2][1])
    assert torch.equal(resident.values[1][:, 0], adapter.values[1][1])
    assert resident.keys[0][5:9].is_contiguous()


def test_least_recently_used_adapter_is_dropped_and_reloaded(adapters):
    one = store().load("a", str(adapters["a"][0])).nbytes
    resident = store(max_bytes=2 * one)
    digests = {name: adapters[name][1].digest for name in "abc"}
    for name in "ab":
        resident.load(name, str(adapters[name][0]))
    resident.get("a", str(adapters["a"][0]), digests["a"])  # a is now the most recent
    resident.load("c", str(adapters["c"][0]))
    assert set(resident.digests()) == {digests["a"], digests["c"]}
    again = resident.get("b", str(adapters["b"][0]), digests["b"])  # read from disk again
    assert torch.equal(again.keys[0][:, 0], adapters["b"][1].keys[0][0])
    assert set(resident.digests()) == {digests["c"], digests["b"]}


def test_a_single_adapter_larger_than_the_budget_stays(adapters):
    resident = store(max_bytes=1)
    resident.load("a", str(adapters["a"][0]))
    assert len(resident.digests()) == 1


def test_reload_refuses_changed_files(adapters):
    path, _ = adapters["a"]
    with pytest.raises(AdapterLoadError, match="files changed after registration"):
        store().get("a", str(path), "0" * 64)


def test_budget_in_gib():
    assert resident_budget_bytes(None) == 4 << 30
    assert resident_budget_bytes(0.5) == resident_budget_bytes("0.5") == 1 << 29
    for bad in (0, -1, "lots", [1]):
        with pytest.raises(ValueError, match="--deepthink-resident-gib"):
            resident_budget_bytes(bad)
