"""Asynchronous adapter loads without an engine: the scheduler's residency plan (budget,
transient peak, LRU, pins, failures over ranks), the scheduler-side decisions (hit or
asynchronous load, wait for room, refusal), and the worker side (background reads,
finished receives, failures, aborts, the forward-path metric)."""

from __future__ import annotations

import concurrent.futures
import threading
from types import SimpleNamespace

import pytest
import torch

from vllm_deepthink.plugin.connector.residency import (
    Footprint,
    ResidencyPlan,
    budget_error,
    load_footprint,
)

D = {name: name * 64 for name in "abcdef"}  # digests


def test_footprint_counts_the_rank_copy_and_the_read_peak():
    f = load_footprint(prefix_len=10, num_layers=3, total_kv_heads=4, head_dim=8,
                       rank_kv_heads=2, itemsize=2)
    assert f.resident == 2 * 3 * 10 * 8 * 2 * 2        # K and V, rank heads, bf16
    assert f.peak == 2 * (2 * 3 * 10 * 8 * 4 * 4)      # file bytes + tensors, all heads, fp32
    assert budget_error("adapter 'x'", f, f.total) is None
    message = budget_error("adapter 'x'", f, f.total - 1)
    assert "adapter 'x' needs" in message and "--deepthink-resident-gib" in message


def test_plan_counts_peaks_of_running_reads_and_evicts_least_recent_unpinned():
    plan = ResidencyPlan(budget=100)
    small = Footprint(resident=20, peak=30)
    assert plan.start(D["a"], small) == []
    assert plan.is_loading(D["a"]) and not plan.is_resident(D["a"])
    assert plan.used() == 50                       # resident + peak while reading
    assert plan.report(D["a"], 1, 0) is True
    assert plan.used() == 20                       # the peak is gone
    plan.start(D["b"], small)
    plan.report(D["b"], 1, 0)
    plan.start(D["c"], small)                      # 20 + 20 + 50 = 90
    assert not plan.can_start(Footprint(20, 50))   # c's read holds its peak: 50 + 70
    plan.report(D["c"], 1, 0)
    assert plan.resident() == [D["a"], D["b"], D["c"]]
    plan.hit(D["a"])                               # a: most recent, pinned this step
    # 60 + 70 > 100: evict b, then c (a is pinned); 20 + 70 fits.
    assert plan.start(D["d"], Footprint(20, 50)) == [D["b"], D["c"]]
    plan.end_step()
    assert plan.resident() == [D["a"]] and plan.is_loading(D["d"])


def test_plan_waits_for_room_while_reads_or_hits_hold_it():
    plan = ResidencyPlan(budget=100)
    big = Footprint(resident=30, peak=60)
    plan.start(D["a"], big)
    assert not plan.can_start(big)                 # a's read holds 90 bytes
    plan.report(D["a"], 1, 0)
    plan.hit(D["a"])
    assert not plan.can_start(big)                 # a is pinned by this step's hit
    plan.end_step()
    assert plan.can_start(big)                     # a can be evicted now
    assert plan.start(D["b"], big) == [D["a"]]


def test_plan_waits_for_every_rank_and_forgets_a_read_that_failed_on_one():
    plan = ResidencyPlan(budget=100, world_size=2)
    plan.start(D["a"], Footprint(10, 10))
    assert plan.report(D["a"], 1, 0) is None       # one rank of two
    assert plan.is_loading(D["a"])
    assert plan.report(D["a"], 1, 0) is True
    plan.start(D["b"], Footprint(10, 10))
    assert plan.report(D["b"], 1, 1) is False      # both ranks in one step, one failed
    assert not plan.is_loading(D["b"]) and not plan.is_resident(D["b"])
    assert plan.report(D["f"], 1, 0) is None       # unknown digest: ignored


# ---------------------------------------------------------------- scheduler side

vllm = pytest.importorskip("vllm")

from vllm_deepthink.plugin.connector.scheduler import (  # noqa: E402
    DeepThinkWorkerMetadata,
    ModelShape,
    SchedulerSide,
)

SHAPE = ModelShape(num_layers=2, total_kv_heads=2, rank_kv_heads=2, head_dim=4, itemsize=4)
L = 40  # resident 2*2*40*4*2*4 = 5120 bytes, peak 2*(2*2*40*4*2*4) = 10240


def request(rid, digest, prefix_len=L):
    entry = {"name": "ad-" + digest[0], "path": "/adapters/" + digest[0], "digest": digest,
             "prefix_len": prefix_len, "frontend": ""}
    return SimpleNamespace(request_id=rid, kv_transfer_params={"deepthink": entry})


class Blocks:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (self.ids,)


def step_output(scheduled=()):
    return SimpleNamespace(num_scheduled_tokens={r: 1 for r in scheduled},
                           total_num_scheduled_tokens=len(scheduled))


def admit(side, req, local_hit=0, blocks=(0, 1)):
    matched, is_async = side.get_num_new_matched_tokens(req, local_hit)
    if matched is not None:
        side.update_state_after_alloc(req, Blocks(list(blocks)), matched)
    return matched, is_async


def test_a_miss_is_asynchronous_then_a_hit_once_every_rank_read_it():
    side = SchedulerSide(block_size=32, budget=1 << 20, shape=SHAPE, world_size=2)
    assert admit(side, request("r1", D["a"]), local_hit=32) == (8, True)
    assert admit(side, request("r2", D["a"])) == (40, True)    # joins the running read
    meta = side.build_connector_meta(step_output())
    assert [(l.request_id, l.is_async, l.start) for l in meta.loads] == [
        ("r1", True, 32), ("r2", True, 0)]
    assert meta.idle and meta.evict == []
    side.update_connector_output(DeepThinkWorkerMetadata(reads={D["a"]: [1, 0]}))
    assert admit(side, request("r3", D["a"])) == (40, True)    # rank 2 has not reported
    side.build_connector_meta(step_output())
    side.update_connector_output(DeepThinkWorkerMetadata(reads={D["a"]: [1, 0]}))
    assert admit(side, request("r4", D["a"])) == (40, False)   # resident on both: a hit
    meta = side.build_connector_meta(step_output(["r4"]))
    assert [(l.request_id, l.is_async) for l in meta.loads] == [("r4", False)]
    stats = side.take_stats()
    assert stats.data["reads"] == {"ad-a": 1} and stats.data["loads"] == {"ad-a": 4}


def test_a_read_without_room_waits_and_one_that_never_fits_is_refused():
    one = SHAPE.footprint(L)
    side = SchedulerSide(block_size=32, budget=one.total, shape=SHAPE)
    assert admit(side, request("r1", D["a"])) == (40, True)
    assert admit(side, request("r2", D["b"])) == (None, False)  # a's read holds the budget
    side.build_connector_meta(step_output())
    side.update_connector_output(DeepThinkWorkerMetadata(reads={D["a"]: [1, 0]}))
    assert admit(side, request("r2", D["b"])) == (40, True)     # a evicted for b
    meta = side.build_connector_meta(step_output())
    assert meta.evict == [D["a"]]
    huge = request("r3", D["c"], prefix_len=4 * L)
    assert admit(side, huge) == (160, True)
    (load,) = side.build_connector_meta(step_output()).loads
    assert "resident-adapter budget" in load.refused


def test_a_failed_read_is_evicted_everywhere_and_read_again_next_time():
    side = SchedulerSide(block_size=32, budget=1 << 20, shape=SHAPE, world_size=2)
    admit(side, request("r1", D["a"]))
    side.build_connector_meta(step_output())
    side.update_connector_output(DeepThinkWorkerMetadata(reads={D["a"]: [1, 1]}))
    assert admit(side, request("r2", D["a"])) == (40, True)
    assert side.build_connector_meta(step_output()).evict == [D["a"]]


def test_an_aborted_request_keeps_its_asynchronous_load_but_drops_a_hit():
    side = SchedulerSide(block_size=32, budget=1 << 20, shape=SHAPE)
    admit(side, request("r1", D["a"]))
    side.request_finished(request("r1", D["a"]))
    # vLLM frees r1's blocks only once the workers report it: the load must go out.
    assert [l.request_id for l in side.build_connector_meta(step_output()).loads] == ["r1"]
    side.update_connector_output(DeepThinkWorkerMetadata(reads={D["a"]: [1, 0]}))
    admit(side, request("r2", D["a"]))
    side.request_finished(request("r2", D["a"]))
    assert side.build_connector_meta(step_output()).loads == []


def test_worker_metadata_sums_ranks_and_flags_forward_path_loads():
    one = DeepThinkWorkerMetadata(reads={D["a"]: [1, 0]})
    two = DeepThinkWorkerMetadata(reads={D["a"]: [0, 1], D["b"]: [1, 0]},
                                  forward_path_load=True)
    merged = one.aggregate(two)
    assert merged.reads == {D["a"]: [1, 1], D["b"]: [1, 0]} and merged.forward_path_load
    assert one.reads == {D["a"]: [1, 0]}  # inputs unchanged
    side = SchedulerSide(block_size=32, budget=1 << 20, shape=SHAPE)
    side.update_connector_output(merged)
    side.update_connector_output(DeepThinkWorkerMetadata(forward_path_load=True))
    assert side.take_stats().data["forward_path_load_steps"] == 2


# ---------------------------------------------------------------- worker side

from vllm_deepthink.plugin.connector.resident import AdapterLoadError  # noqa: E402
from vllm_deepthink.plugin.connector.scheduler import (  # noqa: E402
    AdapterLoad,
    DeepThinkConnectorMetadata,
)
from vllm_deepthink.plugin.connector.worker import WorkerSide  # noqa: E402


class FakeStore:
    """The resident store's interface; reads block until `gate` opens."""

    pin_memory = False

    def __init__(self):
        self.held, self.reads, self.broken = {}, [], set()
        self.gate = threading.Event()

    def read(self, name, path, digest):
        self.reads.append(digest)
        assert self.gate.wait(10)
        if digest in self.broken:
            raise AdapterLoadError(f"adapter {name!r} is broken")
        return SimpleNamespace(digest=digest, prefix_len=L, name=name)

    def add(self, adapter):
        self.held[adapter.digest] = adapter

    def get(self, digest):
        return self.held.get(digest)

    def evict(self, digest):
        self.held.pop(digest, None)

    def load(self, name, path, digest):
        self.add(self.read(name, path, digest))
        return self.held[digest]


@pytest.fixture
def worker():
    side = WorkerSide.__new__(WorkerSide)
    side._start(FakeStore(), block_size=32)
    side.writes = []
    side._write = lambda context, load, adapter: side.writes.append(
        (load.request_id, adapter.digest))
    yield side
    side.store.gate.set()
    side.shutdown()


def load(rid, digest, is_async=True, start=0, blocks=(7, 8), refused=None):
    return AdapterLoad(request_id=rid, name="ad-" + digest[0], path="/x", digest=digest,
                       start=start, end=L, block_ids=list(blocks), is_async=is_async,
                       refused=refused)


def run_step(side, loads=(), evict=(), idle=False, finished=()):
    side.start_load(DeepThinkConnectorMetadata(loads=list(loads), evict=list(evict),
                                               idle=idle), None)
    return (side.take_finished_recving(set(finished)), side.take_failed_block_ids(),
            side.take_worker_meta())


def wait_for_reads(side):
    concurrent.futures.wait(list(side._reads.values()), timeout=10)


def test_a_miss_is_read_in_the_background_and_written_in_a_later_step(worker):
    assert run_step(worker, [load("r1", D["a"])]) == (set(), set(), None)
    assert worker.writes == [] and worker.store.reads == [D["a"]]
    # Steps go on while the read runs; the request is not reported.
    assert run_step(worker, [load("r2", D["a"])]) == (set(), set(), None)
    worker.store.gate.set()
    wait_for_reads(worker)
    done, failed, meta = run_step(worker)
    assert done == {"r1", "r2"} and failed == set()
    assert worker.writes == [("r1", D["a"]), ("r2", D["a"])]
    assert meta.reads == {D["a"]: [1, 0]} and not meta.forward_path_load
    assert worker.store.reads == [D["a"]]  # one read for both requests
    # Now resident: a hit is written during its step, with no read.
    assert run_step(worker, [load("r3", D["a"], is_async=False, start=32)]) == (
        set(), set(), None)
    assert worker.writes[-1] == ("r3", D["a"]) and worker.store.reads == [D["a"]]


def test_an_idle_step_waits_briefly_for_a_running_read(worker):
    run_step(worker, [load("r1", D["a"])])
    threading.Timer(0.005, worker.store.gate.set).start()
    for _ in range(200):  # idle steps until the read ends (each waits up to 20 ms)
        done, _, meta = run_step(worker, idle=True)
        if done:
            break
    assert done == {"r1"} and meta.reads == {D["a"]: [1, 0]}


def test_a_failed_read_fails_its_requests_and_reports_the_read(worker):
    worker.store.broken.add(D["b"])
    worker.store.gate.set()
    run_step(worker, [load("r1", D["b"], blocks=(3, 4)), load("r2", D["b"], start=32,
                                                              blocks=(5, 6))])
    wait_for_reads(worker)
    done, failed, meta = run_step(worker)
    assert done == {"r1", "r2"}          # released from WAITING_FOR_REMOTE_KVS ...
    assert failed == {3, 4, 6}           # ... and failed by their loaded blocks
    assert meta.reads == {D["b"]: [0, 1]} and worker.writes == []


def test_a_refused_load_fails_at_once_without_reading(worker):
    done, failed, _ = run_step(worker, [load("r1", D["c"], refused="too large")])
    assert done == {"r1"} and failed == {7, 8} and worker.store.reads == []


def test_an_aborted_request_is_released_once_and_never_written(worker):
    run_step(worker, [load("r1", D["a"]), load("r2", D["a"])])
    done, _, _ = run_step(worker, finished={"r1"})
    assert done == {"r1"}
    worker.store.gate.set()
    wait_for_reads(worker)
    done, _, meta = run_step(worker, finished={"r1"})
    assert done == {"r2"} and worker.writes == [("r2", D["a"])]
    assert meta.reads == {D["a"]: [1, 0]}  # the read still ends and is reported


def test_evictions_come_after_the_steps_hits_and_before_its_reads(worker):
    worker.store.gate.set()
    worker.store.add(SimpleNamespace(digest=D["a"], prefix_len=L, name="ad-a"))
    run_step(worker, [load("hit", D["a"], is_async=False), load("miss", D["a"])],
             evict=[D["a"]])
    assert worker.writes == [("hit", D["a"])]      # the hit was written first
    assert worker.store.reads == [D["a"]]          # the miss reads it again


def test_a_hit_without_its_adapter_is_read_on_the_forward_path_and_counted(worker):
    worker.store.gate.set()
    done, failed, meta = run_step(worker, [load("r1", D["d"], is_async=False)])
    assert worker.writes == [("r1", D["d"])] and meta.forward_path_load
    assert run_step(worker) == (set(), set(), None)
