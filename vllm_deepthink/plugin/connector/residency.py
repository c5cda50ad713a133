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
  (`load_footprint`), after evicting the least recently used RESIDENT adapters that are
  neither hits of this step nor pinned. Otherwise the request waits for room;
- a read that failed on any rank is forgotten (and evicted everywhere);
- a PINNED adapter (`--deepthink-pin`, engine configuration) is read by every worker at
  engine start and is RESIDENT for the engine's life: never evicted, its bytes counted
  against the budget, so every read runs in what the pinned set leaves (`room`).
  `pin_set_error` is the rule that admits a pinned set.

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


def budget_error(what: str, footprint: Footprint, budget: int, pinned: int = 0
                 ) -> str | None:
    """The message refusing an adapter whose load can never fit `budget` bytes beside
    `pinned` bytes of pinned adapters, or None."""
    if pinned + footprint.total <= budget:
        return None
    need = (pinned + footprint.total) / (1 << 30)
    room = (f"more than the resident-adapter budget of {budget} bytes" if not pinned else
            f"more than the {budget - pinned} bytes the resident-adapter budget of "
            f"{budget} leaves beside the pinned adapters ({pinned} bytes)")
    return (f"{what} needs {footprint.total} bytes of worker memory to load "
            f"({footprint.resident} resident plus a transient peak of {footprint.peak}), "
            f"{room}. Raise --deepthink-resident-gib (engine_args(resident_gib=...)) to at "
            f"least {need:.3g}" + (", pin fewer adapters," if pinned else "")
            + " or serve a shorter adapter.")


def pin_set_error(pinned: dict[str, Footprint], others: dict[str, Footprint],
                  budget: int) -> str | None:
    """Why a pinned set cannot be held within `budget` bytes, or None when it can.

    The rule: the resident copies of every pinned adapter, plus the largest single read
    the engine still needs, fit the budget. The reads are each pinned adapter's at engine
    start (its transient peak beside the other pinned copies) and, so that the unpinned
    adapters served from start (`others`) can still be read, one read of the largest of
    them (its copy and peak). Unpinned adapters added later are refused, when they
    cannot fit beside the pinned set, with budget_error(pinned=...)."""
    held = sum(f.resident for f in pinned.values())
    reads = {**{name: f.peak for name, f in pinned.items()},
             **{name: f.total for name, f in others.items()}}
    largest = max(reads, key=reads.get, default=None)
    need = held + (reads[largest] if largest is not None else 0)
    if need <= budget:
        return None
    names = ", ".join(sorted(pinned))
    read = (f"the largest read it must leave room for ({largest!r}: {reads[largest]} "
            f"bytes{' of transient peak' if largest in pinned else ', copy and peak'})"
            if largest is not None else "no read")
    return (f"the pinned adapters ({names}) need {held} bytes of worker memory resident, "
            f"plus {read}: {need} bytes, more than the resident-adapter budget of {budget} "
            f"bytes. Raise --deepthink-resident-gib (engine_args(resident_gib=...)) to at "
            f"least {need / (1 << 30):.3g}, or pin fewer adapters (--deepthink-pin, "
            f"engine_args(pin=...)).")


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
        self._step_hits: set[str] = set()  # hits of the step being scheduled
        self._pins: set[str] = set()       # pinned for the engine's life

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

    def is_pinned(self, digest: str) -> bool:
        return digest in self._pins

    def pinned_bytes(self) -> int:
        """Bytes the pinned adapters hold for the engine's life."""
        return sum(self._entries[d].footprint.resident for d in self._pins)

    def room(self) -> int:
        """The most any read can use: the budget less the pinned adapters."""
        return self.budget - self.pinned_bytes()

    def _evictable(self, digest: str, entry: _Entry) -> bool:
        return (not entry.loading and digest not in self._step_hits
                and digest not in self._pins)

    def can_start(self, footprint: Footprint) -> bool:
        """Whether a read of this footprint fits once every evictable adapter is gone."""
        evictable = sum(e.footprint.resident for d, e in self._entries.items()
                        if self._evictable(d, e))
        return self.used() - evictable + footprint.total <= self.budget

    # ------------------------------------------------------------------ changes

    def pin(self, digest: str, footprint: Footprint) -> None:
        """`digest` is RESIDENT on every rank (read at engine start) and never evicted.
        The caller admitted the pinned set (pin_set_error)."""
        self._entries[digest] = _Entry(footprint, loading=False)
        self._pins.add(digest)

    def hit(self, digest: str) -> None:
        """A synchronous load of a RESIDENT adapter in the step being scheduled: most
        recently used, and never evicted before the step's metadata is built."""
        if digest in self._entries:
            self._entries.move_to_end(digest)
            self._step_hits.add(digest)

    def end_step(self) -> None:
        """The step's metadata is built: its hits are written before its evictions."""
        self._step_hits.clear()

    def start(self, digest: str, footprint: Footprint) -> list[str]:
        """Start a read of `digest` (can_start must hold); returns the digests to evict,
        least recently used first."""
        evicted = []
        for candidate, entry in list(self._entries.items()):
            if self.used() + footprint.total <= self.budget:
                break
            if self._evictable(candidate, entry):
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
