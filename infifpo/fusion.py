"""InfiFPO/WRPO/OPD math as pure torch functions, exactly as in `docs/methods.md`.

Owns: length normalisation, clipping against the frozen initial pivot, fusion of K source values into one reference
(FUSIONS), the InfiFPO loss (sigmoid, ipo), the WRPO loss and alpha schedule, and the OPD objectives (sequence-level
score-function loss, token-level forward/reverse KL, generalised JSD). Does not own: computing log-probs, batching,
metrics or data validation (trainers, `logprobs`, `schema`). Imports torch only.
Units: log-probs in nats; "v" is the caller's space (docs/methods.md §LN): the summed log-prob over the response
tokens, or the mean per-token log-prob with LN. B pairs, K sources, K' = K + 1 candidates when the initial pivot is
appended (`include_pivot`; its index is K). Bad input raises ValueError (this layer may not import `infifpo.schema`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "ipo")
MARGIN_AGAINST = ("init", "policy")
# What every FUSIONS entry returns: (fused_chosen [B], fused_rejected [B], chosen_index, rejected_index, weights).
Fused = tuple[Tensor, Tensor, Tensor | None, Tensor | None, tuple[Tensor, Tensor] | None]


def _require_float(name: str, x: Any) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"{x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point Tensor of log-probs (nats), got {got}")


def _require_same_shape(**tensors: Tensor) -> None:
    for name, x in tensors.items():
        _require_float(name, x)
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}; these must all have the same shape")


def length_normalize(logps: Tensor, n_tokens: Tensor) -> Tensor:
    """Mean per-token log-prob (nats/token) = summed log-prob (nats) / token count (docs/methods.md §LN).

    `logps` and `n_tokens` have the same shape; each model's sum is divided by its own token count.
    Raises ValueError on a non-positive count (an empty response has no per-token mean).
    """
    _require_float("logps", logps)
    n = torch.as_tensor(n_tokens, device=logps.device)
    if tuple(n.shape) != tuple(logps.shape):
        raise ValueError(f"shape mismatch: logps {tuple(logps.shape)} vs n_tokens {tuple(n.shape)}")
    bad = n <= 0
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"n_tokens must be positive: {int(bad.sum())} non-positive count(s), first at index "
                         f"{first} (value {n[first].item()}); drop empty responses before length normalisation")
    return logps / n.to(logps.dtype)


def clip_to_reference(src_chosen: Tensor, src_rejected: Tensor, ref_chosen: Tensor,
                      ref_rejected: Tensor) -> tuple[Tensor, Tensor]:
    """Clip source values [B, K] against the frozen initial pivot [B] (docs/methods.md §Probability clipping).

    c_k(y_w) = max(v_k(y_w), v_r(y_w)) and c_k(y_l) = min(v_k(y_l), v_r(y_l)): a source may never rate the preferred
    response below the initial pivot, nor the dispreferred one above it. Returns (clipped_chosen, clipped_rejected).
    """
    _check_pair_shapes(ref_chosen, ref_rejected, src_chosen, src_rejected)
    return torch.maximum(src_chosen, ref_chosen[:, None]), torch.minimum(src_rejected, ref_rejected[:, None])


def _check_pair_shapes(ref_chosen: Tensor, ref_rejected: Tensor, src_chosen: Tensor, src_rejected: Tensor) -> None:
    _require_same_shape(ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    _require_same_shape(src_chosen=src_chosen, src_rejected=src_rejected)
    if ref_chosen.dim() != 1 or src_chosen.dim() != 2 or src_chosen.shape[0] != ref_chosen.shape[0]:
        raise ValueError(
            f"expected ref_chosen/ref_rejected of shape [B] and src_chosen/src_rejected of shape [B, K]; got "
            f"ref {tuple(ref_chosen.shape)}, src {tuple(src_chosen.shape)}"
        )
    if src_chosen.shape[1] == 0:
        raise ValueError("src_chosen/src_rejected have K=0 sources; fusion needs at least one source")


@dataclass
class FusionInfo:
    """Diagnostics of one `fuse_reference` call; also readable as a dict (`info["clip_rate"]`).

    chosen_index/rejected_index: LongTensor [B], the candidate whose value became f(y) (index K = the initial
    pivot when `include_pivot`); None for `mean`/`confidence`/`uncertainty`. clip_rate: 0-dim float tensor, the
    fraction of the 2·B·K source values that clipping changed (0 with clip off). weights: (chosen [B, K'],
    rejected [B, K']) normalised confidence or uncertainty weights, None for the other methods. num_candidates: K'.
    """

    chosen_index: Tensor | None
    rejected_index: Tensor | None
    clip_rate: Tensor
    weights: tuple[Tensor, Tensor] | None
    num_candidates: int

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def shares(self, side: str, batch_size: int) -> Tensor:
        """(B, K') weight of each candidate in f(y) of ``side`` ("chosen" | "rejected"), each row summing to 1:
        one-hot of the selected candidate (max_margin), the normalised weights (confidence, uncertainty), 1/K' each
        (mean)."""
        if side not in ("chosen", "rejected"):
            raise ValueError(f"side must be 'chosen' or 'rejected', got {side!r}")
        index = self.chosen_index if side == "chosen" else self.rejected_index
        if index is not None:
            return F.one_hot(index, self.num_candidates).float()
        if self.weights is not None:
            return self.weights[0 if side == "chosen" else 1].float()
        return torch.full((batch_size, self.num_candidates), 1.0 / self.num_candidates)


def _max_margin_index(cand: Tensor, pivot: Tensor) -> Tensor:
    """argmax_k D_k with D_k = |exp(c_k) − exp(p)|, compared in log space (docs/methods.md §Fusion, max_margin).

    log D = max(c, p) + log1p(−exp(−|c − p|)), finite for sums around −5000 nats where exp() underflows. For a
    source far below p, D saturates at exp(p) in floating point, so ties in log D go to the larger |c − p|, then
    to the lowest index. Selection is not differentiated, so it runs detached in float64.
    """
    c, p = cand.detach().double(), pivot.detach().double()[:, None]
    same = c == p  # D = 0; also covers c = p = -inf, where c - p is NaN
    dist = torch.where(same, torch.zeros_like(c), (c - p).abs())
    log_d = torch.where(same, torch.full_like(c, -torch.inf), torch.maximum(c, p) + torch.log1p(-torch.exp(-dist)))
    tied = log_d == log_d.amax(dim=1, keepdim=True)
    key = torch.where(tied, dist, torch.full_like(dist, -1.0))
    best = tied & (key == key.amax(dim=1, keepdim=True))
    return best.to(torch.int32).argmax(dim=1)  # argmax returns the first (lowest) index among equal maxima


def _credit_pivot_on_full_tie(cand: Tensor, ref: Tensor, index: Tensor) -> Tensor:
    full_tie = (cand.detach() == ref.detach()[:, None].to(cand.dtype)).all(dim=1)
    return torch.where(full_tie, torch.full_like(index, cand.shape[1] - 1), index)


def _gather(cand: Tensor, index: Tensor) -> Tensor:
    return cand.gather(1, index[:, None]).squeeze(1)


# Each fusion takes candidates [B, K'] (clipped, pivot appended) and the D-pivot [B] of each response (uncertainty
# also the H̄ + CE of each candidate, see fuse_uncertainty).
def fuse_max_margin(cand_w: Tensor, cand_l: Tensor, pivot_w: Tensor, pivot_l: Tensor, eps: float) -> Fused:
    """Per response: f(y) = c_k*(y), k* = argmax_k |exp(c_k) − exp(pivot)| (docs/methods.md §Fusion, paper default)."""
    idx_w, idx_l = _max_margin_index(cand_w, pivot_w), _max_margin_index(cand_l, pivot_l)
    return _gather(cand_w, idx_w), _gather(cand_l, idx_l), idx_w, idx_l, None


def fuse_max_margin_pair(cand_w: Tensor, cand_l: Tensor, pivot_w: Tensor, pivot_l: Tensor, eps: float) -> Fused:
    """One candidate per pair: k* = argmax_k (c_k(y_w) − c_k(y_l)), lowest index on ties (docs/methods.md (choice))."""
    idx = (cand_w - cand_l).detach().argmax(dim=1)
    return _gather(cand_w, idx), _gather(cand_l, idx), idx, idx, None


def fuse_mean(cand_w: Tensor, cand_l: Tensor, pivot_w: Tensor, pivot_l: Tensor, eps: float) -> Fused:
    """f = mean_k c_k: a uniform geometric mean of sequence probabilities (paper ablation, official script)."""
    return cand_w.mean(dim=1), cand_l.mean(dim=1), None, None, None


def _inverse_weighted(cand: Tensor, spread: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(f [B], w [B, K']): w_k = 1/(spread_k + eps) normalised over k, f = Σ_k w_k c_k (confidence, uncertainty)."""
    w = 1.0 / (spread + eps)  # an infinite spread gets weight 0 and contributes 0 (not 0 * -inf = NaN)
    w = w / w.sum(dim=1, keepdim=True)
    return torch.where(w == 0, torch.zeros_like(cand), w * cand).sum(dim=1), w


def _confidence(cand: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if bool((cand > 0).any()):
        raise ValueError(f"confidence fusion needs log-probs <= 0 nats, got max {cand.max().item():.4g}")
    return _inverse_weighted(cand, -cand, eps)


def fuse_confidence(cand_w: Tensor, cand_l: Tensor, pivot_w: Tensor, pivot_l: Tensor, eps: float) -> Fused:
    """w_k ∝ 1/(−c_k + eps), normalised to sum 1 per response; f = Σ_k w_k c_k (paper ablation)."""
    (f_w, w_w), (f_l, w_l) = _confidence(cand_w, eps), _confidence(cand_l, eps)
    return f_w, f_l, None, None, (w_w, w_l)


# |H̄ + CE| below this many nats/token counts as rounding (schema.check_logp lets log-probs reach +1e-4).
UNCERTAINTY_ROUNDING = 1e-4


def udf_uncertainty(mean_entropy: Tensor, mean_logps: Tensor) -> Tensor:
    """H̄_k(y) + CE_k(y) = mean_entropy − mean_logps, same shape (docs/methods.md §UDF), nats/token.

    mean_entropy: the mean over y's tokens of the model's next-token entropy; mean_logps: the per-token mean log-prob
    s̄_k(y) (always the mean, whatever LN says), so CE_k = −s̄_k. Both are >= 0 for exact values.
    """
    _require_same_shape(mean_entropy=mean_entropy, mean_logps=mean_logps)
    return mean_entropy - mean_logps


def fuse_uncertainty(cand_w: Tensor, cand_l: Tensor, pivot_w: Tensor, pivot_l: Tensor, eps: float,
                     uncertainty: tuple[Tensor, Tensor] | None = None) -> Fused:
    """UDF per response: w_k ∝ 1/(H̄_k + CE_k + eps), normalised over k; f = Σ_k w_k c_k (docs/methods.md §UDF).

    ``uncertainty``: (chosen [B, K'], rejected [B, K']) H̄_k + CE_k of each candidate (``udf_uncertainty``), nats/token;
    the candidates c_k are the clipped values. Values below −UNCERTAINTY_ROUNDING raise (H̄ and CE are >= 0); those
    within it are taken as 0.
    """
    if uncertainty is None:
        raise ValueError("uncertainty fusion needs src_uncertainty (H̄_k + CE_k per source, udf_uncertainty)")
    out = []
    for name, cand, u in (("chosen", cand_w, uncertainty[0]), ("rejected", cand_l, uncertainty[1])):
        if tuple(u.shape) != tuple(cand.shape):
            raise ValueError(f"{name} uncertainty has shape {tuple(u.shape)}, expected the candidates' "
                             f"{tuple(cand.shape)} (sources, then the pivot when include_pivot)")
        if bool(torch.isnan(u).any()) or bool((u < -UNCERTAINTY_ROUNDING).any()):
            raise ValueError(f"{name} uncertainty H̄ + CE must be >= 0 nats/token (no NaN), got min "
                             f"{u.min().item():.4g}; entropies are >= 0 and log-probs <= 0")
        out.append(_inverse_weighted(cand, u.clamp(min=0).to(cand.dtype), eps))
    (f_w, w_w), (f_l, w_l) = out
    return f_w, f_l, None, None, (w_w, w_l)


def fuse_learned(cand_w: Tensor, cand_l: Tensor, pivot_w: Tensor, pivot_l: Tensor, eps: float,
                 weights: Tensor | None = None) -> Fused:
    """ASN (`learned`): one weight vector per pair, f(y_w) = Σ_k p̂_k c_k(y_w), f(y_l) = Σ_k p̂_k c_k(y_l)
    (docs/methods.md §ASN). ``weights``: p̂ [B, K'] from the frozen selector (``infifpo.selector``), >= 0; a weight
    of 0 contributes 0 whatever the candidate's value."""
    if weights is None:
        raise ValueError("learned fusion needs pair_weights: p̂ [B, K'] from the frozen selector (infifpo.selector)")
    if tuple(weights.shape) != tuple(cand_w.shape) or bool(torch.isnan(weights).any()) or bool((weights < 0).any()):
        raise ValueError(f"pair_weights must be finite, >= 0 and of the candidates' shape {tuple(cand_w.shape)} "
                         f"(sources, then the pivot when include_pivot), got {tuple(weights.shape)}")
    w = weights.to(cand_w.dtype)
    f_w = torch.where(w == 0, torch.zeros_like(cand_w), w * cand_w).sum(dim=1)
    f_l = torch.where(w == 0, torch.zeros_like(cand_l), w * cand_l).sum(dim=1)
    return f_w, f_l, None, None, (w, w)


FUSIONS = {"max_margin": fuse_max_margin, "max_margin_pair": fuse_max_margin_pair, "mean": fuse_mean,
           "confidence": fuse_confidence, "uncertainty": fuse_uncertainty, "learned": fuse_learned}
# docs/methods.md §Fusion (choice) include_pivot: the weighted fusions weight the N sources only (the paper's ablation
# arms, γ_i = 1/N); for the max-margin forms the initial pivot only breaks ties (with clipping), so including it is the
# equivalent form and credits the pivot in the selection metrics.
INCLUDE_PIVOT_DEFAULT = {"max_margin": True, "max_margin_pair": True, "mean": False, "confidence": False,
                         "uncertainty": False, "learned": False}


def resolve_include_pivot(method: str, include_pivot: bool | None) -> bool:
    """``include_pivot`` as given, or the default of fusion ``method`` when None (docs/methods.md §Fusion (choice))."""
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion method {method!r}; valid methods: {sorted(FUSIONS)}")
    return INCLUDE_PIVOT_DEFAULT[method] if include_pivot is None else bool(include_pivot)


def fuse_reference(ref_chosen: Tensor, ref_rejected: Tensor, src_chosen: Tensor, src_rejected: Tensor, *,
                   method: str = "max_margin", clip: bool = True, include_pivot: bool | None = None,
                   ref_offset: float | None = None, eps: float = 1e-6, margin_against: str = "init",
                   policy_chosen: Tensor | None = None, policy_rejected: Tensor | None = None,
                   src_uncertainty: tuple[Tensor, Tensor] | None = None,
                   ref_uncertainty: tuple[Tensor, Tensor] | None = None,
                   pair_weights: Tensor | None = None) -> tuple[Tensor, Tensor, FusionInfo]:
    """The fused source reference f(y_w), f(y_l) [B] in the caller's space (sum or per-token mean, nats).

    ref_*: [B] frozen initial pivot v_r; src_*: [B, K] sources v_k (docs/methods.md §Fusion). Steps: clip against v_r
    (`clip`), append v_r as candidate K (`include_pivot`; None = the method's default, INCLUDE_PIVOT_DEFAULT), fuse
    with FUSIONS[method], then clamp f into [v_r − ref_offset, v_r + ref_offset] when `ref_offset` is set.
    `margin_against="policy"` measures max-margin's D against the given current policy values policy_* [B]
    (detached) instead of v_r; clipping stays against v_r.
    `method="uncertainty"` needs src_uncertainty, (chosen [B, K], rejected [B, K]) H̄_k + CE_k of each source
    (``udf_uncertainty``, nats/token), and with `include_pivot` ref_uncertainty, the same [B] for v_r.
    `method="learned"` needs pair_weights, p̂ [B, K'] of the frozen ASN selector (``infifpo.selector``).
    NaN inputs raise (−inf is allowed and handled without NaN). Returns (fused_chosen, fused_rejected, FusionInfo).
    When every candidate equals v_r (e.g. all clipped to it) and the pivot is included, the selected index is the
    pivot's (K): the fused value is the pivot's whichever candidate wins the tie.
    """
    _check_pair_shapes(ref_chosen, ref_rejected, src_chosen, src_rejected)
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion method {method!r}; valid methods: {sorted(FUSIONS)}")
    if margin_against not in MARGIN_AGAINST:
        raise ValueError(f"unknown margin_against {margin_against!r}; valid values: {list(MARGIN_AGAINST)}")
    if ref_offset is not None and not ref_offset >= 0:
        raise ValueError(f"ref_offset must be >= 0 nats (or None for no clamp), got {ref_offset}")
    if bool(torch.isnan(torch.cat([ref_chosen, ref_rejected, src_chosen.flatten(), src_rejected.flatten()])).any()):
        raise ValueError("reference/source log-probs contain NaN; validate the scored pairs before fusion")
    include_pivot = resolve_include_pivot(method, include_pivot)
    pivot_w, pivot_l = ref_chosen, ref_rejected
    if margin_against == "policy":
        if policy_chosen is None or policy_rejected is None:
            raise ValueError("margin_against='policy' needs policy_chosen and policy_rejected ([B] current values)")
        _require_same_shape(ref_chosen=ref_chosen, policy_chosen=policy_chosen, policy_rejected=policy_rejected)
        pivot_w, pivot_l = policy_chosen.detach(), policy_rejected.detach()

    cand_w, cand_l = src_chosen, src_rejected
    clip_rate = torch.zeros((), dtype=torch.float32, device=src_chosen.device)
    if clip:
        cand_w, cand_l = clip_to_reference(src_chosen, src_rejected, ref_chosen, ref_rejected)
        changed = (cand_w != src_chosen).sum() + (cand_l != src_rejected).sum()
        clip_rate = changed.float() / (2 * src_chosen.numel())
    if include_pivot:  # docs/methods.md §Fusion (choice): the initial pivot counts as one more source
        cand_w = torch.cat([cand_w, ref_chosen[:, None].to(cand_w.dtype)], dim=1)
        cand_l = torch.cat([cand_l, ref_rejected[:, None].to(cand_l.dtype)], dim=1)

    extra = {}
    if method == "uncertainty":
        extra["uncertainty"] = _candidate_uncertainty(src_uncertainty, ref_uncertainty, include_pivot)
    if method == "learned":
        extra["weights"] = pair_weights
    f_w, f_l, idx_w, idx_l, weights = FUSIONS[method](cand_w, cand_l, pivot_w, pivot_l, eps, **extra)
    if include_pivot and method == "max_margin":
        # Every candidate equals v_r (e.g. all clipped to it): f = v_r whichever index wins the tie, so credit the
        # pivot in the selection metrics rather than source 0.
        idx_w = _credit_pivot_on_full_tie(cand_w, ref_chosen, idx_w)
        idx_l = _credit_pivot_on_full_tie(cand_l, ref_rejected, idx_l)
    if ref_offset is not None:  # docs/methods.md §Fusion, ref_offset (official run script; default off)
        f_w = torch.minimum(torch.maximum(f_w, ref_chosen - ref_offset), ref_chosen + ref_offset)
        f_l = torch.minimum(torch.maximum(f_l, ref_rejected - ref_offset), ref_rejected + ref_offset)
    return f_w, f_l, FusionInfo(idx_w, idx_l, clip_rate, weights, cand_w.shape[1])


def _candidate_uncertainty(src: tuple[Tensor, Tensor] | None, ref: tuple[Tensor, Tensor] | None,
                           include_pivot: bool) -> tuple[Tensor, Tensor] | None:
    """(chosen [B, K'], rejected [B, K']) H̄ + CE per candidate: the sources', then the pivot's with include_pivot."""
    if src is None:
        return None
    if not include_pivot:
        return src
    if ref is None:
        raise ValueError("uncertainty fusion with include_pivot needs ref_uncertainty (H̄ + CE of the frozen pivot)")
    return tuple(torch.cat([s, r[:, None].to(s.dtype)], dim=1) for s, r in zip(src, ref, strict=True))


def _require_positive_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def infifpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, fused_chosen: Tensor, fused_rejected: Tensor, *,
                 beta: float, loss_type: str = "sigmoid") -> Tensor:
    """Per-pair InfiFPO loss [B] (docs/methods.md §The InfiFPO loss); all inputs [B] in the same space (nats).

    h = (v_π(y_w) − f(y_w)) − (v_π(y_l) − f(y_l)). `sigmoid`: −log σ(β h) (TRL's DPO sigmoid loss with f in
    place of r). `ipo`: (h − 1/(2β))².
    """
    _require_same_shape(**{k: v for k, v in locals().items() if k.startswith(("policy", "fused"))})
    _require_positive_beta(beta)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types: {list(LOSS_TYPES)}")
    h = (policy_chosen - fused_chosen) - (policy_rejected - fused_rejected)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    return -F.logsigmoid(beta * h)


def implicit_reward(policy: Tensor, reference: Tensor, *, beta: float) -> Tensor:
    """β (v_π(y) − ref(y)) per response, detached, for logging (nats scaled by β)."""
    _require_same_shape(policy=policy, reference=reference)
    return (beta * (policy - reference)).detach()


def implicit_rewards(policy_chosen: Tensor, policy_rejected: Tensor, fused_chosen: Tensor, fused_rejected: Tensor, *,
                     beta: float) -> tuple[Tensor, Tensor]:
    """(β(v_π(y_w) − f(y_w)), β(v_π(y_l) − f(y_l))), each [B], detached: TRL's rewards/chosen and rewards/rejected."""
    chosen_rewards = implicit_reward(policy_chosen, fused_chosen, beta=beta)
    return chosen_rewards, implicit_reward(policy_rejected, fused_rejected, beta=beta)


def wrpo_alpha(step: int, total_steps: int, alpha_max: float, is_dynamic: bool = True) -> float:
    """WRPO fusion coefficient α(t) = α_max · min(1, t/T) at optimizer step t of T (docs/methods.md §WRPO).

    T must be the trainer's real number of optimizer steps (respecting max_steps and gradient accumulation).
    With `is_dynamic=False`, α is the constant α_max (the paper's ablation).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be a positive number of optimizer steps, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= alpha_max <= 1.0:
        raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
    if not is_dynamic:
        return float(alpha_max)
    return float(alpha_max) * min(1.0, step / total_steps)


def wrpo_loss(policy_source_chosen: Tensor, policy_target_chosen: Tensor, policy_rejected: Tensor,
              ref_source_chosen: Tensor, ref_target_chosen: Tensor, ref_rejected: Tensor, *,
              alpha: float | Tensor, beta: float) -> Tensor:
    """Per-row WRPO loss [B] = −log σ(α ρ(y_ws) + (1 − α) ρ(y_wt) − ρ(y_l)), ρ = β(π − r); docs/methods.md §WRPO.

    Inputs [B] are summed log-probs (nats) under the policy and the reference. α = 0 is DPO on (y_wt, y_l).
    InfiFPO-WRPO variant (docs/methods.md §The InfiFPO loss): pass fused references as the three ref_* arguments, e.g.
    f_ws = fuse_reference(r_ws, r_l, s_ws, s_l)[0] and f_wt, f_l = fuse_reference(r_wt, r_l, s_wt, s_l)[:2].
    """
    _require_same_shape(**{k: v for k, v in locals().items() if k.startswith(("policy", "ref"))})
    _require_positive_beta(beta)
    rho_ws = beta * (policy_source_chosen - ref_source_chosen)
    rho_wt = beta * (policy_target_chosen - ref_target_chosen)
    rho_l = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(alpha * rho_ws + (1 - alpha) * rho_wt - rho_l)


OPD_BASELINES = ("leave_one_out", "group_mean")


def opd_sequence_advantages(fused: Tensor, policy_detached: Tensor, group_size: int, *,
                            baseline: str = "leave_one_out") -> Tensor:
    """A_i = g_i − b_i with g = f(y) − v̂_π(y), detached [N] (docs/methods.md §On-policy distillation).

    fused, policy_detached: [N] in the same space (nats, or nats/token with LN); groups are consecutive blocks of
    `group_size` samples of one prompt, so N must be a multiple of `group_size`. `baseline`:
    "leave_one_out" (default): b_i = mean of g over the *other* G − 1 samples of the group (RLOO), = G/(G−1) times
    the group_mean advantage; b_i is independent of y_i, so with `opd_sequence_loss` the gradient is unbiased.
    "group_mean": b_i = mean over all G samples (docs/methods.md's literal text). b_i then contains g_i/G, so the score
    term's expectation is scaled by (G−1)/G while the LN pathwise term (`opd_sequence_loss`) is not: biased with LN.
    """
    _require_same_shape(fused=fused, policy_detached=policy_detached)
    if baseline not in OPD_BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid baselines: {list(OPD_BASELINES)}")
    if fused.dim() != 1 or group_size <= 0 or fused.shape[0] % group_size != 0:
        raise ValueError(f"need [N] tensors with N a multiple of group_size; got N-shape {tuple(fused.shape)}, "
                         f"group_size={group_size}")
    if baseline == "leave_one_out" and group_size < 2:
        raise ValueError("the leave_one_out baseline needs group_size >= 2 (the mean over the other samples)")
    gap = (fused - policy_detached).detach().view(-1, group_size)
    centred = gap - gap.mean(dim=1, keepdim=True)
    if baseline == "leave_one_out":  # g_i − (Σ_j g_j − g_i)/(G − 1) = G/(G − 1) · (g_i − mean_j g_j)
        centred = centred * (group_size / (group_size - 1))
    return centred.reshape(-1)


def opd_sequence_loss(policy_sum_logps: Tensor, advantages: Tensor, num_tokens: Tensor | None = None) -> Tensor:
    """Scalar score-function surrogate whose gradient estimates ∇ E_y~π[v_π(y) − f(y)] (docs/methods.md §OPD).

    policy_sum_logps: [N] summed log-probs log π(y_i) over each response (nats, differentiable); advantages: [N]
    from `opd_sequence_advantages` (detached here), in the space of v (nats/token with LN, nats without).
    num_tokens: [N] response token counts n_i when v is length-normalised (v_π = log π / n): the loss is then
    −mean_i (A_i − 1/n_i)·log π(y_i), where −1/n_i is the pathwise term E[(1/n)∇log π] of ∇E[v_π]. None (sums,
    no LN): −mean_i A_i·log π(y_i) (the pathwise term is E[∇log π] = 0). Unbiased with the leave-one-out baseline.
    """
    _require_same_shape(policy_sum_logps=policy_sum_logps, advantages=advantages)
    weight = advantages.detach()
    if num_tokens is not None:
        n = torch.as_tensor(num_tokens, device=policy_sum_logps.device)
        if tuple(n.shape) != tuple(policy_sum_logps.shape) or bool((n <= 0).any()):
            raise ValueError(f"num_tokens must be positive counts of shape {tuple(policy_sum_logps.shape)}, got "
                             f"shape {tuple(n.shape)} with min {n.min().item() if n.numel() else None}")
        weight = weight - 1.0 / n.to(policy_sum_logps.dtype)
    return -(weight * policy_sum_logps).mean()


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per position [..., V] -> [...] in nats; p = 0 terms count 0 (no 0 · −inf NaN)."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(torch.isneginf(log_p), torch.zeros_like(terms), terms).sum(dim=-1)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float, mask: Tensor | None = None,
                    temperature: float = 1.0) -> Tensor:
    """Generalised JSD (GKD, TRL's convention), mean nats per supervised token (scalar).

    Logits [..., V] over one shared vocabulary, student first; mask [...] (True = the token counts; None = all).
    With M = β·teacher + (1 − β)·student: JSD = β KL(teacher‖M) + (1 − β) KL(student‖M). Endpoints as in
    TRL's GKD: β = 0 is the forward KL(teacher‖student), β = 1 the reverse KL(student‖teacher).
    """
    _require_same_shape(student_logits=student_logits, teacher_logits=teacher_logits)
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape "
                         f"{tuple(student_logits.shape[:-1])}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD beta must be in [0, 1], got {beta}")
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        div = _kl(log_t, log_s)
    elif beta == 1:
        div = _kl(log_s, log_t)
    else:
        b = torch.tensor(beta, dtype=log_s.dtype, device=log_s.device)
        log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-b), log_t + torch.log(b)]), dim=0)
        div = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    if mask is None:
        return div.mean()
    mask = mask.to(div.dtype)
    return (div * mask).sum() / mask.sum().clamp(min=1.0)  # no supervised tokens -> 0


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(teacher ‖ student), mean nats per supervised token (mode-covering). Same arguments as generalized_jsd."""
    return generalized_jsd(student_logits, teacher_logits, 0.0, mask)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(student ‖ teacher), mean nats per supervised token (mode-seeking; GKD on-policy). Student first."""
    return generalized_jsd(student_logits, teacher_logits, 1.0, mask)
