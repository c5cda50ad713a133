"""Choosing the iteration T on dev: when to stop a run, and when to leave T=1.

Pure bookkeeping over per-iteration dev results (no model). The protocol
(SelectionPolicy, the defaults are those of `vllm-deepthink build --select-on dev`):

- every run goes to at least `min_iterations` (with momentum 0.01 / 0.9 the K/V have
  closed only a small part of the gap to the new values by iteration 5, so a patience
  that starts at iteration 1 stops before the method acts; results/README.md,
  "Building"); after that, it stops once
  `patience` iterations past both min_iterations and the best so far brought no
  strict improvement; never beyond `max_iterations`;
- a run also stops early when it has collapsed: dev accuracy at least
  `collapse_drop` below its best for `collapse_span` iterations in a row (the typical
  end of a too-strong update: every answer becomes one label);
- the best iteration of a run is its highest dev accuracy, ties going to the
  earliest; over several runs (a search) the best run wins, ties going to the first;
- the guard: T=1 (plain ICL) is left only when the best iteration's dev accuracy
  exceeds T=1's by more than `guard_k` paired standard errors, sqrt(b + c) / n_dev
  with b, c the dev items only one of the two gets right. With k=2 a zero true
  gain passes for a single comparison about 2% of the time; a search compares many
  (run, iteration) points against T=1, so it passes more often than that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vllm_deepthink.tasks import stats


@dataclass(frozen=True)
class SelectionPolicy:
    max_iterations: int = 15
    min_iterations: int = 8
    patience: int | None = 4
    guard_k: float = 2.0
    collapse_drop: float | None = 0.15
    collapse_span: int = 2

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, found {self.max_iterations}")
        if self.min_iterations < 1:
            raise ValueError(f"min_iterations must be >= 1, found {self.min_iterations}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 (or None: no patience stop), found "
                             f"{self.patience}")
        if self.guard_k < 0:
            raise ValueError(f"guard_k must be >= 0, found {self.guard_k}")
        if self.collapse_drop is not None and not 0 < self.collapse_drop <= 1:
            raise ValueError(f"collapse_drop must be in (0, 1] (or None: never), found "
                             f"{self.collapse_drop}")
        if self.collapse_span < 1:
            raise ValueError(f"collapse_span must be >= 1, found {self.collapse_span}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StopRule:
    """Tracks one run: feed it each iteration's dev accuracy (iterations 1, 2, ...);
    `update` returns why the run should stop after this iteration, or None."""

    def __init__(self, policy: SelectionPolicy):
        self.policy = policy
        self.best_iteration: int | None = None
        self.best_acc = -math.inf
        self._collapsed_for = 0
        self._last = 0

    def update(self, iteration: int, acc: float) -> str | None:
        if iteration != self._last + 1:
            raise ValueError(f"iterations must come in order: expected {self._last + 1}, "
                             f"found {iteration}")
        self._last = iteration
        p = self.policy
        if acc > self.best_acc:
            self.best_acc, self.best_iteration = acc, iteration
        if p.collapse_drop is not None and acc <= self.best_acc - p.collapse_drop + 1e-12:
            self._collapsed_for += 1
        else:
            self._collapsed_for = 0
        if iteration >= p.max_iterations:
            return "max_iterations"
        if self._collapsed_for >= p.collapse_span:
            return (f"collapsed: dev accuracy >= {p.collapse_drop} below the best "
                    f"({self.best_acc:.4f} at iteration {self.best_iteration}) for "
                    f"{p.collapse_span} iterations")
        if p.patience is not None:
            stale = iteration - max(self.best_iteration, p.min_iterations)
            if stale >= p.patience:
                return (f"patience: no better dev accuracy in the {p.patience} iterations "
                        f"after iteration {max(self.best_iteration, p.min_iterations)}")
        return None


def best_iteration(accs: Sequence[float]) -> int:
    """1-based iteration of the highest accuracy, ties going to the earliest."""
    if not accs:
        raise ValueError("no iterations")
    return max(range(len(accs)), key=lambda i: (accs[i], -i)) + 1


def guard(t1_correct: Sequence[bool], best_correct: Sequence[bool], k: float
          ) -> dict[str, Any]:
    """Whether the best iteration beats T=1 on dev by more than k paired standard
    errors; returns {"gain", "paired_se", "discordant": [b, c], "k", "passed"}
    (b: dev items only T=1 gets right, c: only the best iteration)."""
    n = len(t1_correct)
    only_t1, only_best = stats.paired_counts(t1_correct, best_correct)
    gain = (only_best - only_t1) / n if n else 0.0
    se = stats.paired_se(t1_correct, best_correct) if n else 0.0
    return {"gain": gain, "paired_se": se, "discordant": [only_t1, only_best], "k": k,
            "passed": bool(gain > k * se)}
