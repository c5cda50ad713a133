"""Worker side of the DeepThink connector: writes adapter K/V into the paged cache.

For each `AdapterLoad` of a step, the worker takes the adapter from its resident
store (reading it from disk on first use) and writes positions [start, end) of
every layer through the attention backend's own `do_kv_cache_update`, which owns
the physical cache layout (the CPU backend packs K differently from
FlashAttention; the slot mapping is the same). Any failure is reported as failed
blocks, so the request fails instead of running with a missing prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from vllm_deepthink.plugin.connector import kv_layout
from vllm_deepthink.plugin.connector.resident import (
    AdapterLoadError,
    ResidentAdapters,
    pin_memory_for,
)
from vllm_deepthink.plugin.protocol import resident_budget_bytes
from vllm_deepthink.plugin.connector.scheduler import AdapterLoad

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext

logger = init_logger(__name__)


class WorkerSide:
    """The resident adapters of one worker and the writes of each step."""

    def __init__(self, vllm_config: VllmConfig, block_size: int,
                 start_adapters: dict[str, str], resident_gib: float | None = None):
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )
        from vllm.platforms import current_platform

        self.block_size = block_size
        cache_dtype = vllm_config.cache_config.cache_dtype
        model_dtype = vllm_config.model_config.dtype
        if cache_dtype not in ("auto", str(model_dtype).removeprefix("torch.")):
            raise ValueError(
                f"kv_cache_dtype={cache_dtype!r}: vllm-deepthink writes adapter K/V in the "
                f"model dtype ({model_dtype}); quantized KV caches need calibrated scales "
                f"it cannot provide. Serve with kv_cache_dtype='auto'.")
        # Host memory (pinned on an accelerator): outside the device budget vLLM sizes
        # the KV cache from; a load copies only its rows to the device (_write).
        self.store = ResidentAdapters(
            dtype=model_dtype, tp_size=get_tensor_model_parallel_world_size(),
            tp_rank=get_tensor_model_parallel_rank(),
            max_bytes=resident_budget_bytes(resident_gib),
            pin_memory=pin_memory_for(current_platform))
        self._layers: dict[str, tuple[Any, int]] | None = None
        self._failed_block_ids: set[int] = set()
        for name, path in start_adapters.items():
            try:
                self.store.load(name, path)
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

    def start_load(self, loads: list[AdapterLoad], forward_context: ForwardContext) -> None:
        for load in loads:
            try:
                self._write(forward_context, load)
            except Exception as exc:  # any failure must fail the request, never the engine
                logger.error("vllm-deepthink: loading adapter %r for request %s failed: %s",
                             load.name, load.request_id, exc)
                self._failed_block_ids.update(load.block_ids_in_range(self.block_size))

    def _write(self, forward_context: ForwardContext, load: AdapterLoad) -> None:
        adapter = self.store.get(load.name, load.path, load.digest)
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
        slots = kv_layout.slot_mapping(load.block_ids, self.block_size, load.start, load.end)
        for layer, index in layers.values():
            device = layer.kv_cache.device
            if slots.device != device:  # once per load: every layer sits on one device
                slots = slots.to(device)
            # keys/values: [end - start, rank_kv_heads, head_dim], contiguous views of
            # the host copy; only these rows go to the device (async from pinned memory,
            # ordered before the cache write on the same stream).
            keys = adapter.keys[index][load.start:load.end]
            values = adapter.values[index][load.start:load.end]
            layer.impl.do_kv_cache_update(
                layer, keys.to(device, non_blocking=self.store.pin_memory),
                values.to(device, non_blocking=self.store.pin_memory), layer.kv_cache, slots)

    def take_failed_block_ids(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed
