"""Worker side of the DeepThink connector: writes adapter K/V into the paged cache.

Each `AdapterLoad` of a step is written through the attention backend's own
`do_kv_cache_update`, which owns the physical cache layout (the CPU backend packs K
differently from FlashAttention; the slot mapping is the same), from the resident
store. The scheduler (scheduler.py, residency.py) decides what the store holds:
- a hit is written during the step, from memory (a slice copy);
- an asynchronous load whose adapter is not resident waits for a background read
  (one per adapter, on a thread of this worker) while the steps go on; the step after
  the read ends writes it and reports the request through `get_finished`, and the
  read's end (per digest) through the worker metadata;
- evictions are applied after the step's hits and before its new reads;
- pinned adapters (pins.py) are read here at engine start, before any step.
Any failure is reported as failed blocks (and the request as finished receiving), so
vLLM fails the request instead of running it with a missing prefix. A hit whose
adapter is missing (never, if the plan holds) is read on the forward path, and the
step is reported (the `forward_path_load_steps` metric).
"""

from __future__ import annotations

import concurrent.futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from vllm_deepthink.plugin.connector import kv_layout
from vllm_deepthink.plugin.connector.pins import PinnedSet, check_pin_set
from vllm_deepthink.plugin.connector.resident import (
    AdapterLoadError,
    ResidentAdapter,
    ResidentAdapters,
    pin_memory_for,
)
from vllm_deepthink.plugin.connector.scheduler import (
    AdapterLoad,
    DeepThinkConnectorMetadata,
    DeepThinkWorkerMetadata,
)
from vllm_deepthink.plugin.connector.stats import CostCounters, cost_clock_ns
from vllm_deepthink.plugin.protocol import resident_budget_bytes

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext

logger = init_logger(__name__)

# How long an idle step (no token computed) waits for a running read to end, instead
# of the engine spinning empty steps; a request that arrives meanwhile waits as long.
IDLE_WAIT_SECONDS = 0.02


class WorkerSide:
    """The resident adapters of one worker, its background reads and the writes of
    each step."""

    def __init__(self, vllm_config: VllmConfig, block_size: int,
                 resident_gib: float | None = None):
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
        # Host memory (pinned on an accelerator): outside the device budget vLLM sizes
        # the KV cache from; a load copies only its rows to the device (_write).
        self._start(ResidentAdapters(
            dtype=model_dtype, tp_size=get_tensor_model_parallel_world_size(),
            tp_rank=get_tensor_model_parallel_rank(),
            max_bytes=resident_budget_bytes(resident_gib),
            pin_memory=pin_memory_for(current_platform)), block_size)
        self.pinned = self.read_pins(check_pin_set(vllm_config))

    def _start(self, store: ResidentAdapters, block_size: int) -> None:
        """The state of a worker over `store` (the tests start one without vLLM)."""
        self.store = store
        self.block_size = block_size
        self._layers: dict[str, tuple[Any, int]] | None = None
        self._reader = ThreadPoolExecutor(max_workers=1,
                                          thread_name_prefix="deepthink-adapter-read")
        self._reads: dict[str, Future] = {}               # digest -> running read
        self._waiting: dict[str, list[AdapterLoad]] = {}  # digest -> loads waiting on it
        self._finished_recving: set[str] = set()
        self._failed_block_ids: set[int] = set()
        self._meta = DeepThinkWorkerMetadata()
        # This worker's own time: steps (timed by connector.py), loads written, reads.
        self.costs = CostCounters()
        self.pinned = PinnedSet()

    def read_pins(self, paths: dict[str, str]) -> PinnedSet:
        """Read the pinned adapters {name: path} into the store, before any step (the
        engine refuses to start when one cannot be read); what the scheduler pins."""
        pinned = PinnedSet()
        for name, path in paths.items():
            try:
                adapter = self.store.load(name, path)
            except AdapterLoadError as exc:
                raise ValueError(f"vllm-deepthink cannot start: pinned {exc}") from exc
            pinned.adapters[name] = (adapter.digest, adapter.prefix_len)
        return pinned

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

    # ------------------------------------------------------------------ a step

    def start_load(self, metadata: DeepThinkConnectorMetadata,
                   forward_context: ForwardContext) -> None:
        self._finish_reads(forward_context, wait=metadata.idle)
        for load in metadata.loads:
            if not load.is_async:
                self._write_hit(forward_context, load)
        for digest in metadata.evict:
            self.store.evict(digest)
        for load in metadata.loads:
            if load.is_async:
                self._start_async(forward_context, load)

    def _write_hit(self, forward_context: ForwardContext, load: AdapterLoad) -> None:
        try:
            adapter = self.store.get(load.digest)
            if adapter is None:
                # The scheduler planned a hit: the store lost it (a bug, not a tenant's
                # doing). Read it here rather than fail the request, and say so.
                self._meta.forward_path_load = True
                logger.warning("vllm-deepthink: adapter %r was not resident for a hit; "
                               "reading it on the forward path", load.name)
                adapter = self.store.load(load.name, load.path, load.digest)
            self._write(forward_context, load, adapter)
        except Exception as exc:  # any failure must fail the request, never the engine
            self._fail(load, exc)

    def _start_async(self, forward_context: ForwardContext, load: AdapterLoad) -> None:
        if load.refused is not None:
            self._fail(load, AdapterLoadError(load.refused))
            self._finished_recving.add(load.request_id)
            return
        adapter = self.store.get(load.digest)
        if adapter is not None:  # its read ended this step
            self._write_async(forward_context, load, adapter)
            return
        self._waiting.setdefault(load.digest, []).append(load)
        if load.digest not in self._reads:
            self._reads[load.digest] = self._reader.submit(
                self._timed_read, load.name, load.path, load.digest)

    def _timed_read(self, name: str, path: str, digest: str) -> tuple[ResidentAdapter, int]:
        """store.read in the reader thread, and its nanoseconds (counted by this thread)."""
        start = cost_clock_ns()
        return self.store.read(name, path, digest), cost_clock_ns() - start

    def _finish_reads(self, forward_context: ForwardContext, wait: bool) -> None:
        """Write (or fail) the loads waiting on every read that ended; report the reads."""
        if wait and self._reads:
            concurrent.futures.wait(list(self._reads.values()), timeout=IDLE_WAIT_SECONDS,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        for digest, future in list(self._reads.items()):
            if not future.done():
                continue
            del self._reads[digest]
            waiting = self._waiting.pop(digest, [])
            counts = self._meta.reads.setdefault(digest, [0, 0])
            exc = future.exception()
            if exc is not None:
                counts[1] += 1
                for load in waiting:
                    self._fail(load, exc)
                    self._finished_recving.add(load.request_id)
                continue
            counts[0] += 1
            adapter, read_ns = future.result()
            self.costs.add("worker_read", read_ns, requests=len(waiting))
            self.store.add(adapter)
            for load in waiting:
                self._write_async(forward_context, load, adapter)

    def _write_async(self, forward_context: ForwardContext, load: AdapterLoad,
                     adapter: ResidentAdapter) -> None:
        try:
            self._write(forward_context, load, adapter)
        except Exception as exc:  # any failure must fail the request, never the engine
            self._fail(load, exc)
        self._finished_recving.add(load.request_id)

    def _fail(self, load: AdapterLoad, exc: BaseException) -> None:
        logger.error("vllm-deepthink: loading adapter %r for request %s failed: %s",
                     load.name, load.request_id, exc)
        self._failed_block_ids.update(load.block_ids_in_range(self.block_size))

    def _write(self, forward_context: ForwardContext, load: AdapterLoad,
               adapter: ResidentAdapter) -> None:
        self.costs.add("worker", 0, requests=1)
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

    # ------------------------------------------------------------- step results

    def take_finished_recving(self, finished_req_ids: set[str]) -> set[str]:
        """Requests whose asynchronous load ended on this worker since the last call
        (written or failed), and those finished (aborted) while waiting on a read: their
        write is dropped, and vLLM frees their blocks once every rank has reported them."""
        for digest, waiting in self._waiting.items():
            aborted = [load for load in waiting if load.request_id in finished_req_ids]
            for load in aborted:
                waiting.remove(load)
                self._finished_recving.add(load.request_id)
        done, self._finished_recving = self._finished_recving, set()
        return done

    def take_failed_block_ids(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def take_worker_meta(self) -> DeepThinkWorkerMetadata | None:
        """This step's report, with the costs so far; None when there is nothing to say
        (the costs of steps without adapter work wait for a step with some)."""
        meta = self._meta
        if not meta.reads and not meta.forward_path_load and not self.costs.requests:
            return None
        meta.costs = self.costs.take()
        self._meta = DeepThinkWorkerMetadata()
        return meta

    def shutdown(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
