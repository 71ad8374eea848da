"""Tests of `infifpo.fusion` against arithmetic written out by hand (docs/methods.md is the contract).

The running example (mean per-token log-probs, nats), B = 2 pairs, K = 2 sources:

    row 0: r_w = -1.0, r_l = -2.0, s_w = [-0.5, -1.5], s_l = [-2.5, -1.2]
    row 1: r_w = -2.0, r_l = -1.0, s_w = [-3.0, -2.5], s_l = [-0.8, -1.4]

Clipped (c_w = max(s_w, r_w), c_l = min(s_l, r_l)):

    row 0: c_w = [-0.5, -1.0]  c_l = [-2.5, -2.0]    (s_w[1], s_l[1] changed)
    row 1: c_w = [-2.0, -2.0]  c_l = [-1.0, -1.4]    (s_w[0], s_w[1], s_l[0] changed)  -> clip_rate = 5/8
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from infifpo import fusion
from infifpo.fusion import (
    FUSIONS,
    clip_to_reference,
    forward_kl,
    fuse_reference,
    generalized_jsd,
    implicit_rewards,
    infifpo_loss,
    length_normalize,
    opd_sequence_advantages,
    opd_sequence_loss,
    reverse_kl,
    wrpo_alpha,
    wrpo_loss,
)

T = torch.tensor


def example():
    ref_w, ref_l = T([-1.0, -2.0]), T([-2.0, -1.0])
    src_w, src_l = T([[-0.5, -1.5], [-3.0, -2.5]]), T([[-2.5, -1.2], [-0.8, -1.4]])
    return ref_w, ref_l, src_w, src_l


def fuse(method, **kw):
    return fuse_reference(*example(), method=method, **kw)


# ---------------------------------------------------------------------------------------------------------------
# length normalisation and clipping
# ---------------------------------------------------------------------------------------------------------------


def test_length_normalize_divides_by_own_count():
    # -12 nats over 4 tokens = -3 nats/token; -5 over 10 = -0.5
    out = length_normalize(T([-12.0, -5.0]), torch.tensor([4, 10]))
    torch.testing.assert_close(out, T([-3.0, -0.5]))


@pytest.mark.parametrize("bad", [0, -3])
def test_length_normalize_rejects_non_positive_counts(bad):
    with pytest.raises(ValueError, match=r"n_tokens must be positive.*index \(1,\)"):
        length_normalize(T([-12.0, -5.0]), torch.tensor([4, bad]))


def test_clip_to_reference_by_hand():
    ref_w, ref_l, src_w, src_l = example()
    c_w, c_l = clip_to_reference(src_w, src_l, ref_w, ref_l)
    torch.testing.assert_close(c_w, T([[-0.5, -1.0], [-2.0, -2.0]]))
    torch.testing.assert_close(c_l, T([[-2.5, -2.0], [-1.0, -1.4]]))
    assert fuse("mean")[2].clip_rate.item() == pytest.approx(5 / 8)
    assert fuse("mean", clip=False)[2]["clip_rate"].item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# every fusion method on the running example
# ---------------------------------------------------------------------------------------------------------------


def test_max_margin_clip_on():
    """D = |exp(c) - exp(r)|; candidates [c_0, c_1, r] (index 2 = pivot).

    row 0 w: D = [e^-0.5 - e^-1 = 0.2387, 0, 0]                 -> k* = 0, f = -0.5
    row 0 l: D = [e^-2 - e^-2.5 = 0.0533, 0, 0]                 -> k* = 0, f = -2.5
    row 1 w: D = [0, 0, 0] (all clipped to r)                   -> f = -2.0, credited to the pivot (index 2)
                                                                   when it is a candidate, else index 0
    row 1 l: D = [0, e^-1 - e^-1.4 = 0.1213, 0]                 -> k* = 1, f = -1.4
    """
    for include_pivot in (True, False):
        f_w, f_l, info = fuse("max_margin", include_pivot=include_pivot)
        torch.testing.assert_close(f_w, T([-0.5, -2.0]))
        torch.testing.assert_close(f_l, T([-2.5, -1.4]))
        assert info.chosen_index.tolist() == [0, 2 if include_pivot else 0]
        assert info.rejected_index.tolist() == [0, 1]
        assert info.num_candidates == (3 if include_pivot else 2) and info.weights is None


def test_max_margin_clip_off():
    """Raw sources: row 0 l: D = [e^-2 - e^-2.5 = 0.0533, e^-1.2 - e^-2 = 0.1659, 0] -> k* = 1, f = -1.2
    row 1 w: D = [e^-2 - e^-3 = 0.0855, e^-2 - e^-2.5 = 0.0533, 0] -> k* = 0, f = -3.0
    row 0 w: D = [0.2387, e^-1 - e^-1.5 = 0.1447, 0] -> 0;  row 1 l: D = [e^-0.8 - e^-1 = 0.0814, 0.1213, 0] -> 1
    """
    f_w, f_l, info = fuse("max_margin", clip=False)
    torch.testing.assert_close(f_w, T([-0.5, -3.0]))
    torch.testing.assert_close(f_l, T([-1.2, -1.4]))
    assert info.chosen_index.tolist() == [0, 0] and info.rejected_index.tolist() == [1, 1]


def test_max_margin_pair():
    """Pair margins c_w - c_l over [source 0, source 1, pivot].

    clip on : row 0: [-0.5+2.5 = 2.0, -1+2 = 1.0, -1+2 = 1.0] -> 0 (f = -0.5, -2.5)
              row 1: [-2+1 = -1.0, -2+1.4 = -0.6, -2+1 = -1.0] -> 1 (f = -2.0, -1.4)
    clip off: row 1: [-3+0.8 = -2.2, -2.5+1.4 = -1.1, -2+1 = -1.0] -> pivot 2 (f = -2.0, -1.0);
              without the pivot -> 1 (f = -2.5, -1.4)
    """
    f_w, f_l, info = fuse("max_margin_pair")
    torch.testing.assert_close(torch.stack([f_w, f_l]), T([[-0.5, -2.0], [-2.5, -1.4]]))
    assert info.chosen_index.tolist() == info.rejected_index.tolist() == [0, 1]
    f_w, f_l, info = fuse("max_margin_pair", clip=False)
    torch.testing.assert_close(torch.stack([f_w, f_l]), T([[-0.5, -2.0], [-2.5, -1.0]]))
    assert info.chosen_index.tolist() == [0, 2]
    f_w, f_l, info = fuse("max_margin_pair", clip=False, include_pivot=False)
    torch.testing.assert_close(torch.stack([f_w, f_l]), T([[-0.5, -2.5], [-2.5, -1.4]]))
    assert info.chosen_index.tolist() == [0, 1]


def test_mean():
    """clip on + pivot: row 0: w (-0.5-1-1)/3, l (-2.5-2-2)/3; row 1: w -2, l (-1-1.4-1)/3.
    clip off, no pivot: row 0: w (-0.5-1.5)/2 = -1, l (-2.5-1.2)/2 = -1.85; row 1: w -2.75, l (-0.8-1.4)/2 = -1.1
    """
    f_w, f_l, info = fuse("mean", include_pivot=True)
    torch.testing.assert_close(f_w, T([-2.5 / 3, -2.0]))
    torch.testing.assert_close(f_l, T([-6.5 / 3, -3.4 / 3]))
    assert info.chosen_index is None and info.rejected_index is None
    f_w, f_l, _ = fuse("mean", clip=False, include_pivot=False)
    torch.testing.assert_close(f_w, T([-1.0, -2.75]))
    torch.testing.assert_close(f_l, T([-1.85, -1.1]))


def test_confidence():
    """w ∝ 1/(-c + eps) (eps = 1e-6 is below the tolerance), f = Σ w c.

    clip on + pivot, row 0 w: c = [-0.5, -1, -1] -> 1/|c| = [2, 1, 1] -> w = [0.5, 0.25, 0.25], f = -0.75
                     row 0 l: c = [-2.5, -2, -2] -> [0.4, 0.5, 0.5] / 1.4, f = -(1 + 1 + 1)/1.4 = -3/1.4
                     row 1 l: c = [-1, -1.4, -1] -> [1, 1/1.4, 1], f = -3 / (2 + 1/1.4)
    clip off, no pivot, row 1 w: c = [-3, -2.5] -> [1/3, 0.4] / (11/15) = [5/11, 6/11], f = -(1 + 1)/(11/15) = -30/11
    """
    f_w, f_l, info = fuse("confidence", include_pivot=True)
    torch.testing.assert_close(f_w, T([-0.75, -2.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(f_l, T([-3 / 1.4, -3 / (2 + 1 / 1.4)]), atol=1e-5, rtol=0)
    w_w, w_l = info.weights
    torch.testing.assert_close(w_w[0], T([0.5, 0.25, 0.25]), atol=1e-5, rtol=0)
    torch.testing.assert_close(w_l[0], T([0.4, 0.5, 0.5]) / 1.4, atol=1e-5, rtol=0)
    torch.testing.assert_close(w_w[1], T([1 / 3, 1 / 3, 1 / 3]), atol=1e-6, rtol=0)
    f_w, _, info = fuse("confidence", clip=False, include_pivot=False)
    torch.testing.assert_close(f_w[1], T(-30 / 11), atol=1e-5, rtol=0)
    torch.testing.assert_close(info.weights[0][1], T([5 / 11, 6 / 11]), atol=1e-5, rtol=0)


def test_include_pivot_defaults_weight_the_sources_only_in_mean_and_confidence():
    """docs/methods.md §Fusion (choice): mean/confidence default to the N sources only (the paper's arms, γ_i = 1/N).

    clip on, row 0: chosen c = [max(-0.5, -1), max(-1.5, -1)] = [-0.5, -1]; rejected c = [min(-2.5, -2),
    min(-1.2, -2)] = [-2.5, -2]. mean: f_w = -0.75, f_l = -2.25 (with the pivot: -2.5/3, -6.5/3).
    confidence: 1/|c| = [2, 1] -> w = [2/3, 1/3], f_w = -(1 + 1)/3 = -2/3; rejected [0.4, 0.5] -> f_l = -2/0.9.
    """
    f_w, f_l, info = fuse("mean")
    assert (f_w[0].item(), f_l[0].item()) == pytest.approx((-0.75, -2.25)) and info.num_candidates == 2
    f_w, f_l, info = fuse("confidence")
    assert (f_w[0].item(), f_l[0].item()) == pytest.approx((-2 / 3, -2 / 0.9), abs=1e-5)
    assert info.weights[0][0].tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-5)
    for method in ("max_margin", "max_margin_pair"):  # the pivot only breaks ties there: included by default
        assert fuse(method)[2].num_candidates == 3


def udf_example():
    """Mean entropies H̄ (nats/token): sources [B, K] and pivot [B] for the running example (whose values are means)."""
    return (T([[0.5, 0.5], [1.0, 0.5]]), T([[1.5, 0.8], [0.2, 0.6]])), (T([1.0, 0.5]), T([0.5, 1.0]))


def test_uncertainty_weights_by_hand():
    """docs/methods.md §UDF: w_k ∝ 1/(H̄_k + CE_k + eps), CE_k = −s̄_k (unclipped), f = Σ w_k c_k on the clipped c.

    clip on, sources only:
    row 0 w: u = [0.5 + 0.5, 0.5 + 1.5] = [1, 2] -> w = [2/3, 1/3]; c = [-0.5, -1.0] -> f = -1/3 - 1/3 = -2/3
    row 0 l: u = [1.5 + 2.5, 0.8 + 1.2] = [4, 2] -> w = [1/3, 2/3]; c = [-2.5, -2.0] -> f = -(2.5 + 4)/3 = -6.5/3
    row 1 w: u = [1 + 3, 0.5 + 2.5] = [4, 3] -> w = [1/4, 1/3]/(7/12) = [3/7, 4/7]; c = [-2, -2] -> f = -2
    row 1 l: u = [0.2 + 0.8, 0.6 + 1.4] = [1, 2] -> w = [2/3, 1/3]; c = [-1.0, -1.4] -> f = -(2 + 1.4)/3 = -3.4/3
    with the pivot (r_w = -1 with H̄ 1, so u = 2), row 0 w: 1/u = [1, 1/2, 1/2] -> w = [1/2, 1/4, 1/4];
    c = [-0.5, -1, -1] -> f = -0.25 - 0.25 - 0.25 = -0.75
    """
    (h_w, h_l), (hr_w, hr_l) = udf_example()
    ref_w, ref_l, src_w, src_l = example()
    src_u = (fusion.udf_uncertainty(h_w, src_w), fusion.udf_uncertainty(h_l, src_l))
    f_w, f_l, info = fuse("uncertainty", src_uncertainty=src_u)
    torch.testing.assert_close(f_w, T([-2 / 3, -2.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(f_l, T([-6.5 / 3, -3.4 / 3]), atol=1e-5, rtol=0)
    assert info.chosen_index is None and info.num_candidates == 2
    torch.testing.assert_close(info.shares("chosen", 2), T([[2 / 3, 1 / 3], [3 / 7, 4 / 7]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(info.shares("rejected", 2), T([[1 / 3, 2 / 3], [2 / 3, 1 / 3]]), atol=1e-5, rtol=0)
    ref_u = (fusion.udf_uncertainty(hr_w, ref_w), fusion.udf_uncertainty(hr_l, ref_l))
    f_w, _, info = fuse("uncertainty", include_pivot=True, src_uncertainty=src_u, ref_uncertainty=ref_u)
    assert f_w[0].item() == pytest.approx(-0.75, abs=1e-5)
    assert info.weights[0][0].tolist() == pytest.approx([0.5, 0.25, 0.25], abs=1e-5)


def test_uncertainty_with_one_source_is_that_source():
    """One source: w = 1, so f(y) = c_1(y), the clipped value (max(s, r) on chosen, min(s, r) on rejected)."""
    ref_w, ref_l = T([-1.0, -2.0, -0.3]), T([-2.0, -1.0, -0.4])
    src_w, src_l = T([[-0.5], [-3.0], [-0.3]]), T([[-2.5], [-0.8], [-0.9]])
    u = (T([[0.7], [2.0], [0.0]]), T([[3.1], [0.1], [1e-9]]))
    f_w, f_l, info = fuse_reference(ref_w, ref_l, src_w, src_l, method="uncertainty", src_uncertainty=u)
    torch.testing.assert_close(f_w, T([-0.5, -2.0, -0.3]))
    torch.testing.assert_close(f_l, T([-2.5, -1.0, -0.9]))
    assert info.shares("chosen", 3).tolist() == [[1.0], [1.0], [1.0]]
    f_w, f_l, _ = fuse_reference(ref_w, ref_l, src_w, src_l, method="uncertainty", src_uncertainty=u, clip=False)
    torch.testing.assert_close((f_w, f_l), (src_w[:, 0], src_l[:, 0]))


def test_uncertainty_refuses_missing_or_negative_inputs():
    (h_w, h_l), _ = udf_example()
    ref_w, ref_l, src_w, src_l = example()
    with pytest.raises(ValueError, match="needs src_uncertainty"):
        fuse("uncertainty")
    with pytest.raises(ValueError, match="include_pivot needs ref_uncertainty"):
        fuse("uncertainty", include_pivot=True, src_uncertainty=(h_w, h_l))
    with pytest.raises(ValueError, match=r"must be >= 0"):
        fuse("uncertainty", src_uncertainty=(h_w - 1.0, h_l))
    with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
        fuse("uncertainty", src_uncertainty=(h_w[:, :1], h_l))


def test_confidence_rejects_positive_log_probs():
    ref_w, ref_l, src_w, src_l = example()
    with pytest.raises(ValueError, match="confidence fusion needs log-probs <= 0"):
        fuse_reference(ref_w, ref_l, src_w.abs(), src_l, method="confidence")


def test_ref_offset_clamps_into_band_around_pivot():
    """r_w = -1, r_l = -2; one source s_w = -0.2, s_l = -4.0 -> max_margin gives f = (-0.2, -4.0).
    ref_offset 0.5 -> f_w = min(-0.2, -1 + 0.5) = -0.5, f_l = max(-4.0, -2 - 0.5) = -2.5; ref_offset 5 -> unchanged.
    clip off with s_l = -1.0 above r_l: f_l = -1.0 -> min(-1.0, -2 + 0.5) = -1.5.
    """
    args = (T([-1.0]), T([-2.0]), T([[-0.2]]), T([[-4.0]]))
    f_w, f_l, _ = fuse_reference(*args, ref_offset=0.5)
    torch.testing.assert_close(torch.cat([f_w, f_l]), T([-0.5, -2.5]))
    f_w, f_l, _ = fuse_reference(*args, ref_offset=5.0)
    torch.testing.assert_close(torch.cat([f_w, f_l]), T([-0.2, -4.0]))
    _, f_l, _ = fuse_reference(T([-1.0]), T([-2.0]), T([[-0.2]]), T([[-1.0]]), clip=False, ref_offset=0.5)
    torch.testing.assert_close(f_l, T([-1.5]))


def test_margin_against_policy_measures_d_from_current_policy():
    """r_w = -1, s_w = [-0.5, -0.6] (both above r, clipping changes nothing).

    init  : D = [e^-0.5 - e^-1 = 0.2387, e^-0.6 - e^-1 = 0.1809, 0]                     -> source 0, f = -0.5
    policy v_π(y_w) = -0.55: D = [e^-0.5 - e^-0.55 = 0.0296, e^-0.55 - e^-0.6 = 0.0281,
                                  e^-0.55 - e^-1 = 0.2090]                              -> pivot 2, f = -1.0
    """
    args = (T([-1.0]), T([-2.0]), T([[-0.5, -0.6]]), T([[-2.2, -2.1]]))
    f_w, _, info = fuse_reference(*args)
    assert f_w.item() == pytest.approx(-0.5) and info.chosen_index.tolist() == [0]
    pol_w = T([-0.55], requires_grad=True)
    f_w, f_l, info = fuse_reference(*args, margin_against="policy", policy_chosen=pol_w, policy_rejected=T([-2.0]))
    assert f_w.item() == pytest.approx(-1.0) and info.chosen_index.tolist() == [2]
    assert not f_w.requires_grad  # the policy only steers the selection; f stays a constant reference
    # policy_rejected equals r_l, so the rejected side matches init: D = [e^-2 - e^-2.2, e^-2 - e^-2.1, 0] -> 0
    assert f_l.item() == pytest.approx(-2.2) and info.rejected_index.tolist() == [0]
    with pytest.raises(ValueError, match="needs policy_chosen and policy_rejected"):
        fuse_reference(*args, margin_against="policy")


# ---------------------------------------------------------------------------------------------------------------
# max-margin: the closed form, tie-breaks, log-space stability
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_two_max_margin_forms_agree(seed):
    """With clip on and margin_against=init: f(y_w) = max(v_r, max_k v_k(y_w)), f(y_l) = min(v_r, min_k v_k(y_l))."""
    g = torch.Generator().manual_seed(seed)
    scale = [3.0, 600.0][seed % 2]  # per-token means and summed log-probs
    ref_w, ref_l = -scale * torch.rand(16, generator=g), -scale * torch.rand(16, generator=g)
    src_w, src_l = -scale * torch.rand(16, 3, generator=g), -scale * torch.rand(16, 3, generator=g)
    if seed % 4 < 2:  # coarse values so that exact ties between sources and with the pivot occur
        ref_w, ref_l, src_w, src_l = (torch.round(x) for x in (ref_w, ref_l, src_w, src_l))
    for include_pivot in (True, False):
        f_w, f_l, _ = fuse_reference(ref_w, ref_l, src_w, src_l, include_pivot=include_pivot)
        assert torch.equal(f_w, torch.maximum(ref_w, src_w.amax(dim=1)))
        assert torch.equal(f_l, torch.minimum(ref_l, src_l.amin(dim=1)))


def test_tie_break_saturated_d_prefers_larger_distance_then_lowest_index():
    """r = -1; sources [-51, -61, -61]. Exactly, D = e^-1 (1 - e^-50) < e^-1 (1 - e^-60), but in floating point all
    three D equal e^-1 (e^-50 ≈ 2e-22 is below float64 resolution at e^-1), so a naive argmax over D picks 0.
    Tie-break: larger |c - r| (60 > 50) -> sources 1 and 2, then the lowest index -> 1, f = -61.
    For y_l clipping keeps all three (they are below r_l); for y_w use clip=False.
    """
    ref, src = T([-1.0], dtype=torch.float64), T([[-51.0, -61.0, -61.0]], dtype=torch.float64)
    naive_d = (src.exp() - ref.exp()[:, None]).abs()
    assert naive_d.argmax(dim=1).item() == 0  # the saturation this tie-break exists for
    for clip in (True, False):
        f_w, f_l, info = fuse_reference(ref, ref, src, src, clip=clip)
        assert info.rejected_index.item() == 1 and f_l.item() == -61.0
        if not clip:
            assert info.chosen_index.item() == 1 and f_w.item() == -61.0
    # exactly equal candidates: lowest index
    _, f_l, info = fuse_reference(T([-1.0]), T([-1.0]), T([[-3.0, -3.0]]), T([[-3.0, -3.0]]))
    assert info.rejected_index.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_space_margin_stays_finite_and_correct_near_minus_5000(dtype):
    """exp(-5000) underflows to 0, so D compared in probability space would be all zeros.

    y_w: r = -5000, s = [-4999, -4998.5, -5003] -> c = [-4999, -4998.5, -5000 (clipped)]; log D = c + log1p(-e^-(c-r))
         = [-4999 - 0.459, -4998.5 - 0.252, -inf, -inf] -> k* = 1, f = -4998.5
    y_l: r = -5200, s = [-5201, -5200.5, -5300]: log D = r + log1p(-e^-|c-r|) = [-5200.459, -5200.933, -5200 - 4e-44]
         -> k* = 2, f = -5300
    clip off, y_w: s = [-4999, -5001]: log D = [-5000 + log(e - 1) = -4999.459, -5000 + log(1 - e^-1) = -5000.459] -> 0
    """
    t = lambda v: T(v, dtype=dtype)  # noqa: E731
    assert torch.exp(t(-5000.0)).item() == 0.0
    f_w, f_l, info = fuse_reference(
        t([-5000.0]), t([-5200.0]), t([[-4999, -4998.5, -5003]]), t([[-5201, -5200.5, -5300]])
    )
    assert (info.chosen_index.item(), info.rejected_index.item()) == (1, 2)
    assert (f_w.item(), f_l.item()) == (-4998.5, -5300.0) and torch.isfinite(torch.cat([f_w, f_l])).all()
    _, _, info = fuse_reference(t([-5000.0]), t([-5200.0]), t([[-4999, -5001]]), t([[-5201, -5199]]), clip=False)
    assert info.chosen_index.item() == 0
    # y_l clip off: s = [-5201, -5199]: log D = [-5200.459, -5199 + log(1 - e^-1) = -5199.459] -> 1 (above wins)
    assert info.rejected_index.item() == 1


def test_minus_inf_source_is_handled_without_nan():
    """C9: a source that gives y_l probability 0 (-inf) has D = e^r, the largest possible below r -> selected."""
    f_w, f_l, info = fuse_reference(T([-1.0]), T([-2.0]), T([[-0.5, -1.5]]), T([[-float("inf"), -2.5]]))
    assert f_l.item() == -float("inf") and info.rejected_index.item() == 0 and f_w.item() == -0.5


@pytest.mark.parametrize("seed", range(10))
def test_max_margin_pair_picks_pair_margin_argmax(seed):
    g = torch.Generator().manual_seed(seed)
    ref_w, ref_l = -5 * torch.rand(8, generator=g), -5 * torch.rand(8, generator=g)
    src_w, src_l = -5 * torch.rand(8, 4, generator=g), -5 * torch.rand(8, 4, generator=g)
    f_w, f_l, info = fuse_reference(ref_w, ref_l, src_w, src_l, method="max_margin_pair", clip=False)
    for b in range(8):  # written-out argmax over [source margins..., pivot margin]
        margins = [src_w[b, k].item() - src_l[b, k].item() for k in range(4)] + [ref_w[b].item() - ref_l[b].item()]
        k_star = max(range(5), key=lambda k: (margins[k], -k))
        assert info.chosen_index[b].item() == k_star
        assert (f_w[b] - f_l[b]).item() == pytest.approx(margins[k_star], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------------------


def test_infifpo_sigmoid_and_ipo_by_hand():
    """v_π = (-1.0, -3.0), f = (-1.2, -2.5), β = 0.5: h = (-1 + 1.2) - (-3 + 2.5) = 0.2 + 0.5 = 0.7.
    sigmoid: -log σ(0.5 · 0.7) = log(1 + e^-0.35) = 0.533154; ipo: (0.7 - 1/(2 · 0.5))^2 = 0.09.
    rewards: 0.5 · 0.2 = 0.1 and 0.5 · (-0.5) = -0.25.
    """
    args = (T([-1.0]), T([-3.0]), T([-1.2]), T([-2.5]))
    assert infifpo_loss(*args, beta=0.5).item() == pytest.approx(math.log(1 + math.exp(-0.35)), abs=1e-6)
    assert infifpo_loss(*args, beta=0.5, loss_type="ipo").item() == pytest.approx(0.09, abs=1e-6)
    r_w, r_l = implicit_rewards(*args, beta=0.5)
    assert (r_w.item(), r_l.item()) == (pytest.approx(0.1), pytest.approx(-0.25))


@pytest.mark.parametrize("method", sorted(FUSIONS))
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("include_pivot", [True, False])
@pytest.mark.parametrize("ref_offset", [None, 3.0])
def test_single_source_equal_to_reference_is_dpo(method, clip, include_pivot, ref_offset):
    """docs/methods.md sanity identity, LN off (sums): f = r, so the loss is -log σ(β[(π_w - r_w) - (π_l - r_l)])."""
    g = torch.Generator().manual_seed(0)
    r_w, r_l = (
        -200 * torch.rand(6, generator=g, dtype=torch.float64),
        -200 * torch.rand(6, generator=g, dtype=torch.float64),
    )
    pi_w = (r_w + torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_()
    pi_l = (r_l + torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_()
    extra = {}
    if method == "uncertainty":  # any non-negative H̄ + CE: one candidate value, or all equal to r
        u = torch.rand(2, 6, generator=g, dtype=torch.float64)
        extra = {"src_uncertainty": (u[0, :, None], u[1, :, None]), "ref_uncertainty": (u[1], u[0])}
    if method == "learned":  # any selector weights p̂ summing to 1: every candidate equals r
        w = torch.rand(6, 2 if include_pivot else 1, generator=g, dtype=torch.float64)
        extra = {"pair_weights": w / w.sum(dim=1, keepdim=True)}
    f_w, f_l, _ = fuse_reference(
        r_w, r_l, r_w[:, None].clone(), r_l[:, None].clone(), method=method, clip=clip,
        include_pivot=include_pivot, ref_offset=ref_offset, **extra,
    )
    loss = infifpo_loss(pi_w, pi_l, f_w, f_l, beta=0.1)
    grad = torch.autograd.grad(loss.sum(), (pi_w, pi_l))
    pi_w2, pi_l2 = pi_w.detach().clone().requires_grad_(), pi_l.detach().clone().requires_grad_()
    dpo = -F.logsigmoid(0.1 * ((pi_w2 - r_w) - (pi_l2 - r_l)))  # TRL's sigmoid DPO loss, written out
    dpo_grad = torch.autograd.grad(dpo.sum(), (pi_w2, pi_l2))
    torch.testing.assert_close(loss, dpo, atol=1e-6, rtol=0)
    for a, b in zip(grad, dpo_grad, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_wrpo_alpha_schedule():
    """α(t) = α_max · min(1, t/T), T = 10, α_max = 0.1: t = 0 -> 0, 5 -> 0.05, 10 -> 0.1, 25 -> 0.1 (capped)."""
    assert [wrpo_alpha(t, 10, 0.1) for t in (0, 5, 10, 25)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
    assert [wrpo_alpha(t, 10, 0.1, is_dynamic=False) for t in (0, 5, 25)] == pytest.approx([0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="total_steps must be a positive"):
        wrpo_alpha(0, 0, 0.1)


def test_wrpo_loss_by_hand_and_alpha_zero_is_dpo():
    """β = 0.1: ρ_ws = 0.1(-10 + 14) = 0.4, ρ_wt = 0.1(-12 + 13) = 0.1, ρ_l = 0.1(-15 + 14) = -0.1.
    α = 0.5: u = 0.5·0.4 + 0.5·0.1 + 0.1 = 0.35 -> log(1 + e^-0.35) = 0.533154.
    α = 0: u = ρ_wt - ρ_l = 0.2 -> DPO on (y_wt, y_l) = log(1 + e^-0.2) = 0.598139.
    """
    pol, ref = (T([-10.0]), T([-12.0]), T([-15.0])), (T([-14.0]), T([-13.0]), T([-14.0]))
    assert wrpo_loss(*pol, *ref, alpha=0.5, beta=0.1).item() == pytest.approx(math.log(1 + math.exp(-0.35)), abs=1e-6)
    assert wrpo_loss(*pol, *ref, alpha=0.0, beta=0.1).item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    # InfiFPO-WRPO: fused references go where r went; α = 0 then equals the InfiFPO sigmoid loss on (y_wt, y_l).
    f_wt, f_l, _ = fuse_reference(T([-13.0]), T([-14.0]), T([[-11.0]]), T([[-16.0]]))
    infifpo = infifpo_loss(pol[1], pol[2], f_wt, f_l, beta=0.1)
    torch.testing.assert_close(wrpo_loss(*pol, T([-9.0]), f_wt, f_l, alpha=0.0, beta=0.1), infifpo)


# ---------------------------------------------------------------------------------------------------------------
# on-policy distillation
# ---------------------------------------------------------------------------------------------------------------


def test_opd_advantages_and_loss_by_hand():
    """f = [-1, -2, -3, -4], v̂ = [-1.5, -1, -2, -5], G = 2: g = f - v̂ = [0.5, -1, -1, 1].
    group_mean: A = g - mean(group) = [0.75, -0.75, -1, 1]; leave_one_out: A = g_i - g_other = [1.5, -1.5, -2, 2].
    log π = [-1, -2, -8, -10], n = [1, 2, 4, 5]: A - 1/n = [0.5, -2, -2.25, 1.8], products [-0.5, 4, 18, -18]
    -> loss (LN) = -3.5/4 = -0.875; without counts A log π = [-1.5, 3, 16, -20] -> loss = 2.5/4 = 0.625.
    """
    fused, pol = T([-1.0, -2.0, -3.0, -4.0], dtype=torch.float64), T([-1.5, -1.0, -2.0, -5.0], dtype=torch.float64)
    torch.testing.assert_close(opd_sequence_advantages(fused, pol, 2, baseline="group_mean"),
                               T([0.75, -0.75, -1.0, 1.0], dtype=torch.float64))
    adv = opd_sequence_advantages(fused, pol, 2)
    torch.testing.assert_close(adv, T([1.5, -1.5, -2.0, 2.0], dtype=torch.float64))
    logp = T([-1.0, -2.0, -8.0, -10.0], dtype=torch.float64, requires_grad=True)
    n = T([1, 2, 4, 5])
    assert opd_sequence_loss(logp, adv, n).item() == pytest.approx(-0.875)
    assert opd_sequence_loss(logp, adv).item() == pytest.approx(0.625)
    (grad,) = torch.autograd.grad(opd_sequence_loss(logp, adv, n), logp)
    torch.testing.assert_close(grad, -(adv - 1.0 / n) / 4)
    with pytest.raises(ValueError, match="multiple of group_size"):
        opd_sequence_advantages(fused, pol, 3)
    with pytest.raises(ValueError, match="unknown baseline 'mean'"):
        opd_sequence_advantages(fused, pol, 2, baseline="mean")
    with pytest.raises(ValueError, match="group_size >= 2"):
        opd_sequence_advantages(fused, pol, 1)
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        opd_sequence_loss(logp, adv, T([1, 0, 4, 5]))


# The tabular policy for the enumeration test: vocabulary {a, b, EOS}, a sequence ends at EOS or after 3 tokens,
# one row of 3 logits per non-EOS prefix. Every sequence, with its (prefix row, token) per position:
_VOCAB, _EOS, _MAX_LEN = 3, 2, 3


def _all_sequences() -> list[tuple[int, ...]]:
    done, open_ = [], [()]
    while open_:
        prefix = open_.pop(0)
        for tok in range(_VOCAB):
            y = (*prefix, tok)
            (done if tok == _EOS or len(y) == _MAX_LEN else open_).append(y)
    return done


def _sequence_logps(theta: torch.Tensor, sequences: list[tuple[int, ...]]) -> torch.Tensor:
    """log π(y) = Σ_t log softmax(θ[prefix_t])[y_t] for every sequence [S], differentiable in θ [prefixes, 3]."""
    prefixes = sorted({y[:t] for y in sequences for t in range(len(y))}, key=lambda p: (len(p), p))
    row = {p: i for i, p in enumerate(prefixes)}
    assert theta.shape == (len(prefixes), _VOCAB)  # (), a, b, aa, ab, ba, bb
    table = F.log_softmax(theta, dim=1)
    return torch.stack([sum(table[row[y[:t]], y[t]] for t in range(len(y))) for y in sequences])


def _expected_estimator_gradient(theta: torch.Tensor, log_pi: torch.Tensor, f: torch.Tensor, n: torch.Tensor,
                                 G: int, *, length_normalize: bool, baseline: str) -> torch.Tensor:
    """E over G i.i.d. samples y_1..y_G ~ π of ∇θ of the OPD surrogate, exactly: every G-tuple, weighted by Π π."""
    prob = log_pi.detach().exp()
    v = log_pi / n if length_normalize else log_pi
    total = torch.zeros((), dtype=torch.float64)
    for tup in itertools.product(range(len(f)), repeat=G):
        idx = torch.tensor(tup)
        adv = opd_sequence_advantages(f[idx], v.detach()[idx], G, baseline=baseline)
        loss = opd_sequence_loss(log_pi[idx], adv, n[idx] if length_normalize else None)
        total = total + prob[idx].prod() * loss
    (grad,) = torch.autograd.grad(total, theta, retain_graph=True)
    return grad


@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("G", [2, 3])
def test_opd_estimator_is_unbiased_for_the_exact_objective_by_enumeration(length_normalize, G):
    """J(θ) = Σ_y π(y)(v_π(y) − f(y)) over all 15 sequences of a tabular policy (v = log π / n with LN, log π
    without; f a fixed arbitrary teacher value in the same space). Its exact gradient (autograd) must equal the
    exact expectation of the estimator's gradient (leave-one-out baseline) over all 15^G groups. The group_mean
    baseline's expectation is (G−1)/G · score term + pathwise term: equal to ∇J only without LN (up to the
    (G−1)/G scale, i.e. a learning-rate rescale)."""
    sequences = _all_sequences()
    assert len(sequences) == 15
    gen = torch.Generator().manual_seed(0)
    theta = (0.8 * torch.randn(7, _VOCAB, generator=gen, dtype=torch.float64)).requires_grad_()
    n = torch.tensor([len(y) for y in sequences], dtype=torch.float64)
    f = -0.5 - 2.5 * torch.rand(len(sequences), generator=gen, dtype=torch.float64)  # nats/token (LN) or nats
    if not length_normalize:
        f = f * n
    log_pi = _sequence_logps(theta, sequences)
    prob = log_pi.exp()
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12)
    v = log_pi / n if length_normalize else log_pi
    (exact,) = torch.autograd.grad((prob * (v - f)).sum(), theta, retain_graph=True)
    # The two parts of the exact gradient: E[(v − f) ∇log π] (score) and E[∇v] = E[(1/n) ∇log π] with LN (pathwise).
    (score,) = torch.autograd.grad((prob.detach() * (v - f).detach() * log_pi).sum(), theta, retain_graph=True)
    (pathwise,) = torch.autograd.grad((prob.detach() * v).sum(), theta, retain_graph=True)
    torch.testing.assert_close(score + pathwise, exact, atol=1e-12, rtol=0)
    assert exact.abs().max() > 0.05  # not vacuous
    if length_normalize:
        assert pathwise.abs().max() > 0.01  # the LN pathwise term matters here
    else:
        assert pathwise.abs().max() < 1e-12  # E[∇log π] = 0

    estimate = _expected_estimator_gradient(theta, log_pi, f, n, G, length_normalize=length_normalize,
                                            baseline="leave_one_out")
    torch.testing.assert_close(estimate, exact, atol=1e-10, rtol=0)

    group_mean = _expected_estimator_gradient(theta, log_pi, f, n, G, length_normalize=length_normalize,
                                              baseline="group_mean")
    torch.testing.assert_close(group_mean, (G - 1) / G * score + pathwise, atol=1e-10, rtol=0)
    if length_normalize:
        assert (group_mean - exact).abs().max() > 1e-3


def test_jsd_endpoints_are_forward_and_reverse_kl_on_toy_distribution():
    """student s = [0.5, 0.3, 0.2], teacher t = [0.2, 0.5, 0.3].
    KL(t‖s) = 0.2 ln(0.2/0.5) + 0.5 ln(0.5/0.3) + 0.3 ln(0.3/0.2) = 0.193795
    KL(s‖t) = 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.5) + 0.2 ln(0.2/0.3) = 0.223805
    β = 0.5: M = [0.35, 0.4, 0.25], JSD = 0.5 KL(t‖M) + 0.5 KL(s‖M).
    """
    s, t = [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]
    kl = lambda p, q: sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))  # noqa: E731
    m = [0.35, 0.4, 0.25]
    s_logits, t_logits = T([[s]]).log() + 1.7, T([[t]]).log() - 0.4  # logits: any shift gives the same softmax
    assert kl(t, s) == pytest.approx(0.193795, abs=1e-6) and kl(s, t) == pytest.approx(0.223805, abs=1e-6)
    assert generalized_jsd(s_logits, t_logits, 0.0).item() == pytest.approx(kl(t, s), abs=1e-6)
    assert forward_kl(s_logits, t_logits).item() == pytest.approx(kl(t, s), abs=1e-6)
    assert generalized_jsd(s_logits, t_logits, 1.0).item() == pytest.approx(kl(s, t), abs=1e-6)
    assert reverse_kl(s_logits, t_logits).item() == pytest.approx(kl(s, t), abs=1e-6)
    jsd = 0.5 * kl(t, m) + 0.5 * kl(s, m)
    assert generalized_jsd(s_logits, t_logits, 0.5).item() == pytest.approx(jsd, abs=1e-6)


def test_divergence_mask_averages_only_supervised_tokens():
    """Two positions; the second (a prompt/pad token) is masked out, so the mean is the first position's KL."""
    s = T([[[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]]).log()
    t = T([[[0.2, 0.5, 0.3], [0.05, 0.05, 0.9]]]).log()
    mask = T([[True, False]])
    assert reverse_kl(s, t, mask).item() == pytest.approx(reverse_kl(s[:, :1], t[:, :1]).item(), abs=1e-7)
    assert reverse_kl(s, t, mask).item() < reverse_kl(s, t).item()
    with pytest.raises(ValueError, match="mask shape"):
        reverse_kl(s, t, T([True, False]))


# ---------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------


def test_mismatched_source_count_names_shapes():
    ref_w, ref_l, src_w, src_l = example()
    with pytest.raises(ValueError, match=r"shape mismatch.*src_chosen': \(2, 2\).*src_rejected': \(2, 3\)"):
        fuse_reference(ref_w, ref_l, src_w, torch.cat([src_l, src_l[:, :1]], dim=1))
    with pytest.raises(ValueError, match=r"ref \(3,\), src \(2, 2\)"):
        fuse_reference(T([-1.0, -1.0, -1.0]), T([-1.0, -1.0, -1.0]), src_w, src_l)


def test_non_float_and_nan_inputs_are_rejected():
    ref_w, ref_l, src_w, src_l = example()
    with pytest.raises(ValueError, match="ref_chosen must be a floating-point"):
        fuse_reference(torch.tensor([-1, -2]), ref_l, src_w, src_l)
    with pytest.raises(ValueError, match="contain NaN"):
        fuse_reference(ref_w, ref_l, src_w, torch.full_like(src_l, float("nan")))


def test_unknown_method_and_loss_type_list_valid_ones():
    with pytest.raises(ValueError, match=r"unknown fusion method 'maxmargin'.*'max_margin', 'max_margin_pair'"):
        fuse("maxmargin")
    with pytest.raises(ValueError, match=r"unknown loss_type 'hinge'.*\['sigmoid', 'ipo'\]"):
        infifpo_loss(T([-1.0]), T([-2.0]), T([-1.0]), T([-2.0]), beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="unknown margin_against"):
        fuse("max_margin", margin_against="current")


def test_fusion_module_imports_torch_only():
    """docs/methods.md / style rule 1: the math module must not pull transformers, trl, vllm or datasets."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(fusion))
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "dataclasses", "typing", "torch"}


def test_full_tie_at_the_pivot_is_credited_to_the_pivot():
    # Both sources clip to v_r on both responses: f = v_r, and the selection metric names the pivot (index K=2).
    ref_w, ref_l = torch.tensor([-1.0]), torch.tensor([-2.0])
    src_w, src_l = torch.tensor([[-3.0, -4.0]]), torch.tensor([[-1.0, -0.5]])
    f_w, f_l, info = fuse_reference(ref_w, ref_l, src_w, src_l, method="max_margin")
    assert f_w.item() == -1.0 and f_l.item() == -2.0
    assert info.chosen_index.tolist() == [2] and info.rejected_index.tolist() == [2]
    # Without the pivot as a candidate the lowest-index tie-break still applies.
    _, _, info = fuse_reference(ref_w, ref_l, src_w, src_l, method="max_margin", include_pivot=False)
    assert info.chosen_index.tolist() == [0]


def test_shares_are_each_candidates_weight_in_f_for_every_method():
    """FusionInfo.shares: one-hot of the winner (max_margin), the confidence weights, 1/K (mean); hand values."""
    # Two sources, no clipping: chosen values (-1, -3), rejected (-2, -2); pivot -1.5 / -2.5.
    src_c, src_r = torch.tensor([[-1.0, -3.0]]), torch.tensor([[-2.0, -2.0]])
    ref_c, ref_r = torch.tensor([-1.5]), torch.tensor([-2.5])
    kw = {"clip": False, "include_pivot": False}
    _, _, info = fuse_reference(ref_c, ref_r, src_c, src_r, method="max_margin", **kw)
    # |e^-1 - e^-1.5| = 0.145 < |e^-3 - e^-1.5| = 0.173: source 1 wins the chosen side; a tie on rejected -> source 0.
    assert info.shares("chosen", 1).tolist() == [[0.0, 1.0]] and info.shares("rejected", 1).tolist() == [[1.0, 0.0]]
    _, _, info = fuse_reference(ref_c, ref_r, src_c, src_r, method="confidence", **kw)
    # w ∝ 1/1, 1/3 -> 3/4, 1/4; rejected 1/2 each.
    torch.testing.assert_close(info.shares("chosen", 1), torch.tensor([[0.75, 0.25]]))
    torch.testing.assert_close(info.shares("rejected", 1), torch.tensor([[0.5, 0.5]]))
    _, _, info = fuse_reference(ref_c, ref_r, src_c, src_r, method="mean", **kw)
    assert info.shares("chosen", 1).tolist() == [[0.5, 0.5]]
