"""RSAF, rate-skewness adaptive fusion (InfiFusion, Yan et al., arXiv 2501.02795 v1): the merge of pairwise-fused
models into one, as pure functions on tensors.

Owns: the math of docs/methods.md, "Fusion strategies from the seed papers, carried to sequence level", the RSAF
paragraph, for one parameter tensor at a time (``rsaf_merge_tensor``) and for whole state dicts
(``rsaf_merge_state_dicts``): rate of change, its skewness, the adaptive keep-ratio, the top-K trim, the sign
election and the matrix-level coefficients. Imports torch only. Does not own: reading or writing checkpoints, the
architecture checks, or running the merge (``infifpo.merge.stage``, through mergekit).

Notation (docs/methods.md): θ_p the pivot's tensor, φ_j source j's pairwise-fused model (pivot + source j, trained by
InfiFPO), δ_j = φ_j − θ_p, J the number of sources, n the number of elements of the tensor.

Choices the paper leaves open, each stated where it is made:

- the keep count of a ratio K on n elements is round(K·n), halves up, at least 1 (``keep_count``);
- ties in the ranking at the cut are broken by the lower flat index, so exactly that many elements are kept
  (``top_fraction_mask``);
- an element whose elected sign is 0 (the trimmed deltas sum to exactly 0 there) keeps the pivot's value;
- a tensor whose trimmed deltas are all 0 keeps the pivot's value (its coefficients are reported as 0);
- every floating tensor is treated as a "matrix", vectors (norms, biases) included, unless ``skip`` lists it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import torch

RATE_EPS = 1e-8  # ε of r = |δ| / (|θ_p| + ε) (RSAF, docs/methods.md)
DEFAULT_TAU = 0.1  # τ, the base keep-ratio (docs/methods.md, RSAF; the paper's value)
RankBy = Literal["rate", "magnitude"]
RANK_BY: tuple[str, ...] = ("rate", "magnitude")


class TensorMerge(NamedTuple):
    """One tensor's RSAF merge and what decided it (per source j, in input order)."""

    merged: torch.Tensor  # Φ_m, shape and dtype of θ_p
    skewness: list[float | None]  # S_j; None when r_j is constant (skewness undefined)
    keep_ratios: list[float]  # K_j after clipping to (0, 1]
    keep_counts: list[int]  # elements of δ_j kept by the trim
    coefficients: list[float]  # η_j (they sum to 1 unless every trimmed delta is 0, then all 0)


def rate_of_change(delta: torch.Tensor, base: torch.Tensor, eps: float = RATE_EPS) -> torch.Tensor:
    """r_i = |δ_i| / (|θ_{p,i}| + ε) elementwise. ``delta`` and ``base`` have one shape; returns
    that shape, float64 (the moments of r are computed from it; float32 loses the skewness of a large matrix)."""
    return delta.double().abs() / (base.double().abs() + eps)


def skewness(values: torch.Tensor) -> float | None:
    """S = m₃ / m₂^1.5 over every element of ``values`` (any shape), m_k = mean((x − mean x)^k), the population
    central moments (RSAF, docs/methods.md). None when the values are all equal (m₂ = 0, S undefined); checked exactly
    (max == min), not as m₂ < tol, so a nearly constant r still has its skewness."""
    x = values.double().flatten()
    if x.numel() == 0 or bool(x.max() == x.min()):
        return None
    centred = x - x.mean()
    m2 = centred.square().mean()
    m3 = centred.pow(3).mean()
    return float(m3 / m2.pow(1.5))


def keep_ratio(skew: float | None, tau: float = DEFAULT_TAU) -> float:
    """K = τ/(1 + S) if S ≥ 0, τ(1 + |S|) if S < 0, clipped to (0, 1]; τ when S is undefined (RSAF, docs/methods.md).

    A right-skewed rate (a few elements changed much more than the rest) keeps fewer elements; a left-skewed one
    keeps more. K > 0 always for τ in (0, 1], so only the upper clip can bind."""
    check_tau(tau)
    if skew is None:
        return tau
    ratio = tau / (1.0 + skew) if skew >= 0 else tau * (1.0 + abs(skew))
    return min(ratio, 1.0)


def keep_count(ratio: float, numel: int) -> int:
    """Elements kept of ``numel`` at keep-ratio ``ratio`` in (0, 1]: round(ratio·numel), halves up, clamped to
    [1, numel]. (choice, RSAF) Nearest, so the kept fraction is the closest possible to K; at least one,
    since K > 0 asks to keep something."""
    if numel == 0:
        return 0
    return max(1, min(numel, math.floor(ratio * numel + 0.5)))


def top_fraction_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of ``scores``' shape with exactly ``count`` True: the largest scores, ties broken by the lower
    flat (row-major) index. (choice, RSAF) A stable descending sort keeps equal scores in index order, so
    the cut is deterministic and the count exact, whatever the number of tied elements at the boundary."""
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order[:count]] = True
    return mask.view(scores.shape)


def elected_agreement(trimmed: torch.Tensor) -> torch.Tensor:
    """Sign election over the sources (RSAF, docs/methods.md): ``trimmed`` (J, *shape) holds δ̂_j; the elected sign is
    sign(Σ_j δ̂_j) per element, and the result (J, *shape, bool) is True where δ̂_j has that sign. Where the sum is
    exactly 0 the elected sign is 0 and no nonzero δ̂_j agrees, so the element keeps the pivot's value (choice)."""
    elected = torch.sign(trimmed.sum(dim=0))
    return torch.sign(trimmed) == elected.unsqueeze(0)


def matrix_coefficients(trimmed: torch.Tensor) -> torch.Tensor:
    """η_j = Σ_i δ̂_{j,i}² / Σ_j' Σ_i δ̂_{j',i}²: ``trimmed`` (J, *shape) → (J,). The energy of the
    trimmed deltas, before the sign election. All zeros when every δ̂ is 0 (the merge is then θ_p whatever η is)."""
    energy = trimmed.reshape(trimmed.shape[0], -1).square().sum(dim=1)
    total = energy.sum()
    return energy / total if bool(total > 0) else torch.zeros_like(energy)


def rsaf_merge_tensor(base: torch.Tensor, finetuned: Sequence[torch.Tensor], *, tau: float = DEFAULT_TAU,
                      rank_by: RankBy = "rate") -> TensorMerge:
    """Φ_m = θ_{p,m} + Σ_j η_j δ'_{j,m} for one parameter tensor m (RSAF, docs/methods.md).

    ``base``: θ_p, any shape; ``finetuned``: the J tensors φ_j, each of ``base``'s shape. Per source: δ_j = φ_j − θ_p,
    r_j = ``rate_of_change``, S_j = ``skewness(r_j)``, K_j = ``keep_ratio(S_j, tau)``, and δ̂_j keeps the
    ``keep_count(K_j, n)`` elements with the largest r_j (``rank_by="rate"``, default) or |δ_j|
    (``rank_by="magnitude"``, as TIES and SCE), the rest 0. Then δ'_j = δ̂_j where it agrees with the elected sign
    (``elected_agreement``), η = ``matrix_coefficients(δ̂)``. The keep-ratio always comes from the rate's skewness;
    ``rank_by`` only changes which elements are kept. Computed in float64 (rates and moments) and float32 or wider
    (deltas); the result has ``base``'s dtype."""
    check_rank_by(rank_by)
    if not finetuned:
        raise ValueError("rsaf_merge_tensor needs at least one fine-tuned tensor")
    for j, phi in enumerate(finetuned):
        if phi.shape != base.shape:
            raise ValueError(f"source {j}: shape {tuple(phi.shape)} differs from the base's {tuple(base.shape)}")
    work = torch.promote_types(base.dtype, torch.float32)
    theta = base.to(work)
    deltas = torch.stack([phi.to(work) - theta for phi in finetuned])  # (J, *shape)
    skews, ratios, counts, masks = [], [], [], []
    for delta in deltas:
        rate = rate_of_change(delta, theta)
        skew = skewness(rate)
        ratio = keep_ratio(skew, tau)
        count = keep_count(ratio, delta.numel())
        masks.append(top_fraction_mask(rate if rank_by == "rate" else delta.abs(), count))
        skews.append(skew)
        ratios.append(ratio)
        counts.append(count)
    trimmed = deltas * torch.stack(masks)  # δ̂_j
    agreed = trimmed * elected_agreement(trimmed)  # δ'_j
    eta = matrix_coefficients(trimmed)
    merged = theta + (eta.view(-1, *([1] * base.dim())) * agreed).sum(dim=0)
    return TensorMerge(merged.to(base.dtype), skews, ratios, counts, eta.tolist())


def is_skipped(name: str, skip: Sequence[str]) -> bool:
    """Whether parameter ``name`` is left as the pivot's: it contains one of ``skip``'s entries (e.g. "lm_head",
    "embed_tokens"), the substring rule of mergekit's parameter filters."""
    return any(entry in name for entry in skip)


def rsaf_merge_state_dicts(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                           tau: float = DEFAULT_TAU, rank_by: RankBy = "rate",
                           skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """RSAF over whole state dicts (RSAF, docs/methods.md): every floating tensor of ``base`` merged by
    ``rsaf_merge_tensor`` with the same-named tensors of ``finetuned``; tensors ``is_skipped`` by ``skip`` and
    non-floating ones (integer buffers) are the base's. Every state dict must have the base's names and shapes."""
    for j, state in enumerate(finetuned):
        if set(state) != set(base):
            diff = sorted(set(state) ^ set(base))[:5]
            raise ValueError(f"model {j}: parameter names differ from the base's (first differences: {diff})")
    merged = {}
    for name, theta in base.items():
        if is_skipped(name, skip) or not theta.is_floating_point():
            merged[name] = theta
        else:
            merged[name] = rsaf_merge_tensor(theta, [s[name] for s in finetuned], tau=tau, rank_by=rank_by).merged
    return merged


def check_tau(tau: float) -> float:
    """τ must lie in (0, 1]: it is the keep-ratio of a tensor whose rate has no skew."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1] (the keep-ratio at zero skewness), got {tau}")
    return tau


def check_rank_by(rank_by: str) -> str:
    """``rank_by`` is one of ``RANK_BY``."""
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {list(RANK_BY)}, got {rank_by!r}")
    return rank_by
