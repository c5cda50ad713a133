"""The DeepThink KV connector: vLLM's KV-connector interface over the two sides.

vLLM builds one instance per role: the scheduler's delegates to `SchedulerSide`
(scheduler.py: which adapter positions to load, a hit or an asynchronous load), each
worker's to `WorkerSide` (worker.py: background reads, writes into the paged cache).
Stats: stats.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from vllm_deepthink.plugin import protocol
from vllm_deepthink.plugin.connector import pins
from vllm_deepthink.plugin.connector.scheduler import (
    DeepThinkConnectorMetadata,
    DeepThinkWorkerMetadata,
    ModelShape,
    SchedulerSide,
)
from vllm_deepthink.plugin.connector.stats import (DeepThinkConnectorStats, DeepThinkPromMetrics,
                                                   cost_clock_ns)
from vllm_deepthink.plugin.connector.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class DeepThinkConnector(KVConnectorBase_V1):
    """Loads adapter K/V (L prefix positions) into the paged KV cache."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        protocol.check_parallelism(vllm_config.parallel_config)  # refused at engine start
        block_size = vllm_config.cache_config.block_size
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        if len(groups) > 1:
            raise ValueError(
                f"vllm-deepthink supports models whose KV cache forms one group; this "
                f"engine has {len(groups)} (hybrid attention with the hybrid KV cache "
                f"manager). Start the engine with disable_hybrid_kv_cache_manager=True.")
        policy = self._kv_transfer_config.kv_load_failure_policy
        if policy != "fail":
            raise ValueError(
                f"kv_load_failure_policy={policy!r} would recompute a failed adapter load "
                f"from its placeholder tokens and return wrong output; vllm-deepthink "
                f"needs kv_load_failure_policy='fail'.")
        resident_gib = self._kv_transfer_config.kv_connector_extra_config.get(
            protocol.EXTRA_CONFIG_RESIDENT_GIB)
        self._scheduler = (
            SchedulerSide(block_size, protocol.resident_budget_bytes(resident_gib),
                          ModelShape.of(vllm_config), vllm_config.parallel_config.world_size)
            if role == KVConnectorRole.SCHEDULER else None)
        if self._scheduler is not None:
            self._scheduler.pins_pending = set(
                protocol.pinned_names(self._kv_transfer_config.kv_connector_extra_config))
        self._worker = (WorkerSide(vllm_config, block_size, resident_gib)
                        if role == KVConnectorRole.WORKER else None)

    # ---------------------------------------------------------------- worker side

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        start = cost_clock_ns()
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, DeepThinkConnectorMetadata)
        self._worker.start_load(metadata, forward_context)
        self._worker.costs.since("worker", start, steps=1)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(no sends, the requests whose asynchronous load ended on this worker)."""
        if self._worker is None:
            return None, None
        return None, self._worker.take_finished_recving(finished_req_ids) or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_block_ids() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> DeepThinkWorkerMetadata | None:
        return self._worker.take_worker_meta() if self._worker is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    def get_handshake_metadata(self) -> pins.PinnedSet | None:
        """The adapters this worker pinned at engine start (None without pins)."""
        if self._worker is None or not self._worker.pinned.adapters:
            return None
        return self._worker.pinned

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        """The pinned sets every worker read at engine start -> the scheduler's plan."""
        if self._scheduler is None:
            return
        for name, (digest, prefix_len) in pins.agreed_pins(metadata).items():
            self._scheduler.pin(name, digest, prefix_len)

    # ------------------------------------------------------------- scheduler side

    # Each scheduler-side call is timed into the side's costs (stats.py).

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        start = cost_clock_ns()
        result = self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        self._scheduler.costs.since("scheduler", start)
        return result

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        start = cost_clock_ns()
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)
        self._scheduler.costs.since("scheduler", start)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        start = cost_clock_ns()
        metadata = self._scheduler.build_connector_meta(scheduler_output)
        self._scheduler.costs.since("scheduler", start, steps=1)
        return metadata

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        start = cost_clock_ns()
        self._scheduler.update_connector_output(connector_output.kv_connector_worker_meta)
        self._scheduler.costs.since("scheduler", start)

    def get_kv_connector_stats(self) -> DeepThinkConnectorStats | None:
        """Loads scheduled since the last call (scheduler side; workers report none)."""
        return self._scheduler.take_stats() if self._scheduler is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> DeepThinkConnectorStats:
        return DeepThinkConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames,
                           per_engine_labelvalues) -> DeepThinkPromMetrics:
        kv_config = getattr(vllm_config, "kv_transfer_config", None)
        extra = kv_config.kv_connector_extra_config if kv_config is not None else {}
        pinned = pins.footprints(vllm_config, pins.pinned_paths(extra))
        return DeepThinkPromMetrics(vllm_config, metric_types, labelnames,
                                    per_engine_labelvalues,
                                    pinned={n: f.resident for n, f in pinned.items()})

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        start = cost_clock_ns()
        self._scheduler.request_finished(request)
        self._scheduler.costs.since("scheduler", start)
        return False, None

