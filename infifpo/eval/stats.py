"""Confidence intervals of benchmark accuracies: pure functions on counts and per-item verdicts (no I/O, no models).

Owns: the Wilson score interval of one accuracy, the normal interval from a reported standard error (lm-eval), and
the paired bootstrap of the difference between two models' accuracies on the same items. Every value returned is in
percent (0-100) or percentage points; inputs are counts or booleans.

Empty benchmarks: an accuracy over n = 0 items is undefined. ``accuracy`` and ``wilson_interval`` raise
``ValueError`` for n = 0 (and for k outside 0..n) rather than return nan, so an empty benchmark never reaches a
report as a number; ``paired_bootstrap`` raises the same way for zero items.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np

from infifpo.schema import DataFormatError

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal: two-sided 95 %


def _check_counts(k: int, n: int) -> None:
    if n <= 0:
        raise ValueError(f"accuracy of {k}/{n}: no items (n = {n}); an empty benchmark has no accuracy. Give it items.")
    if not 0 <= k <= n:
        raise ValueError(f"accuracy of {k}/{n}: the number correct must be between 0 and n.")


def accuracy(k: int, n: int) -> float:
    """``k`` correct out of ``n`` items, in percent (0-100). Raises ValueError for n = 0."""
    _check_counts(k, n)
    return 100.0 * k / n


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n, in percent: (lo, hi) with 0 <= lo <= hi <= 100.

    With p = k/n:  centre = (p + z²/2n) / (1 + z²/n),  half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
    Unlike the normal (Wald) interval it stays inside [0, 100] and is not degenerate at k = 0 or k = n, which
    matters at the tens of items a small-scale run evaluates. Raises ValueError for n = 0.
    """
    _check_counts(k, n)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the exact lower (upper) bound is 0 (1); the formula gives it only up to round-off.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return 100.0 * lo, 100.0 * hi


def normal_interval(accuracy_pct: float, stderr_pct: float, z: float = Z95) -> tuple[float, float]:
    """accuracy ± z·stderr (both in percent), clipped to [0, 100]: the interval of a score reported with a standard
    error (lm-eval's ``<metric>_stderr``)."""
    if not (math.isfinite(accuracy_pct) and math.isfinite(stderr_pct)) or stderr_pct < 0:
        raise ValueError(f"normal interval: need a finite accuracy and a finite stderr >= 0, got "
                         f"{accuracy_pct!r} ± {stderr_pct!r}")  # fmt: skip
    return max(0.0, accuracy_pct - z * stderr_pct), min(100.0, accuracy_pct + z * stderr_pct)


def paired_bootstrap(correct_a: Sequence[bool], correct_b: Sequence[bool], *, resamples: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Difference of accuracies A - B on the same items (percentage points) and its paired bootstrap interval.

    ``correct_a[i]`` and ``correct_b[i]`` are the two models' verdicts on item i. Each of ``resamples`` replicates
    draws n items with replacement (the same draw for both models, so their per-item correlation is kept) and
    takes mean(a - b); the interval is the (1-level)/2 and (1+level)/2 percentiles of the replicates (numpy's
    linear interpolation). Returns (observed difference, lo, hi); seeded, so the same inputs give the same interval.
    Raises ValueError for zero items or sequences of different lengths.
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired bootstrap: the two verdict lists must have the same length, got {a.shape} and "
                         f"{b.shape}; pair the models' verdicts item by item.")  # fmt: skip
    if a.size == 0:
        raise ValueError("paired bootstrap: no items (n = 0); the difference of two empty accuracies is undefined.")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"paired bootstrap: need 0 < level < 1 and resamples >= 1, got {level}, {resamples}.")
    diff = a - b
    rng = np.random.default_rng(seed)
    replicates = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    lo, hi = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return 100.0 * float(diff.mean()), 100.0 * float(lo), 100.0 * float(hi)


def paired_by_id(correct_a: Mapping[str, bool], correct_b: Mapping[str, bool], **kwargs) -> tuple[float, float, float]:
    """``paired_bootstrap`` of two models' verdicts keyed by item id (e.g. per-item eval rows' ``id``).

    Raises DataFormatError when the two do not cover the same items (a paired comparison needs the same items:
    evaluate both models with the same benchmark specs and seed).
    """
    only_a, only_b = sorted(set(correct_a) - set(correct_b)), sorted(set(correct_b) - set(correct_a))
    if only_a or only_b:
        raise DataFormatError(f"paired comparison: items differ ({len(only_a)} only in A, e.g. {only_a[:3]}; "
                              f"{len(only_b)} only in B, e.g. {only_b[:3]}). Evaluate both models on the same "
                              "benchmark specs and seed.")  # fmt: skip
    ids = sorted(correct_a)
    return paired_bootstrap([bool(correct_a[i]) for i in ids], [bool(correct_b[i]) for i in ids], **kwargs)


def mean_of_groups_bootstrap_ci(groups: list[list[float]], *, samples: int = 2000, seed: int = 0,
                                level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean over groups of each group's mean paired difference, resampling items in each group.

    ``groups``: per benchmark, the per-item differences (correct_a - correct_b in {-1, 0, 1}); the statistic is the
    difference of Avg (mean over benchmarks, each weighted equally whatever its size). Per-benchmark differences use
    ``paired_bootstrap``; this is its stratified form for Avg. Seeded, so the report is reproducible.
    """
    rng = random.Random(seed)
    stats = sorted(sum(sum(rng.choices(g, k=len(g))) / len(g) for g in groups) / len(groups) for _ in range(samples))
    return stats[int((1 - level) / 2 * samples)], stats[int((1 + level) / 2 * samples) - 1]
