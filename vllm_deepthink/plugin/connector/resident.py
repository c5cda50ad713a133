"""Adapters resident on one worker, keyed by weights digest, bounded in bytes.

A worker reads an adapter from disk (verifying its weights digest) in a background
thread (worker.py), keeps this rank's KV heads in the cache dtype, token-major (the
layout `do_kv_cache_update` takes), and drops an adapter when the scheduler's plan
evicts it (residency.py decides, for every rank alike; this store never evicts on its
own, so a load the scheduler planned as a hit always finds its adapter).

Resident adapters live in host memory, never on the accelerator: vLLM sizes the KV
cache from the device memory left after the model (gpu_memory_utilization), and
resident copies outside that budget would make it run out. On a GPU the host copies are
pinned (page-locked) when the platform allows it, and a load copies only the rows it
writes ([start, end) of each layer, a few MB) to the device, asynchronously, right
before `do_kv_cache_update` (worker.py). The budget (`--deepthink-resident-gib`,
`engine_args(resident_gib=...)`, default 4 GiB) is host memory per worker, counting the
transient peak of a read (residency.load_footprint).

A read that failed is remembered per (path, digest) for `failure_ttl` seconds, or until
the adapter's files change (their latest mtime), so a broken or edited adapter is not
read again for every request that names it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_deepthink.format import DeepThinkAdapter, DeepThinkConfig, load_config
from vllm_deepthink.plugin.connector import kv_layout
from vllm_deepthink.plugin.connector.residency import (MAX_FILE_ITEMSIZE, Footprint, budget_error,
                                                       load_footprint)

# How long a failed read is remembered (unless the adapter's files change).
FAILURE_TTL_SECONDS = 30.0


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


def config_footprint(config: DeepThinkConfig, tp_size: int, tp_rank: int,
                     itemsize: int) -> Footprint:
    """The footprint (residency.load_footprint) of the adapter `config` describes on
    tensor-parallel rank `tp_rank`, its copy held in `itemsize`-byte values."""
    fp = config.fingerprint
    first, last = kv_layout.kv_head_range(fp.num_kv_heads, tp_size, tp_rank)
    return load_footprint(config.prefix_len, fp.num_layers, fp.num_kv_heads, fp.head_dim,
                          last - first, itemsize)


def resident_budget_error(name: str, config: DeepThinkConfig, budget: int,
                          tp_size: int = 1, pinned: int = 0) -> str | None:
    """Why adapter `name` (its DeepThinkConfig) can never be loaded by a worker whose
    resident budget is `budget` bytes, `pinned` of them held by pinned adapters, or None
    when it can: its footprint (residency.load_footprint, the model dtype counted as
    float32, its widest) is more than the room left. What registration checks
    (api.engine_args, the adapter registry) before an adapter is served."""
    return budget_error(f"adapter {name!r} ({config.prefix_len} positions)",
                        config_footprint(config, tp_size, 0, MAX_FILE_ITEMSIZE), budget,
                        pinned)


def files_mtime(location: str | Path) -> float:
    """Latest modification time of the files of an adapter directory (0 if unreadable)."""
    try:
        return max((p.stat().st_mtime for p in Path(location).iterdir()), default=0.0)
    except (OSError, ValueError):
        return 0.0


class ResidentAdapters:
    """Adapters resident on one worker, keyed by weights digest. Thread-safe: reads run
    in a background thread, writes in the worker's.

    Tensors are host (CPU) memory, pinned when `pin_memory` (see pin_memory_for).
    `max_bytes` (None: unbounded) refuses an adapter whose read can never fit it."""

    def __init__(self, dtype: torch.dtype, tp_size: int, tp_rank: int,
                 max_bytes: int | None = None, pin_memory: bool = False,
                 failure_ttl: float = FAILURE_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.max_bytes = max_bytes
        self.failure_ttl = failure_ttl
        self._clock = clock
        self._by_digest: OrderedDict[str, ResidentAdapter] = OrderedDict()
        # (path, digest) -> (forget at, files mtime, message) of failed reads.
        self._failures: dict[tuple[str, str | None], tuple[float, float, str]] = {}
        self._lock = threading.Lock()

    def read(self, name: str, path: str, expected_digest: str | None = None
             ) -> ResidentAdapter:
        """Read the adapter at `path` and make this rank's copy (not yet resident: see
        add). Refuses it if its digest differs, if it cannot fit the budget, or if the
        same read failed lately and its files did not change since."""
        key = (path, expected_digest)
        mtime = files_mtime(path)
        with self._lock:
            failure = self._failures.get(key)
        if failure is not None:
            forget_at, failed_mtime, message = failure
            if self._clock() < forget_at and mtime == failed_mtime:
                raise AdapterLoadError(message)
        try:
            resident = self._read(name, path, expected_digest)
        except AdapterLoadError as exc:
            with self._lock:
                self._failures[key] = (self._clock() + self.failure_ttl, mtime, str(exc))
            raise
        with self._lock:
            self._failures.pop(key, None)
        return resident

    def _read(self, name: str, path: str, expected_digest: str | None) -> ResidentAdapter:
        what = f"adapter {name!r}"
        try:
            if self.max_bytes is not None:  # from the config, before the weights are read
                self._check_budget(what, load_config(path))
            adapter = DeepThinkAdapter.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(f"adapter {name!r} at {path}: {exc}") from exc
        if expected_digest is not None and adapter.digest != expected_digest:
            raise AdapterLoadError(
                f"adapter {name!r} at {path} has weights digest {adapter.digest[:12]}..., "
                f"but {expected_digest[:12]}... was registered: the files changed after "
                f"registration. Register the adapter again to serve the new weights.")

        def place(kv: torch.Tensor) -> torch.Tensor:
            rank_kv = kv_layout.rank_heads(kv, self.tp_size, self.tp_rank)
            rank_kv = kv_layout.token_major(rank_kv, 0, rank_kv.shape[1])
            rank_kv = kv_layout.to_cache_dtype(rank_kv, self.dtype, what)
            return rank_kv.pin_memory() if self.pin_memory else rank_kv

        try:
            return ResidentAdapter(name=name, digest=adapter.digest,
                                   prefix_len=adapter.prefix_len,
                                   keys=[place(k) for k in adapter.keys],
                                   values=[place(v) for v in adapter.values])
        except (ValueError, RuntimeError) as exc:  # e.g. values overflow the cache dtype
            raise AdapterLoadError(f"adapter {name!r} at {path}: {exc}") from exc

    def _check_budget(self, what: str, config: DeepThinkConfig) -> None:
        message = budget_error(what, config_footprint(
            config, self.tp_size, self.tp_rank, self.dtype.itemsize), self.max_bytes)
        if message is not None:
            raise ValueError(message)

    def add(self, resident: ResidentAdapter) -> None:
        with self._lock:
            self._by_digest[resident.digest] = resident

    def load(self, name: str, path: str, expected_digest: str | None = None
             ) -> ResidentAdapter:
        """read, then add."""
        resident = self.read(name, path, expected_digest)
        self.add(resident)
        return resident

    def evict(self, digest: str) -> None:
        with self._lock:
            self._by_digest.pop(digest, None)

    def get(self, digest: str) -> ResidentAdapter | None:
        with self._lock:
            return self._by_digest.get(digest)

    def digests(self) -> list[str]:
        with self._lock:
            return list(self._by_digest)

    def nbytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._by_digest.values())
