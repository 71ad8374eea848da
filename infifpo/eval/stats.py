"""Confidence intervals of benchmark accuracies: pure functions on counts and per-item verdicts (no I/O, no models).

Owns: the Wilson score interval of one accuracy, the normal interval from a reported standard error (lm-eval), the
paired bootstrap of the difference between two models' accuracies on the same items, its form over items *and*
training seeds (``seed_item_bootstrap``: one row's mean over seeds, or the difference of two rows, on one benchmark or
averaged over several), the floor under any one-seed paired comparison at n items (``min_detectable_difference``),
and the survey metrics of a results row against the pivot and the best source (``survey_metrics``). Every value
returned is in percent (0-100) or percentage points; inputs are counts, booleans or accuracies in percent.

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
        raise ValueError(f"accuracy of {k}/{n}: no items (n = {n}); an empty benchmark has no accuracy. "
                         "Give it items.")
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
                         f"{accuracy_pct!r} ± {stderr_pct!r}")
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
                         f"{b.shape}; pair the models' verdicts item by item.")
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
                              "benchmark specs and seed.")
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


BOOTSTRAP_CHUNK = 1000  # replicates drawn and reduced at a time (bounds memory at chunk x items floats per benchmark)


def _seed_weights(rng: np.random.Generator, seeds: int, replicates: int) -> np.ndarray:
    """[replicates, seeds]: how often each seed occurs in a draw of ``seeds`` seeds with replacement."""
    if seeds == 1:
        return np.ones((replicates, 1))
    draws = rng.integers(0, seeds, size=(replicates, seeds))
    return np.stack([(draws == s).sum(axis=1) for s in range(seeds)], axis=1).astype(np.float64)


def _seed_sums(weights: np.ndarray, verdicts: np.ndarray) -> np.ndarray:
    """Per replicate and item, the verdicts summed over the drawn seeds: [replicates, items], or [items] for one seed
    (every draw is that seed). A loop over seeds: a BLAS matmul with an inner dimension of a few seeds is slower."""
    if verdicts.shape[0] == 1:
        return verdicts[0]
    out = weights[:, :1] * verdicts[0]
    for s in range(1, verdicts.shape[0]):
        out += weights[:, s:s + 1] * verdicts[s]
    return out


def _verdict_matrices(groups: Sequence[Sequence[Sequence[bool | float]]], what: str) -> list[np.ndarray]:
    mats = [np.asarray(g, dtype=np.float64) for g in groups]
    if not mats:
        raise ValueError(f"seed/item bootstrap: {what} has no benchmarks; give at least one [seeds, items] matrix.")
    if any(m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0 for m in mats):
        raise ValueError(f"seed/item bootstrap: every benchmark of {what} must be a non-empty [seeds, items] matrix, "
                         f"got shapes {[m.shape for m in mats]}.")
    if len({m.shape[0] for m in mats}) != 1:
        raise ValueError(f"seed/item bootstrap: {what} has {sorted({m.shape[0] for m in mats})} seeds on different "
                         "benchmarks; every seed must be evaluated on every benchmark averaged.")
    return mats


def seed_item_bootstrap(a_groups: Sequence[Sequence[Sequence[bool | float]]],
                        b_groups: Sequence[Sequence[Sequence[bool | float]]] | None = None, *,
                        resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Bootstrap over items and training seeds of one row's accuracy, or of the difference of two rows (A - B).

    ``a_groups[g]`` is benchmark g's [S_a, n_g] matrix of verdicts (row s = training seed s of row A, column i = item
    i); ``b_groups[g]`` is B's [S_b, n_g] matrix on the *same items in the same order* (paired), or None for A alone.
    The statistic is the mean over benchmarks (each weighted equally, whatever its size, as the table's Avg) of
    mean_{seeds, items} A - mean_{seeds, items} B. Each replicate draws, for every benchmark, n_g items with
    replacement (the same draw for A and B: paired), and once per replicate S_a seeds of A and S_b seeds of B with
    replacement (A's and B's independently; one draw shared by all benchmarks, since a seed is one trained model
    evaluated on all of them). With S_a = S_b = 1 and one benchmark this is ``paired_bootstrap``'s distribution.
    The interval is the (1-level)/2 and (1+level)/2 percentiles of the replicates (numpy's linear interpolation;
    replicates rounded to 1e-12 so that exact ties, e.g. a zero difference, are not split by float round-off).
    Returns (observed statistic, lo, hi) in percent (A alone) or percentage points (A - B); seeded.
    Raises ValueError for empty or mis-shaped inputs.
    """
    a = _verdict_matrices(a_groups, "A")
    b = _verdict_matrices(b_groups, "B") if b_groups is not None else None
    if b is not None and (len(b) != len(a) or any(x.shape[1] != y.shape[1] for x, y in zip(a, b, strict=False))):
        raise ValueError(f"seed/item bootstrap: A and B must cover the same benchmarks and items (pair them by item "
                         f"id), got items {[m.shape[1] for m in a]} and {[m.shape[1] for m in b]}.")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"seed/item bootstrap: need 0 < level < 1 and resamples >= 1, got {level}, {resamples}.")
    sa, sb = a[0].shape[0], b[0].shape[0] if b is not None else 1
    rng = np.random.default_rng(seed)
    replicates = np.empty(resamples)
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        r = min(BOOTSTRAP_CHUNK, resamples - start)
        wa, wb = _seed_weights(rng, sa, r), _seed_weights(rng, sb, r) if b is not None else None
        total = np.zeros(r)
        for g, ga in enumerate(a):
            # integer per-item sums over the drawn seeds, scaled to the common denominator sa * sb
            per_item = _seed_sums(wa, ga) * sb - (_seed_sums(wb, b[g]) * sa if b is not None else 0.0)
            idx = rng.integers(0, ga.shape[1], size=(r, ga.shape[1]))
            drawn = per_item[idx] if per_item.ndim == 1 else np.take_along_axis(per_item, idx, axis=1)
            total += drawn.sum(axis=1) / (ga.shape[1] * sa * sb)
        replicates[start:start + r] = total / len(a)
    lo, hi = np.percentile(np.round(replicates, 12), [50 * (1 - level), 50 * (1 + level)])
    observed = sum(ga.mean() - (b[g].mean() if b is not None else 0.0) for g, ga in enumerate(a)) / len(a)
    return 100.0 * float(observed), 100.0 * float(lo), 100.0 * float(hi)


def survey_metrics(row: Mapping[str, float | None], pivot: Mapping[str, float | None],
                   best_source: Mapping[str, float | None],
                   degraded_beyond_ci: Mapping[str, bool | None]) -> dict[str, object]:
    """The seed surveys' fusion metrics of one results row, per benchmark t (accuracies in percent).

    - ``retention[t]`` = 100 x row(t) / best_source(t) (percent of the best source's accuracy on t; None where the
      best source scores 0 or a value is missing); ``retention_avg`` = mean of the defined retention[t] over t
      (None when none is defined), ``retention_n`` = how many t it averages.
    - ``worst_drop`` = min_t (row(t) - pivot(t)) in points, over the t where both are known (negative = a drop; None
      when there is no such t), ``worst_drop_benchmark`` = that t (the first in order on a tie).
    - ``degraded_raw`` = number of t with row(t) < pivot(t); ``degraded_ci`` = number of t where
      ``degraded_beyond_ci[t]`` is True (the 95 % interval of row - pivot lies below zero); ``degraded_undetermined`` =
      number of t where it is None (no interval); ``compared`` = number of t where both are known; the shares are
      the counts over ``compared`` (None when 0).
    """
    retention = {t: (100.0 * v / best_source[t] if v is not None and best_source.get(t) else None)
                 for t, v in row.items()}
    defined = [v for v in retention.values() if v is not None]
    both = [t for t, v in row.items() if v is not None and pivot.get(t) is not None]
    drops = {t: row[t] - pivot[t] for t in both}
    worst = min(both, key=lambda t: drops[t]) if both else None
    raw = sum(drops[t] < 0 for t in both)
    beyond = sum(degraded_beyond_ci.get(t) is True for t in both)
    undetermined = sum(degraded_beyond_ci.get(t) is None for t in both)
    return {"retention": retention, "retention_avg": sum(defined) / len(defined) if defined else None,
            "retention_n": len(defined), "worst_drop": drops[worst] if worst is not None else None,
            "worst_drop_benchmark": worst, "compared": len(both), "degraded_raw": raw, "degraded_ci": beyond,
            "degraded_undetermined": undetermined, "share_degraded_raw": raw / len(both) if both else None,
            "share_degraded_ci": beyond / len(both) if both else None}


def min_detectable_difference(n: int, level: float = 0.95) -> float:
    """The smallest accuracy difference (points) that a one-seed paired bootstrap interval at ``level`` can separate
    from zero on ``n`` items, whatever the models: the best case for A is k items where A is right and B wrong and no
    item the other way; a replicate then draws none of the k with probability (1 - k/n)^n and equals 0, so the lower
    percentile is above zero only when (1 - k/n)^n < (1 - level)/2. Returns 100 * k_min / n for the smallest such k
    (40.0 at n = 10, 26.7 at n = 15, 20.0 at n = 20, 4.0 at n = 100). Raises ValueError for n < 1."""
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"min detectable difference: need n >= 1 items and 0 < level < 1, got {n}, {level}.")
    tail = (1 - level) / 2
    k = next((k for k in range(1, n + 1) if (1 - k / n) ** n < tail), n)
    return 100.0 * k / n
