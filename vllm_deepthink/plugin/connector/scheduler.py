"""Scheduler side of the DeepThink connector.

An adapter request (our kv_transfer_params entry, set by the frontend and read
through protocol.transfer_entry, which validates it and never raises) has L
placeholder tokens in front of its query. Positions [num_computed_tokens, L) are
reported as external tokens (the local prefix cache may already hold the
adapter's full blocks, shared through the cache salt), and the request's block
ids for them go to the workers as an `AdapterLoad` in the connector metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
from vllm.logger import init_logger

from vllm_deepthink.plugin import protocol
from vllm_deepthink.plugin.connector.stats import DeepThinkConnectorStats

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

    def block_ids_in_range(self, block_size: int) -> list[int]:
        return self.block_ids[self.start // block_size:(self.end - 1) // block_size + 1]


@dataclass
class DeepThinkConnectorMetadata(KVConnectorMetadata):
    loads: list[AdapterLoad] = field(default_factory=list)


class SchedulerSide:
    """Decides, per adapter request, which adapter positions the workers write."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._pending: dict[str, AdapterLoad] = {}
        self._stats = DeepThinkConnectorStats()
        # Local prefix-cache hit last offered for each adapter request.
        self._local_hits: dict[str, int] = {}

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        entry = protocol.transfer_entry(request.kv_transfer_params)
        if entry is None:
            return 0, False
        self._local_hits[request.request_id] = num_computed_tokens
        return max(0, entry.prefix_len - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        entry = protocol.transfer_entry(request.kv_transfer_params)
        if entry is None:
            return
        prefix_len = entry.prefix_len
        local_hit = self._local_hits.pop(request.request_id, prefix_len)
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
        self._pending[request.request_id] = AdapterLoad(
            request_id=request.request_id, name=entry.name, path=entry.path,
            digest=entry.digest, start=prefix_len - num_external_tokens,
            end=prefix_len, block_ids=list(block_ids[:last_block + 1]))

    def build_connector_meta(self, scheduler_output: SchedulerOutput
                             ) -> DeepThinkConnectorMetadata:
        scheduled = scheduler_output.num_scheduled_tokens
        loads = [load for req_id, load in self._pending.items() if req_id in scheduled]
        self._pending.clear()
        for load in loads:
            self._stats.record_load(load.name, load.end - load.start)
        return DeepThinkConnectorMetadata(loads=loads)

    def take_stats(self) -> DeepThinkConnectorStats | None:
        """Loads scheduled since the last call, or None when there were none."""
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, DeepThinkConnectorStats()
        return stats

    def request_finished(self, request: Request) -> None:
        self._pending.pop(request.request_id, None)
        self._local_hits.pop(request.request_id, None)
