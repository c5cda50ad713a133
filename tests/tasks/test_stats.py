"""Paired statistics against hand-computed values."""

import math

import pytest

from vllm_deepthink.tasks import stats


def test_paired_counts_and_se():
    a = [True, True, False, False, True]
    b = [True, False, True, True, True]
    assert stats.paired_counts(a, b) == (1, 2)
    assert stats.paired_se(a, b) == pytest.approx(math.sqrt(3) / 5)
    with pytest.raises(ValueError, match="same items"):
        stats.paired_counts([True], [True, False])


@pytest.mark.parametrize("b,c,p", [(0, 0, 1.0), (0, 5, 2 / 32), (5, 0, 2 / 32),
                                   (3, 3, 1.0), (1, 9, 2 * 11 / 1024)])
def test_mcnemar_exact(b, c, p):
    assert stats.mcnemar_p(b, c) == pytest.approx(p)


def test_paired_bootstrap_is_seeded_and_brackets_the_difference():
    a = [True] * 50 + [False] * 50
    b = [True] * 60 + [False] * 40
    diff, lo, hi = stats.paired_bootstrap(a, b, resamples=2000, seed=1)
    assert diff == pytest.approx(0.10) and lo <= diff <= hi and lo > 0
    assert stats.paired_bootstrap(a, b, resamples=2000, seed=1) == (diff, lo, hi)
    same = stats.paired_bootstrap(a, a, resamples=100)
    assert same == (0.0, 0.0, 0.0)


def test_mean_ci_over_pairs():
    mean, lo, hi = stats.mean_ci([0.01, 0.03, 0.05, 0.02], resamples=2000)
    assert mean == pytest.approx(0.0275) and 0.01 <= lo <= mean <= hi <= 0.05
    assert stats.mean_ci([0.02]) == (0.02, 0.02, 0.02)
