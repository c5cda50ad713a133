"""Statistics for comparing two systems on the same items (pure functions).

- `paired_counts` / `paired_se`: discordant pairs b (A right, B wrong) and c (A wrong,
  B right); the standard error of the accuracy difference of two systems on the same
  n items is about sqrt(b + c) / n (the builder's selection guard uses it).
- `mcnemar_p`: exact two-sided McNemar test (binomial on the discordant pairs).
- `paired_bootstrap`: the accuracy difference with a percentile bootstrap interval,
  items resampled together for both systems.
- `mean_ci`: the mean of per-(task, seed) gains with a percentile bootstrap
  interval over those pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def paired_counts(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[int, int]:
    """(b, c): items only A gets right, items only B gets right."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"{len(a_correct)} vs {len(b_correct)} items: pair the same items")
    only_a = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    only_b = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    return only_a, only_b


def paired_se(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """sqrt(discordant) / n: the standard error of acc(B) - acc(A) under the null."""
    n = len(a_correct)
    if n == 0:
        return math.nan
    only_a, only_b = paired_counts(a_correct, b_correct)
    return math.sqrt(only_a + only_b) / n


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired_bootstrap(a_correct: Sequence[bool], b_correct: Sequence[bool], *,
                     resamples: int = 10_000, seed: int = 0, level: float = 0.95
                     ) -> tuple[float, float, float]:
    """(acc(B) - acc(A), lower, upper): percentile interval over item resamples."""
    a = np.asarray(a_correct, dtype=np.float64)
    b = np.asarray(b_correct, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("pair the same, non-empty list of items")
    diff = b - a
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(resamples, diff.size))
    means = diff[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(diff.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def mean_ci(values: Sequence[float], *, resamples: int = 10_000, seed: int = 0,
            level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper) with a percentile bootstrap over the values (e.g. one gain
    per (task, seed) pair)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
