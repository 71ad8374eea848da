"""The seed-and-item bootstrap, the survey metrics and the one-seed floor of infifpo.eval.stats, against exact
enumerations and hand computations (no report, no I/O)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from infifpo.eval.stats import min_detectable_difference, seed_item_bootstrap, survey_metrics


def _exact_quantiles(dist: dict[Fraction, Fraction], level: float) -> tuple[Fraction, Fraction, float]:
    """The (1-level)/2 and (1+level)/2 quantiles of an exact discrete distribution, and the smallest distance of the
    CDF from either level (the margin that lets a finite bootstrap land on the atoms)."""
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    cdf, lo, hi, margin = Fraction(0), None, None, 1.0
    for value in sorted(dist):
        cdf += dist[value]
        margin = min(margin, abs(float(cdf) - lo_q), abs(float(cdf) - hi_q))
        if lo is None and cdf >= lo_q:
            lo = value
        if hi is None and cdf >= hi_q:
            hi = value
    return lo, hi, margin


def test_seed_item_bootstrap_matches_the_exact_enumeration_of_item_and_seed_draws() -> None:
    """A has two seeds on 3 items, seed 0 right on items 0 and 1, seed 1 on item 0; B (one seed) right on item 1.
    Every replicate draws 3 items (27 equally likely tuples) and 2 of A's seeds (4 tuples) with replacement; the
    statistic is mean_{drawn seeds, drawn items} A - mean_{drawn items} B. Enumerating the 108 outcomes gives
    P(-1) = 1/108, P(-2/3) = 3/108, ..., P(1) = 4/108: the 2.5 % quantile is -2/3 and the 97.5 % one is 1 (the CDF
    passes 0.025 and 0.975 by >= 0.012, i.e. > 10 standard errors of 20 000 replicates)."""
    a, b = [[1, 1, 0], [1, 0, 0]], [[0, 1, 0]]
    dist: dict[Fraction, Fraction] = {}
    for items in itertools.product(range(3), repeat=3):
        for seeds in itertools.product(range(2), repeat=2):
            v = Fraction(sum(a[s][i] for s in seeds for i in items), 6) - Fraction(sum(b[0][i] for i in items), 3)
            dist[v] = dist.get(v, Fraction(0)) + Fraction(1, 108)
    lo, hi, margin = _exact_quantiles(dist, 0.95)
    assert (lo, hi) == (Fraction(-2, 3), Fraction(1)) and margin > 0.011
    obs, blo, bhi = seed_item_bootstrap([a], [b], resamples=20_000, seed=3)
    assert obs == pytest.approx(100 * (3 / 6 - 1 / 3))  # A: 3 of 6 seed-item verdicts right; B: 1 of 3
    assert (blo, bhi) == (pytest.approx(-200 / 3), pytest.approx(100.0))
    assert seed_item_bootstrap([a], [b], resamples=2000) == seed_item_bootstrap([a], [b], resamples=2000)  # seeded


def test_a_seed_draw_is_shared_by_all_benchmarks() -> None:
    """Three seeds, two benchmarks of one item each; seed 0 is right on both, seeds 1 and 2 on neither. One seed draw
    per replicate (a seed is one model): the statistic is K/3 with K ~ Binomial(3, 1/3), CDF 8/27 = 0.296 at 0,
    20/27 = 0.741 at 1/3, 26/27 = 0.963 at 2/3: at level 0.6 the 20 % and 80 % quantiles are 0 and 2/3. Independent
    draws per benchmark would give (K1 + K2)/6 with P(0) = (8/27)^2 = 0.088, so a 20 % quantile of 1/6."""
    a = [[[1], [0], [0]], [[1], [0], [0]]]
    assert seed_item_bootstrap(a, level=0.6, resamples=20_000) == (pytest.approx(100 / 3), pytest.approx(0.0),
                                                                   pytest.approx(200 / 3))


def test_one_seed_is_the_paired_bootstrap_over_items() -> None:
    """A beats B on 6 of 20 items and ties on the rest: a replicate is Binomial(20, 0.3)/20, whose 2.5 % and 97.5 %
    quantiles are 2 and 10 items (CDF 0.0355 at 2, 0.0076 at 1; 0.9520 at 9, 0.9829 at 10): 10 and 50 points. The
    same holds for A's own accuracy when A is right on exactly those 6 items."""
    a = [True] * 6 + [False] * 14
    b = [False] * 20
    assert seed_item_bootstrap([[a]], [[b]]) == (pytest.approx(30.0), pytest.approx(10.0), pytest.approx(50.0))
    assert seed_item_bootstrap([[a]]) == (pytest.approx(30.0), pytest.approx(10.0), pytest.approx(50.0))


def test_deterministic_cases_give_a_point_interval() -> None:
    # every seed of A right and every seed of B wrong on every item: each replicate is exactly 100
    assert seed_item_bootstrap([[[1] * 4] * 3], [[[0] * 4] * 2]) == (100.0, 100.0, 100.0)
    # identical one-seed rows: every replicate is exactly 0 (not 1e-17: such a point must not read as an ordering)
    row = [[1, 0, 1, 1, 0, 0, 1]]
    assert seed_item_bootstrap([row], [row]) == (0.0, 0.0, 0.0)
    # Avg weighs each benchmark equally whatever its size: 2 items all right + 8 items all wrong -> 50, not 20
    assert seed_item_bootstrap([[[1, 1]], [[0] * 8]], [[[0, 0]], [[0] * 8]]) == (50.0, 50.0, 50.0)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="same benchmarks and items"):
        seed_item_bootstrap([[[1, 0]]], [[[1, 0, 1]]])
    with pytest.raises(ValueError, match="non-empty"):
        seed_item_bootstrap([[[]]])
    with pytest.raises(ValueError, match="every seed must be evaluated"):
        seed_item_bootstrap([[[1], [0]], [[1]]])


def test_min_detectable_difference_is_the_one_seed_floor() -> None:
    """n = 10: with k items where A alone is right, a replicate is 0 with probability (1 - k/10)^10: 0.7^10 = 0.028
    (not below 2.5 %) at k = 3, 0.6^10 = 0.0060 at k = 4, so the floor is 4 items = 40 points. n = 20: 0.85^20 =
    0.039, 0.8^20 = 0.0115: 4 items = 20 points. The bootstrap agrees on both sides of the floor."""
    assert min_detectable_difference(10) == 40.0 and min_detectable_difference(20) == 20.0
    assert min_detectable_difference(1) == 100.0
    for n, k in ((10, 4), (20, 4)):
        a_at, a_below, b = [i < k for i in range(n)], [i < k - 1 for i in range(n)], [False] * n
        assert seed_item_bootstrap([[a_at]], [[b]])[1] > 0
        assert seed_item_bootstrap([[a_below]], [[b]])[1] == 0.0
    with pytest.raises(ValueError):
        min_detectable_difference(0)


def test_survey_metrics_by_hand() -> None:
    """Row 45 / 0 / 40 on three benchmarks, pivot 50 / 50 / 20, best source 80 / 80 / 0 (no source solves t3).
    Retention: 45/80 = 56.25 %, 0/80 = 0 %, t3 undefined -> mean 28.125 over 2. Differences vs pivot: -5, -50, +20:
    worst drop -50 on t2; raw degraded t1 and t2 (2 of 3); beyond the interval only t2 (t1's interval covers 0), and
    t3 has no interval: 1 of 3, 1 undetermined."""
    m = survey_metrics({"t1": 45.0, "t2": 0.0, "t3": 40.0}, {"t1": 50.0, "t2": 50.0, "t3": 20.0},
                       {"t1": 80.0, "t2": 80.0, "t3": 0.0}, {"t1": False, "t2": True, "t3": None})
    assert m["retention"] == {"t1": 56.25, "t2": 0.0, "t3": None}
    assert m["retention_avg"] == 28.125 and m["retention_n"] == 2
    assert (m["worst_drop"], m["worst_drop_benchmark"]) == (-50.0, "t2")
    assert (m["compared"], m["degraded_raw"], m["degraded_ci"], m["degraded_undetermined"]) == (3, 2, 1, 1)
    assert m["share_degraded_raw"] == pytest.approx(2 / 3) and m["share_degraded_ci"] == pytest.approx(1 / 3)
    # a benchmark the pivot lacks is not compared; nothing known -> None, not 0
    m = survey_metrics({"t1": 30.0}, {"t1": None}, {"t1": None}, {})
    assert m["retention_avg"] is None and m["worst_drop"] is None and m["share_degraded_raw"] is None
