"""Worker-side adapter store: token-major tensors, budget refusal, failure memory (no engine)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.plugin.connector import resident as resident_module
from vllm_deepthink.plugin.connector.residency import load_footprint
from vllm_deepthink.plugin.connector.resident import AdapterLoadError, ResidentAdapters
from vllm_deepthink.plugin.protocol import resident_budget_bytes


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resident")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    return {name: (root / name, noisy_adapter(model, tokenizer, root / name, 40, seed=n, offset=n))
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


def test_the_store_holds_what_it_is_given_until_evicted(adapters):
    resident = store()
    digests = {name: adapters[name][1].digest for name in "abc"}
    read = resident.read("a", str(adapters["a"][0]), digests["a"])
    assert resident.digests() == [] and resident.get(digests["a"]) is None  # read only
    resident.add(read)
    resident.load("b", str(adapters["b"][0]), digests["b"])
    assert resident.digests() == [digests["a"], digests["b"]]
    assert resident.nbytes() == 2 * read.nbytes
    resident.evict(digests["a"])
    resident.evict(digests["c"])  # not resident: nothing to do
    assert resident.digests() == [digests["b"]]
    assert torch.equal(resident.get(digests["b"]).keys[0][:, 0], adapters["b"][1].keys[0][0])


def test_an_adapter_whose_read_cannot_fit_the_budget_is_refused(adapters, monkeypatch):
    path, adapter = adapters["a"]
    one = store().read("a", str(path)).nbytes
    # The resident copy alone fits, its read's transient peak does not: refused from the
    # config, before the weights are read.
    def no_read(*args, **kwargs):
        raise AssertionError("the weights were read")

    with monkeypatch.context() as patch:
        patch.setattr(resident_module.DeepThinkAdapter, "from_pretrained", no_read)
        with pytest.raises(AdapterLoadError,
                           match="resident-adapter budget.*--deepthink-resident-gib"):
            store(max_bytes=2 * one).read("a", str(path), adapter.digest)
    footprint = load_footprint(40, adapter.num_layers, 2, 64, 2, 4)
    assert footprint.resident == one
    assert store(max_bytes=footprint.total).read("a", str(path), adapter.digest).nbytes == one


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_failed_read_is_remembered_until_it_expires_or_the_files_change(adapters, tmp_path,
                                                                          monkeypatch):
    path, adapter = adapters["c"]
    clock = Clock()
    resident = ResidentAdapters(torch.float32, 1, 0, failure_ttl=30.0, clock=clock)
    reads = []
    real = resident._read
    monkeypatch.setattr(resident, "_read", lambda *a: reads.append(a) or real(*a))
    wrong = "0" * 64
    for _ in range(3):  # read once, then refused from memory
        with pytest.raises(AdapterLoadError, match="files changed after registration"):
            resident.read("c", str(path), wrong)
    assert len(reads) == 1
    assert resident.read("c", str(path), adapter.digest).digest == adapter.digest  # other key
    clock.now = 31.0  # expired: read again
    with pytest.raises(AdapterLoadError):
        resident.read("c", str(path), wrong)
    assert len(reads) == 3
    # Files changed (a newer mtime): read again at once.
    weights = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 5))
    with pytest.raises(AdapterLoadError):
        resident.read("c", str(path), wrong)
    assert len(reads) == 4


def test_reload_refuses_changed_files(adapters):
    path, _ = adapters["a"]
    with pytest.raises(AdapterLoadError, match="files changed after registration"):
        store().read("a", str(path), "0" * 64)


def test_budget_in_gib():
    assert resident_budget_bytes(None) == 4 << 30
    assert resident_budget_bytes(0.5) == resident_budget_bytes("0.5") == 1 << 29
    for bad in (0, -1, "lots", [1]):
        with pytest.raises(ValueError, match="--deepthink-resident-gib"):
            resident_budget_bytes(bad)


def test_an_adapter_larger_than_the_budget_is_refused_at_registration(adapters):
    pytest.importorskip("vllm")
    import vllm_deepthink

    path, adapter = adapters["a"]
    fp = adapter.config.fingerprint
    need = load_footprint(40, fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.num_kv_heads, 4)
    with pytest.raises(ValueError, match="adapter 'a' .*more than the resident-adapter budget"):
        vllm_deepthink.engine_args(adapters={"a": path}, resident_gib=(need.total - 1) / 2**30)
    kwargs = vllm_deepthink.engine_args(adapters={"a": path}, resident_gib=need.total / 2**30)
    assert kwargs["kv_transfer_config"].kv_connector_extra_config["resident_gib"] > 0
    # With tensor parallel 2 each rank keeps one of the two KV heads: less to hold.
    half = load_footprint(40, fp.num_layers, fp.num_kv_heads, fp.head_dim, 1, 4)
    vllm_deepthink.engine_args(adapters={"a": path}, resident_gib=half.total / 2**30,
                               tensor_parallel_size=2)
