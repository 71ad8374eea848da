"""Interval arithmetic of infifpo.eval.stats against values worked out by hand (and published Wilson tables)."""

from __future__ import annotations

import math

import pytest

from infifpo.eval.stats import accuracy, normal_interval, paired_bootstrap, paired_by_id, wilson_interval
from infifpo.schema import DataFormatError


def test_wilson_matches_hand_computation() -> None:
    """k = 8, n = 40, z = 1.96 (the exact 97.5 % normal quantile 1.959964 changes the 5th decimal only):
    p = 0.2; z²/n = 3.8416/40 = 0.09604; denom = 1.09604; centre = (0.2 + 0.04802) / 1.09604 = 0.226287;
    half = 1.96 * sqrt(0.2*0.8/40 + 3.8416/6400) / 1.09604 = 1.96 * sqrt(0.0046002) / 1.09604 = 0.121290;
    interval = [0.104997, 0.347577] -> [10.50 %, 34.76 %]."""
    lo, hi = wilson_interval(8, 40, z=1.96)
    assert lo == pytest.approx(10.4997, abs=1e-3)
    assert hi == pytest.approx(34.7577, abs=1e-3)
    assert accuracy(8, 40) == 20.0


def test_wilson_edges_are_exact_and_not_degenerate() -> None:
    """0/10: upper bound z²/(n + z²) = 3.8415/13.8415 = 27.75 % (the textbook value); 10/10 mirrors it. A Wald
    interval would give [0, 0] there."""
    assert wilson_interval(0, 10) == (0.0, pytest.approx(27.753, abs=1e-3))
    assert wilson_interval(10, 10) == (pytest.approx(72.247, abs=1e-3), 100.0)
    for k in range(0, 41, 5):  # symmetric under k -> n - k
        lo, hi = wilson_interval(k, 40)
        lo2, hi2 = wilson_interval(40 - k, 40)
        assert lo == pytest.approx(100 - hi2) and hi == pytest.approx(100 - lo2)
        assert 0 <= lo <= accuracy(k, 40) <= hi <= 100


@pytest.mark.parametrize(("k", "n"), [(0, 0), (3, 0), (5, 4), (-1, 4)])
def test_empty_or_impossible_counts_raise(k: int, n: int) -> None:
    with pytest.raises(ValueError, match="no items|between 0 and n"):
        wilson_interval(k, n)
    with pytest.raises(ValueError):
        accuracy(k, n)


def test_normal_interval_is_plus_minus_z_stderr_clipped() -> None:
    assert normal_interval(50.0, 5.0, z=1.96) == (pytest.approx(40.2), pytest.approx(59.8))
    assert normal_interval(99.0, 2.0, z=1.96) == (pytest.approx(95.08), 100.0)
    with pytest.raises(ValueError):
        normal_interval(50.0, float("nan"))


def _binomial_quantile(n: int, p: float, q: float) -> int:
    """Smallest x with P(Binomial(n, p) <= x) >= q, summing the pmf C(n, x) p^x (1-p)^(n-x) by hand."""
    cdf = 0.0
    for x in range(n + 1):
        cdf += math.comb(n, x) * p**x * (1 - p) ** (n - x)
        if cdf >= q:
            return x
    return n


def test_paired_bootstrap_matches_the_binomial_distribution_of_the_difference() -> None:
    """A beats B on 6 of 20 items and ties on the rest: d = a - b is 1 on 6 items, 0 on 14. A bootstrap replicate's
    mean is Binomial(20, 0.3)/20, whose CDF is 0.0076 at 1, 0.0355 at 2, 0.9520 at 9, 0.9829 at 10: the 2.5 % and
    97.5 % quantiles are 2 and 10 items, i.e. 10 and 50 points, far enough from the CDF steps that 10 000
    replicates land on them."""
    a = [True] * 6 + [True] * 7 + [False] * 7
    b = [False] * 6 + [True] * 7 + [False] * 7
    assert (_binomial_quantile(20, 0.3, 0.025), _binomial_quantile(20, 0.3, 0.975)) == (2, 10)
    diff, lo, hi = paired_bootstrap(a, b, resamples=10_000, seed=0)
    assert diff == pytest.approx(30.0)
    assert (lo, hi) == (pytest.approx(10.0), pytest.approx(50.0))
    assert paired_bootstrap(a, b, seed=0) == paired_bootstrap(a, b, seed=0)  # seeded
    # Swapping the models negates the difference and mirrors the interval.
    rdiff, rlo, rhi = paired_bootstrap(b, a, resamples=10_000, seed=0)
    assert (rdiff, rlo, rhi) == (pytest.approx(-30.0), pytest.approx(-50.0), pytest.approx(-10.0))


def test_paired_bootstrap_degenerate_cases() -> None:
    same = [True, False, True, True]
    assert paired_bootstrap(same, same) == (0.0, 0.0, 0.0)
    assert paired_bootstrap([True] * 5, [False] * 5) == (100.0, 100.0, 100.0)
    with pytest.raises(ValueError, match="no items"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([True], [True, False])


def test_paired_by_id_pairs_items_by_id_and_refuses_different_items() -> None:
    a = {"x": True, "y": True, "z": False}
    b = {"z": False, "y": False, "x": True}  # order differs: pairing is by id
    assert paired_by_id(a, b, seed=1)[0] == pytest.approx(100 / 3)
    with pytest.raises(DataFormatError, match="only in A"):
        paired_by_id({**a, "w": True}, b)
