"""Which adapters the workers hold: the scheduler's plan of the resident stores.

The scheduler is the only place that decides what every worker's resident store
holds, so that the decision "this load is a hit, write it during the step" can never
meet a store that evicted the adapter meanwhile (each worker applies the plan's
evictions in the order the scheduler made them, through the connector metadata):

- an adapter is RESIDENT once every rank reported its read done, and only then are its
  loads synchronous (a hit: a slice copy during the step);
- otherwise its loads are asynchronous: the first one starts a background read on
  every worker (LOADING) and the requests wait, off the forward path, until it ends;
- a read is admitted only when its footprint fits the budget: the resident bytes of
  every RESIDENT and LOADING adapter plus the transient peak of every running read
  (`load_footprint`), after evicting the least recently used RESIDENT adapters not
  pinned by this step's hits. Otherwise the request waits for room;
- a read that failed on any rank is forgotten (and evicted everywhere).

Pure Python (no vLLM, no torch), tested without an engine.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# The largest dtype an adapter file may hold (float32, the format's widest): the read
# keeps the file's bytes and the tensors parsed from them until the rank's copy is made.
MAX_FILE_ITEMSIZE = 4


@dataclass(frozen=True)
class Footprint:
    """Bytes of one adapter on one worker: `resident` once read, `peak` extra while read."""

    resident: int
    peak: int

    @property
    def total(self) -> int:
        return self.resident + self.peak


def load_footprint(prefix_len: int, num_layers: int, total_kv_heads: int, head_dim: int,
                   rank_kv_heads: int, itemsize: int) -> Footprint:
    """The worker memory an adapter of `prefix_len` positions takes.

    resident: this rank's heads in the cache dtype (`itemsize` bytes), keys and values of
    every layer. peak: what a read holds besides it, the whole file (all heads, at most
    MAX_FILE_ITEMSIZE bytes per value) twice (its bytes and the tensors parsed from them).
    """
    values_per_head = 2 * num_layers * prefix_len * head_dim  # keys and values
    return Footprint(resident=values_per_head * rank_kv_heads * itemsize,
                     peak=2 * values_per_head * total_kv_heads * MAX_FILE_ITEMSIZE)


def budget_error(what: str, footprint: Footprint, budget: int) -> str | None:
    """The message refusing an adapter whose load can never fit `budget` bytes, or None."""
    if footprint.total <= budget:
        return None
    need = footprint.total / (1 << 30)
    return (f"{what} needs {footprint.total} bytes of worker memory to load "
            f"({footprint.resident} resident plus a transient peak of {footprint.peak}), "
            f"more than the resident-adapter budget of {budget} bytes. Raise "
            f"--deepthink-resident-gib (engine_args(resident_gib=...)) to at least "
            f"{need:.3g}, or serve a shorter adapter.")


@dataclass
class _Entry:
    footprint: Footprint
    loading: bool
    # Ranks that reported the read ended: (succeeded, failed).
    ok: int = 0
    failed: int = 0


class ResidencyPlan:
    """The scheduler's view of every worker's resident store (all ranks hold the same
    adapters: each rank holds its heads of each). Not thread-safe: the scheduler's."""

    def __init__(self, budget: int, world_size: int = 1):
        self.budget = budget
        self.world_size = world_size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recent first
        self._pinned: set[str] = set()  # hits of the step being scheduled

    # ------------------------------------------------------------------ queries

    def is_resident(self, digest: str) -> bool:
        entry = self._entries.get(digest)
        return entry is not None and not entry.loading

    def is_loading(self, digest: str) -> bool:
        entry = self._entries.get(digest)
        return entry is not None and entry.loading

    def used(self) -> int:
        """Bytes held or reserved: resident copies, plus the peak of running reads."""
        return sum(e.footprint.total if e.loading else e.footprint.resident
                   for e in self._entries.values())

    def resident(self) -> list[str]:
        """RESIDENT digests, least recently used first."""
        return [d for d, e in self._entries.items() if not e.loading]

    def can_start(self, footprint: Footprint) -> bool:
        """Whether a read of this footprint fits once every evictable adapter is gone."""
        evictable = sum(e.footprint.resident for d, e in self._entries.items()
                        if not e.loading and d not in self._pinned)
        return self.used() - evictable + footprint.total <= self.budget

    # ------------------------------------------------------------------ changes

    def hit(self, digest: str) -> None:
        """A synchronous load of a RESIDENT adapter in the step being scheduled: most
        recently used, and never evicted before the step's metadata is built."""
        if digest in self._entries:
            self._entries.move_to_end(digest)
            self._pinned.add(digest)

    def end_step(self) -> None:
        """The step's metadata is built: its hits are written before its evictions."""
        self._pinned.clear()

    def start(self, digest: str, footprint: Footprint) -> list[str]:
        """Start a read of `digest` (can_start must hold); returns the digests to evict,
        least recently used first."""
        evicted = []
        for candidate, entry in list(self._entries.items()):
            if self.used() + footprint.total <= self.budget:
                break
            if not entry.loading and candidate not in self._pinned:
                del self._entries[candidate]
                evicted.append(candidate)
        self._entries[digest] = _Entry(footprint, loading=True)
        return evicted

    def report(self, digest: str, ok: int, failed: int) -> bool | None:
        """Ranks reported the read of `digest` ended (`ok` succeeded, `failed` failed).
        Returns None while some rank has not reported, else whether it is RESIDENT now
        (on False the caller evicts it everywhere: some ranks may hold it)."""
        entry = self._entries.get(digest)
        if entry is None or not entry.loading:
            return None
        entry.ok += ok
        entry.failed += failed
        if entry.ok + entry.failed < self.world_size:
            return None
        if entry.failed:
            del self._entries[digest]
            return False
        entry.loading = False
        self._entries.move_to_end(digest)
        return True
