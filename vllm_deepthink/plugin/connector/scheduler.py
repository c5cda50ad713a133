"""Scheduler side of the DeepThink connector.

An adapter request (our kv_transfer_params entry, set by the frontend and read
through protocol.transfer_entry, which validates it and never raises) has L
placeholder tokens in front of its query. Positions [num_computed_tokens, L) are
reported as external tokens (the local prefix cache may already hold the
adapter's full blocks, shared through the cache salt), and the request's block
ids for them go to the workers as an `AdapterLoad` in the connector metadata.

Whether the load is synchronous depends on the workers' resident stores, whose
content this side decides (residency.py):
- the adapter is resident on every rank: a hit, written during the step that computes
  the query (`get_num_new_matched_tokens` returns `(n, False)`);
- otherwise: an asynchronous load (`(n, True)`): vLLM parks the request in
  WAITING_FOR_REMOTE_KVS with its blocks allocated, the workers read the adapter in a
  background thread while other requests run, write it, and report the request through
  `get_finished`; vLLM schedules it once every rank has. A read that does not fit the
  budget yet waits (`(None, False)`: vLLM asks again next step); one that can never fit
  fails the request.
The workers report each read's end per digest in the worker metadata
(`DeepThinkWorkerMetadata`, summed over ranks), and this side turns it into residency.
Pinned adapters (pins.py) were read by every worker at engine start: the workers report
them once through the connector handshake (`pin`), and they stay RESIDENT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger

from vllm_deepthink.plugin import protocol
from vllm_deepthink.plugin.connector.residency import (
    Footprint,
    ResidencyPlan,
    budget_error,
    load_footprint,
)
from vllm_deepthink.plugin.connector.stats import CostCounters, DeepThinkConnectorStats

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)


@dataclass
class AdapterLoad:
    """Write adapter positions [start, end) of one request into its blocks."""

    request_id: str
    name: str
    path: str
    digest: str
    start: int
    end: int
    # The request's block table up to the block holding position end - 1.
    block_ids: list[int]
    # A hit (written during this step) or an asynchronous load (the request waits).
    is_async: bool = False
    # Why the load must fail without reading (e.g. larger than the budget), or None.
    refused: str | None = None

    def block_ids_in_range(self, block_size: int) -> list[int]:
        return self.block_ids[self.start // block_size:(self.end - 1) // block_size + 1]


@dataclass
class DeepThinkConnectorMetadata(KVConnectorMetadata):
    loads: list[AdapterLoad] = field(default_factory=list)
    # Digests every worker drops, after this step's hits and before its new reads.
    evict: list[str] = field(default_factory=list)
    # No token is computed this step: a worker may wait briefly for a running read.
    idle: bool = False


@dataclass
class DeepThinkWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, one step: reads that ended {digest: [succeeded, failed]}
    (summed over ranks), and whether any rank read an adapter on the forward path."""

    reads: dict[str, list[int]] = field(default_factory=dict)
    forward_path_load: bool = False
    # The workers' own costs since their last report (CostCounters.take()).
    costs: dict[str, dict[str, int]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, DeepThinkWorkerMetadata)
        reads = {digest: list(counts) for digest, counts in self.reads.items()}
        for digest, (ok, failed) in other.reads.items():
            counts = reads.setdefault(digest, [0, 0])
            counts[0] += ok
            counts[1] += failed
        costs = {key: dict(values) for key, values in self.costs.items()}
        for key, values in other.costs.items():
            mine = costs.setdefault(key, {})
            for part, amount in values.items():
                mine[part] = mine.get(part, 0) + amount
        return DeepThinkWorkerMetadata(
            reads=reads, forward_path_load=self.forward_path_load or other.forward_path_load,
            costs=costs)


@dataclass(frozen=True)
class ModelShape:
    """What an adapter's worker footprint depends on besides its length."""

    num_layers: int
    total_kv_heads: int
    rank_kv_heads: int
    head_dim: int
    itemsize: int

    def footprint(self, prefix_len: int) -> Footprint:
        return load_footprint(prefix_len, self.num_layers, self.total_kv_heads,
                              self.head_dim, self.rank_kv_heads, self.itemsize)

    @classmethod
    def of(cls, vllm_config: Any) -> ModelShape:
        """The served model's shape (a VllmConfig), as a worker's footprint needs it."""
        model, parallel = vllm_config.model_config, vllm_config.parallel_config
        return cls(num_layers=model.get_num_layers(parallel),
                   total_kv_heads=model.get_total_num_kv_heads(),
                   rank_kv_heads=model.get_num_kv_heads(parallel),
                   head_dim=model.get_head_size(), itemsize=model.dtype.itemsize)


class SchedulerSide:
    """Decides, per adapter request, which adapter positions the workers write, and
    whether they are a hit or an asynchronous load."""

    def __init__(self, block_size: int, budget: int, shape: ModelShape, world_size: int = 1):
        self.block_size = block_size
        self.shape = shape
        self.plan = ResidencyPlan(budget, world_size)
        self._pending: dict[str, AdapterLoad] = {}
        self._evict: list[str] = []
        self._stats = DeepThinkConnectorStats()
        # This side's own time (connector.py times each call; requests counted here).
        self.costs = CostCounters()
        # Per adapter request: (local prefix-cache hit, whether the load offered is
        # asynchronous), from get_num_new_matched_tokens to update_state_after_alloc.
        self._offers: dict[str, tuple[int, bool]] = {}
        # Pinned names configured but not yet reported by the workers' handshake.
        self.pins_pending: set[str] = set()

    def pin(self, name: str, digest: str, prefix_len: int) -> None:
        """Adapter `name` (weights `digest`) was read by every worker at engine start
        and stays resident; the read is counted like any other."""
        self.plan.pin(digest, self.shape.footprint(prefix_len))
        self._stats.record_read(name)
        self.pins_pending.discard(name)

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        entry = protocol.transfer_entry(request.kv_transfer_params)
        if entry is None:
            return 0, False
        num_external = max(0, entry.prefix_len - num_computed_tokens)
        is_async = num_external > 0 and not self.plan.is_resident(entry.digest)
        if is_async and not self.plan.is_loading(entry.digest):
            footprint = self.shape.footprint(entry.prefix_len)
            if footprint.total <= self.plan.room() and not self.plan.can_start(footprint):
                return None, False  # no room until a running read ends: asked next step
        self._offers[request.request_id] = (num_computed_tokens, is_async)
        return num_external, is_async

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        entry = protocol.transfer_entry(request.kv_transfer_params)
        if entry is None:
            return
        prefix_len = entry.prefix_len
        offer = self._offers.pop(request.request_id, None)
        if offer is not None:  # once per request (not again when its async load ended)
            self.costs.add("scheduler", 0, requests=1)
        local_hit, is_async = offer if offer is not None else (prefix_len, False)
        if num_external_tokens == 0:
            if local_hit < prefix_len:
                logger.error(
                    "vllm-deepthink: the scheduler declined to load adapter %r for request "
                    "%s (local hit %d < L=%d); its placeholder positions are computed as "
                    "tokens and its output is wrong.", entry.name,
                    request.request_id, local_hit, prefix_len)
            return
        (block_ids,) = blocks.get_block_ids()
        last_block = (prefix_len - 1) // self.block_size
        load = AdapterLoad(
            request_id=request.request_id, name=entry.name, path=entry.path,
            digest=entry.digest, start=prefix_len - num_external_tokens,
            end=prefix_len, block_ids=list(block_ids[:last_block + 1]))
        if not is_async:
            self.plan.hit(entry.digest)
        else:
            load.is_async = True
            footprint = self.shape.footprint(prefix_len)
            load.refused = budget_error(f"adapter {entry.name!r}", footprint,
                                        self.plan.budget, self.plan.pinned_bytes())
            if load.refused is None and not self.plan.is_loading(entry.digest):
                self._evict.extend(self.plan.start(entry.digest, footprint))
                self._stats.record_read(entry.name)
        self._pending[request.request_id] = load

    def build_connector_meta(self, scheduler_output: SchedulerOutput
                             ) -> DeepThinkConnectorMetadata:
        if self.pins_pending:  # the handshake never came: a vLLM change, say so once
            logger.error("vllm-deepthink: the workers never reported the pinned adapters "
                         "%s; they are served as unpinned adapters.",
                         sorted(self.pins_pending))
            self.pins_pending.clear()
        scheduled = scheduler_output.num_scheduled_tokens
        # Hits run with this step's tokens; asynchronous loads are sent when allocated
        # (their request computes nothing until the load is done).
        loads = [load for req_id, load in self._pending.items()
                 if load.is_async or req_id in scheduled]
        self._pending.clear()
        for load in loads:
            self._stats.record_load(load.name, load.end - load.start)
        metadata = DeepThinkConnectorMetadata(
            loads=loads, evict=self._evict,
            idle=scheduler_output.total_num_scheduled_tokens == 0)
        self._evict = []
        self.plan.end_step()
        return metadata

    def update_connector_output(self, worker_meta: KVConnectorWorkerMetadata | None) -> None:
        """Residency from the reads that ended on the workers (all ranks, this step)."""
        if not isinstance(worker_meta, DeepThinkWorkerMetadata):
            return
        if worker_meta.forward_path_load:
            self._stats.record_forward_path_load_step()
        self._stats.record_costs(worker_meta.costs)
        for digest, (ok, failed) in worker_meta.reads.items():
            if self.plan.report(digest, ok, failed) is False:
                self._evict.append(digest)  # the ranks whose read succeeded hold it

    def take_stats(self) -> DeepThinkConnectorStats | None:
        """Loads scheduled since the last call, or None when there were none (the costs
        of steps without adapter work wait for the next stats with some)."""
        self._stats.record_costs(self.costs.take())
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, DeepThinkConnectorStats()
        return stats

    def request_finished(self, request: Request) -> None:
        # An asynchronous load still goes out: vLLM frees the request's blocks only
        # once every worker has reported it.
        load = self._pending.get(request.request_id)
        if load is not None and not load.is_async:
            del self._pending[request.request_id]
        self._offers.pop(request.request_id, None)
