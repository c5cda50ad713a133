"""Adapters resident on one worker: an LRU keyed by weights digest, bounded in bytes.

A worker reads an adapter from disk the first time a request needs it (verifying
its weights digest), keeps this rank's KV heads in the cache dtype, token-major
(the layout `do_kv_cache_update` takes), and drops the least recently used beyond
its budget; a dropped adapter is read again when a request needs it.

Resident adapters live in host memory, never on the accelerator: vLLM sizes the KV
cache from the device memory left after the model (gpu_memory_utilization), and
resident copies outside that budget would make it run out. On a GPU the host copies are
pinned (page-locked) when the platform allows it, and a load copies only the rows it
writes ([start, end) of each layer, a few MB) to the device, asynchronously, right
before `do_kv_cache_update` (worker.py). The budget (`--deepthink-resident-gib`,
`engine_args(resident_gib=...)`, default 4 GiB) is host memory per worker.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from vllm_deepthink.format import DeepThinkAdapter
from vllm_deepthink.plugin.connector import kv_layout


class AdapterLoadError(RuntimeError):
    """A worker could not place an adapter into the KV cache."""


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


def pin_memory_for(platform) -> bool:
    """Whether resident copies are pinned for `platform` (vllm.platforms.current_platform):
    on an accelerator whose platform allows pinned memory; never on the CPU backend,
    whose KV cache is host memory already."""
    return platform.device_type != "cpu" and bool(platform.is_pin_memory_available())


class ResidentAdapters:
    """Adapters resident on one worker, keyed by weights digest, least recently used
    dropped beyond `max_bytes` (the newest always stays). Thread-safe.

    Tensors are host (CPU) memory, pinned when `pin_memory` (see pin_memory_for)."""

    def __init__(self, dtype: torch.dtype, tp_size: int, tp_rank: int,
                 max_bytes: int | None = None, pin_memory: bool = False):
        self.dtype = dtype
        self.pin_memory = pin_memory
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
            rank_kv = kv_layout.to_cache_dtype(rank_kv, self.dtype, what)
            return rank_kv.pin_memory() if self.pin_memory else rank_kv

        try:
            resident = ResidentAdapter(name=name, digest=adapter.digest,
                                       prefix_len=adapter.prefix_len,
                                       keys=[place(k) for k in adapter.keys],
                                       values=[place(v) for v in adapter.values])
        except (ValueError, RuntimeError) as exc:  # e.g. values overflow the cache dtype
            raise AdapterLoadError(f"adapter {name!r} at {path}: {exc}") from exc
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
