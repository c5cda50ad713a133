"""KV connector that loads Deep-Thinking adapters into vLLM's paged KV cache.

Scheduler side: an adapter request (kv_transfer_params["deepthink"], set by the
frontend) has L placeholder tokens in front of its query. Positions
[num_computed_tokens, L) are reported as external tokens (the local prefix cache
may already hold the adapter's full blocks, shared through the cache salt), and
the request's block ids for them go to the workers in the connector metadata.

Worker side: each worker loads an adapter by path the first time it sees its
weights digest, verifies the digest, keeps its own KV heads resident in the
model dtype and writes positions [start, L) of every layer through the attention
backend's `do_kv_cache_update` (which owns the physical cache layout). Any
failure is reported as failed blocks, so the request fails instead of running
with a missing prefix.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from vllm_deepthink import frontend, kv_layout
from vllm_deepthink.adapter import DeepThinkAdapter
from vllm_deepthink.connector_stats import DeepThinkConnectorStats, DeepThinkPromMetrics

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)


class AdapterLoadError(RuntimeError):
    """A worker could not place an adapter into the KV cache."""


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


def transfer_entry(request: Request) -> dict[str, Any] | None:
    params = request.kv_transfer_params
    entry = params.get(frontend.PARAMS_KEY) if isinstance(params, dict) else None
    return entry if isinstance(entry, dict) else None


@dataclass
class ResidentAdapter:
    """An adapter as one worker writes it: this rank's heads, the model dtype, token
    major (the layout do_kv_cache_update takes), so a load slices without copying."""

    name: str
    digest: str
    prefix_len: int
    keys: list[torch.Tensor]    # per layer [L, rank_kv_heads, head_dim]
    values: list[torch.Tensor]  # per layer [L, rank_kv_heads, head_dim]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


# Worker memory for resident adapters (GiB); least recently used ones beyond it are
# dropped and read from disk again when a request needs them.
RESIDENT_GIB_ENV = "VLLM_DEEPTHINK_RESIDENT_GIB"
DEFAULT_RESIDENT_GIB = 4.0


def resident_budget_bytes(environ=os.environ) -> int:
    text = environ.get(RESIDENT_GIB_ENV, str(DEFAULT_RESIDENT_GIB))
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise ValueError(f"{RESIDENT_GIB_ENV} must be a positive number of GiB (worker memory "
                         f"for resident adapters), found {text!r}")
    return int(gib * (1 << 30))


class ResidentAdapters:
    """Adapters resident on one worker, keyed by weights digest, least recently used
    dropped beyond `max_bytes` (the newest always stays). Thread-safe."""

    def __init__(self, dtype: torch.dtype, device: torch.device, tp_size: int, tp_rank: int,
                 max_bytes: int | None = None):
        self.dtype = dtype
        self.device = device
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.max_bytes = max_bytes
        self._by_digest: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, name: str, path: str, expected_digest: str | None = None) -> ResidentAdapter:
        """Read the adapter at `path`; refuse it if its digest differs."""
        try:
            adapter = DeepThinkAdapter.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(f"adapter {name!r} at {path}: {exc}") from exc
        if expected_digest is not None and adapter.digest != expected_digest:
            raise AdapterLoadError(
                f"adapter {name!r} at {path} has weights digest {adapter.digest[:12]}..., "
                f"but {expected_digest[:12]}... was registered: the files changed after "
                f"registration. Register the adapter again to serve the new weights.")
        what = f"adapter {name!r}"

        def place(kv: torch.Tensor) -> torch.Tensor:
            rank_kv = kv_layout.rank_heads(kv, self.tp_size, self.tp_rank)
            rank_kv = kv_layout.token_major(rank_kv, 0, rank_kv.shape[1])
            return kv_layout.to_cache_dtype(rank_kv, self.dtype, what).to(self.device)

        resident = ResidentAdapter(name=name, digest=adapter.digest,
                                   prefix_len=adapter.prefix_len,
                                   keys=[place(k) for k in adapter.keys],
                                   values=[place(v) for v in adapter.values])
        with self._lock:
            self._by_digest[adapter.digest] = resident
            self._by_digest.move_to_end(adapter.digest)
            self._evict()
        return resident

    def _evict(self) -> None:
        if self.max_bytes is None:
            return
        total = sum(r.nbytes for r in self._by_digest.values())
        while total > self.max_bytes and len(self._by_digest) > 1:
            _, dropped = self._by_digest.popitem(last=False)
            total -= dropped.nbytes

    def get(self, name: str, path: str, digest: str) -> ResidentAdapter:
        with self._lock:
            resident = self._by_digest.get(digest)
            if resident is not None:
                self._by_digest.move_to_end(digest)
        return resident if resident is not None else self.load(name, path, digest)

    def digests(self) -> list[str]:
        with self._lock:
            return list(self._by_digest)


class DeepThinkConnector(KVConnectorBase_V1):
    """Loads adapter K/V (L prefix positions) into the paged KV cache."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
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
        self._start_adapters: dict[str, str] = dict(
            self._kv_transfer_config.kv_connector_extra_config.get(
                frontend.EXTRA_CONFIG_ADAPTERS, {}))
        # Scheduler side.
        self._pending: dict[str, AdapterLoad] = {}
        self._stats = DeepThinkConnectorStats()
        # Local prefix-cache hit last offered for each adapter request.
        self._local_hits: dict[str, int] = {}
        # Worker side.
        self._store: ResidentAdapters | None = None
        self._layers: dict[str, tuple[Any, int]] | None = None
        self._failed_block_ids: set[int] = set()
        if role == KVConnectorRole.WORKER:
            self._init_worker(vllm_config)

    # ---------------------------------------------------------------- worker side

    def _init_worker(self, vllm_config: VllmConfig) -> None:
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )
        from vllm.platforms import current_platform

        cache_dtype = vllm_config.cache_config.cache_dtype
        model_dtype = vllm_config.model_config.dtype
        if cache_dtype not in ("auto", str(model_dtype).removeprefix("torch.")):
            raise ValueError(
                f"kv_cache_dtype={cache_dtype!r}: vllm-deepthink writes adapter K/V in the "
                f"model dtype ({model_dtype}); quantized KV caches need calibrated scales "
                f"it cannot provide. Serve with kv_cache_dtype='auto'.")
        self._store = ResidentAdapters(
            dtype=model_dtype, device=torch.device(current_platform.device_type),
            tp_size=get_tensor_model_parallel_world_size(),
            tp_rank=get_tensor_model_parallel_rank(), max_bytes=resident_budget_bytes())
        for name, path in self._start_adapters.items():
            try:
                self._store.load(name, path)
            except AdapterLoadError as exc:
                # The frontend refuses requests for it with the validation error.
                logger.warning("vllm-deepthink: not preloading adapter %r: %s", name, exc)

    def _attention_layers(self, forward_context: ForwardContext,
                          num_layers: int) -> dict[str, tuple[Any, int]]:
        """Attention layers of the target model by name -> (layer, adapter layer)."""
        if self._layers is not None:
            return self._layers
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.v1.attention.backend import AttentionType

        candidates = {}
        for name, layer in forward_context.no_compile_layers.items():
            if not hasattr(layer, "kv_cache"):
                continue
            if not isinstance(layer, Attention):
                raise AdapterLoadError(
                    f"layer {name} is a {type(layer).__name__}; vllm-deepthink writes "
                    f"per-head K/V and supports standard attention only (not MLA).")
            if layer.attn_type != AttentionType.DECODER:
                continue
            if layer.kv_sharing_target_layer_name is not None:
                continue  # reads another layer's cache, which we write
            candidates[name] = layer
        matched = kv_layout.match_layers(candidates, num_layers)
        self._layers = {name: (candidates[name], index) for name, index in matched.items()}
        return self._layers

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, DeepThinkConnectorMetadata)
        for load in metadata.loads:
            try:
                self._write(forward_context, load)
            except Exception as exc:  # any failure must fail the request, never the engine
                logger.error("vllm-deepthink: loading adapter %r for request %s failed: %s",
                             load.name, load.request_id, exc)
                self._failed_block_ids.update(load.block_ids_in_range(self._block_size))

    def _write(self, forward_context: ForwardContext, load: AdapterLoad) -> None:
        assert self._store is not None
        adapter = self._store.get(load.name, load.path, load.digest)
        if load.end > adapter.prefix_len:
            raise AdapterLoadError(
                f"asked for positions up to {load.end}, the adapter has {adapter.prefix_len}")
        layers = self._attention_layers(forward_context, len(adapter.keys))
        rank_shape = tuple(adapter.keys[0].shape[1:])             # (rank_kv_heads, head_dim)
        for name, (layer, _) in layers.items():
            if rank_shape != (layer.num_kv_heads, layer.head_size):
                raise AdapterLoadError(
                    f"layer {name} holds {layer.num_kv_heads} KV heads of size "
                    f"{layer.head_size} on this rank; the adapter gives {rank_shape}. It "
                    f"was built for another model.")
        slots = kv_layout.slot_mapping(load.block_ids, self._block_size, load.start, load.end)
        for layer, index in layers.values():
            device = layer.kv_cache.device
            if slots.device != device:  # once per load: every layer sits on one device
                slots = slots.to(device)
            # keys/values: [end - start, rank_kv_heads, head_dim], contiguous views
            keys = adapter.keys[index][load.start:load.end]
            values = adapter.values[index][load.start:load.end]
            layer.impl.do_kv_cache_update(layer, keys.to(device), values.to(device),
                                          layer.kv_cache, slots)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    # ------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        entry = transfer_entry(request)
        if entry is None:
            return 0, False
        self._local_hits[request.request_id] = num_computed_tokens
        return max(0, int(entry["prefix_len"]) - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        entry = transfer_entry(request)
        if entry is None:
            return
        prefix_len = int(entry["prefix_len"])
        local_hit = self._local_hits.pop(request.request_id, prefix_len)
        if num_external_tokens == 0:
            if local_hit < prefix_len:
                logger.error(
                    "vllm-deepthink: the scheduler declined to load adapter %r for request "
                    "%s (local hit %d < L=%d); its placeholder positions are computed as "
                    "tokens and its output is wrong.", entry.get("name"),
                    request.request_id, local_hit, prefix_len)
            return
        (block_ids,) = blocks.get_block_ids()
        last_block = (prefix_len - 1) // self._block_size
        self._pending[request.request_id] = AdapterLoad(
            request_id=request.request_id, name=str(entry["name"]), path=str(entry["path"]),
            digest=str(entry["digest"]), start=prefix_len - num_external_tokens,
            end=prefix_len, block_ids=list(block_ids[:last_block + 1]))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        scheduled = scheduler_output.num_scheduled_tokens
        loads = [load for req_id, load in self._pending.items() if req_id in scheduled]
        self._pending.clear()
        for load in loads:
            self._stats.record_load(load.name, load.end - load.start)
        return DeepThinkConnectorMetadata(loads=loads)

    def get_kv_connector_stats(self) -> DeepThinkConnectorStats | None:
        """Loads scheduled since the last call (scheduler side; workers report none)."""
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, DeepThinkConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> DeepThinkConnectorStats:
        return DeepThinkConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames,
                           per_engine_labelvalues) -> DeepThinkPromMetrics:
        return DeepThinkPromMetrics(vllm_config, metric_types, labelnames,
                                    per_engine_labelvalues)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._pending.pop(request.request_id, None)
        self._local_hits.pop(request.request_id, None)
        return False, None

