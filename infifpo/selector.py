"""The ASN selector of `learned` fusion as pure torch: features, network, threshold selection, loss, training loop.

docs/methods.md §Fusion strategies from the seed papers, "ASN, `learned`". Owns: the per-candidate feature tensor
of a preference pair, ``SelectorNet`` (per-candidate LayerNorm, then Linear(F, 2F) → GELU → Linear(2F, F) → GELU →
Linear(F, K') over the concatenation, Xavier-uniform; softmax), the τ selection with the argmax fallback and the
renormalised weights p̂, the CV² feedback term, the selector loss, and fitting the network on tensors. Does not own:
reading rows or writing checkpoints (``trainers.selector``), or applying given weights inside the fused reference
(``fusion.fuse_learned``). Imports torch and ``infifpo.fusion`` only.

Shapes: B pairs, K' candidates (the K sources, then the frozen pivot when ``include_pivot``), d features per
candidate, F = K'·d. Values c_k are the caller's space (docs/methods.md §LN: nats/token with LN, nats without),
clipped against the frozen pivot when clipping is on (``candidate_values``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infifpo import fusion

FEEDBACK = ("batch", "per_sample")
# p̂ = p ⊙ mask / (Σ p ⊙ mask + WEIGHT_EPS) and CV² = Var/(Mean² + CV_EPS): docs/methods.md §ASN.
WEIGHT_EPS = 1e-8
CV_EPS = 1e-8


def candidate_values(ref_chosen: Tensor, ref_rejected: Tensor, src_chosen: Tensor, src_rejected: Tensor, *,
                     clip: bool, include_pivot: bool) -> tuple[Tensor, Tensor]:
    """(c(y_w), c(y_l)), each [B, K']: the sources' values [B, K], clipped against the frozen pivot [B] when ``clip``
    (docs/methods.md §Probability clipping), then v_r appended as candidate K when ``include_pivot``. The same
    candidates ``fusion.fuse_reference`` builds before it fuses."""
    cand_w, cand_l = src_chosen, src_rejected
    if clip:
        cand_w, cand_l = fusion.clip_to_reference(src_chosen, src_rejected, ref_chosen, ref_rejected)
    if include_pivot:
        cand_w = torch.cat([cand_w, ref_chosen[:, None].to(cand_w.dtype)], dim=1)
        cand_l = torch.cat([cand_l, ref_rejected[:, None].to(cand_l.dtype)], dim=1)
    return cand_w, cand_l


def pair_features(cand_chosen: Tensor, cand_rejected: Tensor, log_tokens_chosen: Tensor, log_tokens_rejected: Tensor,
                  domain_onehot: Tensor, entropy_chosen: Tensor | None = None,
                  entropy_rejected: Tensor | None = None) -> Tensor:
    """The selector's input [B, K', d], per candidate k in this order (docs/methods.md §ASN):
    c_k(y_w), c_k(y_l), [H̄_k(y_w), H̄_k(y_l) when given], log m_k(y_w), log m_k(y_l), the pair's domain one-hot.

    cand_*: [B, K'] candidate values (``candidate_values``); log_tokens_*: [B, K'] log of each candidate's token count
    of the response (its own tokenizer); entropy_*: [B, K'] mean next-token entropy, nats/token, or both None;
    domain_onehot: [B, D], the same for every candidate. d = 4 + D, or 6 + D with entropies.
    """
    if (entropy_chosen is None) != (entropy_rejected is None):
        raise ValueError("give both entropy_chosen and entropy_rejected, or neither")
    per_cand = [cand_chosen, cand_rejected]
    if entropy_chosen is not None:
        per_cand += [entropy_chosen, entropy_rejected]
    per_cand += [log_tokens_chosen, log_tokens_rejected]
    shapes = {tuple(x.shape) for x in per_cand}
    if len(shapes) != 1 or cand_chosen.dim() != 2:
        raise ValueError(f"per-candidate inputs must all be [B, K'], got shapes {sorted(shapes)}")
    if domain_onehot.dim() != 2 or domain_onehot.shape[0] != cand_chosen.shape[0]:
        raise ValueError(f"domain_onehot must be [B, D] with B={cand_chosen.shape[0]}, got "
                         f"{tuple(domain_onehot.shape)}")
    stacked = torch.stack([x.to(torch.float32) for x in per_cand], dim=-1)  # [B, K', 4 or 6]
    domain = domain_onehot.to(torch.float32)[:, None, :].expand(-1, cand_chosen.shape[1], -1)
    return torch.cat([stacked, domain], dim=-1)


class SelectorNet(nn.Module):
    """p = softmax(MLP(concat_k LayerNorm(x_k))) [B, K'] from features x [B, K', d] (docs/methods.md §ASN).

    One LayerNorm over each candidate's d features (its affine parameters shared by the candidates); the MLP is
    Linear(F, 2F) → GELU → Linear(2F, F) → GELU → Linear(F, K') with F = K'·d, weights Xavier-uniform, biases 0.
    """

    def __init__(self, num_candidates: int, num_features: int, *, seed: int = 0):
        super().__init__()
        if num_candidates < 1 or num_features < 1:
            raise ValueError(f"need >= 1 candidate and feature, got K'={num_candidates}, d={num_features}")
        self.num_candidates, self.num_features = num_candidates, num_features
        width = num_candidates * num_features
        self.norm = nn.LayerNorm(num_features)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width), nn.GELU(),
                                 nn.Linear(width, num_candidates))
        generator = torch.Generator().manual_seed(seed)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight, generator=generator)
                nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> Tensor:
        if tuple(features.shape[1:]) != (self.num_candidates, self.num_features):
            raise ValueError(f"features must be [B, {self.num_candidates}, {self.num_features}], got "
                             f"{tuple(features.shape)}")
        return torch.softmax(self.mlp(self.norm(features).flatten(1)), dim=-1)


def select_weights(probs: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(p̂ [B, K'], mask [B, K'] bool) from the selector's softmax p [B, K'] (docs/methods.md §ASN).

    mask_k = p_k > τ; a pair where no candidate passes keeps its argmax (lowest index on ties);
    p̂ = p ⊙ mask / (Σ_k p ⊙ mask + 1e-8). The mask is not differentiated; p̂ is, through p.
    """
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    mask = probs.detach() > tau
    argmax = F.one_hot(probs.detach().argmax(dim=-1), probs.shape[-1]).bool()
    mask = torch.where(mask.any(dim=-1, keepdim=True), mask, argmax)
    kept = probs * mask
    return kept / (kept.sum(dim=-1, keepdim=True) + WEIGHT_EPS), mask


def cv_squared(x: Tensor) -> Tensor:
    """CV² = Var(x)/(Mean(x)² + 1e-8) over the last dim (docs/methods.md §ASN); Var with Bessel's correction
    (torch.var's default, as the MoE load-balancing loss the feedback term follows). 0 for one element."""
    if x.shape[-1] < 2:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    return x.var(dim=-1) / (x.mean(dim=-1) ** 2 + CV_EPS)


def feedback_loss(weights: Tensor, feedback: str = "batch") -> Tensor:
    """The feedback term CV²(I), a scalar, from the batch's p̂ [B, K'] (docs/methods.md §ASN).

    "batch" (default): I_k = Σ_pairs p̂_k, CV² of that [K'] vector. "per_sample" (the paper's Eq. 9 form as read
    here): CV² of each pair's own p̂ [K'], averaged over the batch.
    """
    if feedback == "batch":
        return cv_squared(weights.sum(dim=0))
    if feedback == "per_sample":
        return cv_squared(weights).mean()
    raise ValueError(f"unknown feedback {feedback!r}; valid values: {list(FEEDBACK)}")


@dataclass
class SelectorLoss:
    """One selector step's loss and its parts (scalars): total = preference + λ_feed · feedback."""

    total: Tensor
    preference: Tensor
    feedback: Tensor
    agreement: Tensor  # fraction of pairs with f(y_w) > f(y_l)


def selector_loss(weights: Tensor, cand_chosen: Tensor, cand_rejected: Tensor, *, beta_s: float = 1.0,
                  lambda_feed: float = 0.5, feedback: str = "batch") -> SelectorLoss:
    """L = mean_pairs −log σ(β_s (f(y_w) − f(y_l))) + λ_feed · CV²(I) (docs/methods.md §ASN).

    weights: p̂ [B, K'] (``select_weights``); cand_*: [B, K'] candidate values; f(y) = Σ_k p̂_k c_k(y), one weight
    vector per pair. β_s > 0; λ_feed >= 0 (0: no feedback term).
    """
    if not beta_s > 0:
        raise ValueError(f"beta_s must be > 0, got {beta_s}")
    if not lambda_feed >= 0:
        raise ValueError(f"lambda_feed must be >= 0, got {lambda_feed}")
    f_w = (weights * cand_chosen).sum(dim=-1)
    f_l = (weights * cand_rejected).sum(dim=-1)
    preference = -F.logsigmoid(beta_s * (f_w - f_l)).mean()
    cv2 = feedback_loss(weights, feedback)
    return SelectorLoss(preference + lambda_feed * cv2, preference, cv2, (f_w > f_l).float().mean().detach())


@dataclass
class SelectorTraining:
    """How the selector is fitted (docs/methods.md §ASN; the optimiser settings are this package's choice)."""

    tau: float = 0.15
    beta_s: float = 1.0
    lambda_feed: float = 0.5
    feedback: str = "batch"
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0


def fit_selector(features: Tensor, cand_chosen: Tensor, cand_rejected: Tensor,
                 opts: SelectorTraining) -> tuple[SelectorNet, list[dict[str, float | list[float]]]]:
    """Fit a fresh ``SelectorNet`` with Adam on the selector loss; returns it frozen (eval, no grad) and the training
    curve: one entry per optimiser step {step, epoch, loss, preference_loss, feedback_cv2, agreement, importance}
    (importance: the batch's mean p̂ per candidate). Shuffled mini-batches from ``opts.seed``; deterministic."""
    if features.shape[0] == 0:
        raise ValueError("no pairs to fit the selector on")
    if opts.feedback not in FEEDBACK:
        raise ValueError(f"unknown feedback {opts.feedback!r}; valid values: {list(FEEDBACK)}")
    if opts.epochs < 1 or opts.batch_size < 1 or not opts.lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and lr > 0, got {opts}")
    net = SelectorNet(features.shape[1], features.shape[2], seed=opts.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=opts.lr)
    generator = torch.Generator().manual_seed(opts.seed)
    n, curve = features.shape[0], []
    steps_per_epoch = math.ceil(n / opts.batch_size)
    for epoch in range(opts.epochs):
        order = torch.randperm(n, generator=generator)
        for b in range(steps_per_epoch):
            idx = order[b * opts.batch_size:(b + 1) * opts.batch_size]
            weights, _ = select_weights(net(features[idx]), opts.tau)
            loss = selector_loss(weights, cand_chosen[idx].float(), cand_rejected[idx].float(), beta_s=opts.beta_s,
                                 lambda_feed=opts.lambda_feed, feedback=opts.feedback)
            optimizer.zero_grad()
            loss.total.backward()
            optimizer.step()
            curve.append({"step": len(curve) + 1, "epoch": epoch + 1, "loss": loss.total.item(),
                          "preference_loss": loss.preference.item(), "feedback_cv2": loss.feedback.item(),
                          "agreement": loss.agreement.item(), "importance": weights.detach().mean(dim=0).tolist()})
    net.eval().requires_grad_(False)
    return net, curve


def selector_weights(net: SelectorNet, features: Tensor, tau: float) -> Tensor:
    """p̂ [B, K'] of a frozen selector, without gradients (the fused reference's weights in InfiFPO)."""
    with torch.no_grad():
        return select_weights(net(features), tau)[0]
