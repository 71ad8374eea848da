"""`learned` fusion (ASN, docs/methods.md §ASN): the selector network, τ selection, CV² feedback, its training stage,
and InfiFPOTrainer with the frozen selector as the fused reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.testing import assert_close

from infifpo import fusion
from infifpo import selector as asn
from infifpo.schema import ConfigError, SelectorError
from infifpo.store import StageOutput, read_output
from infifpo.trainers.selector import (
    CHECKPOINT,
    META,
    WEIGHTS_COLUMN,
    SelectorOptions,
    load_selector,
    train_selector,
)
from infifpo.trainers.selector import main as selector_main
from tests.config_convention import help_lists_every_option, misspelt_key_is_named

T = torch.tensor


# ---------------------------------------------------------------- the network and its selection, by hand


def _manual_forward(net: asn.SelectorNet, x: torch.Tensor) -> torch.Tensor:
    """The forward pass written out: LayerNorm per candidate ((x − mean)/sqrt(var + 1e-5), population var, then the
    affine), concatenation, Linear → GELU(erf) → Linear → GELU → Linear, softmax as exp / sum."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    h = (x - mean) / torch.sqrt(var + 1e-5) * net.norm.weight + net.norm.bias
    h = h.reshape(x.shape[0], -1)
    lin = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
    for i, layer in enumerate(lin):
        h = h @ layer.weight.T + layer.bias
        if i < len(lin) - 1:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    e = torch.exp(h - h.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def test_network_shapes_init_and_forward_match_a_hand_forward():
    """K' = 3 candidates, d = 4 features: F = 12, Linear(12, 24) → Linear(24, 12) → Linear(12, 3); Xavier-uniform
    weights (|w| <= sqrt(6 / (fan_in + fan_out))), zero biases; the forward equals the written-out one."""
    net = asn.SelectorNet(3, 4, seed=0)
    shapes = [tuple(m.weight.shape) for m in net.mlp if isinstance(m, torch.nn.Linear)]
    assert shapes == [(24, 12), (12, 24), (3, 12)]
    for m in net.mlp:
        if isinstance(m, torch.nn.Linear):
            bound = math.sqrt(6 / sum(m.weight.shape))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.5 * bound
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    with torch.no_grad():  # a non-trivial LayerNorm affine, so the test sees it applied per candidate
        net.norm.weight.copy_(T([1.0, 2.0, 0.5, -1.0]))
        net.norm.bias.copy_(T([0.1, 0.0, -0.2, 0.3]))
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    p = net(x)
    assert_close(p, _manual_forward(net, x), atol=1e-6, rtol=0)
    assert_close(p.sum(dim=-1), torch.ones(5))
    assert torch.equal(asn.SelectorNet(3, 4, seed=0).mlp[0].weight, asn.SelectorNet(3, 4, seed=0).mlp[0].weight)


def test_threshold_mask_argmax_fallback_and_renormalisation_by_hand():
    """τ = 0.15. Row 0: p = [0.6, 0.3, 0.1] → mask [1, 1, 0], p̂ = [0.6, 0.3, 0]/0.9 = [2/3, 1/3, 0].
    Row 1: p = [0.15, 0.35, 0.5] → 0.15 is not > τ: p̂ = [0, 0.35, 0.5]/0.85 = [0, 7/17, 10/17].
    Row 2 (K' = 3 cannot have every p <= 0.15, so a 7-candidate case below) all pass: p̂ = p.
    K' = 7, p = [0.145, 0.15, 0.145, 0.14, 0.14, 0.14, 0.14]: none > τ → argmax (index 1) alone: p̂ = e_1."""
    p = T([[0.6, 0.3, 0.1], [0.15, 0.35, 0.5], [0.2, 0.3, 0.5]])
    w, mask = asn.select_weights(p, 0.15)
    assert mask.tolist() == [[True, True, False], [False, True, True], [True, True, True]]
    assert_close(w, T([[2 / 3, 1 / 3, 0.0], [0.0, 7 / 17, 10 / 17], [0.2, 0.3, 0.5]]), atol=1e-7, rtol=0)
    p7 = T([[0.145, 0.15, 0.145, 0.14, 0.14, 0.14, 0.14]])
    w7, mask7 = asn.select_weights(p7, 0.15)
    assert mask7.tolist() == [[False, True, False, False, False, False, False]]
    assert_close(w7, T([[0.0, 0.15 / (0.15 + 1e-8), 0, 0, 0, 0, 0]]), atol=1e-7, rtol=0)
    # gradients flow through p (not the mask): ∂p̂_0/∂p_0 = p_1/(p_0 + p_1)² = 0.3/0.81 for row 0
    p0 = T([[0.6, 0.3, 0.1]], requires_grad=True)
    asn.select_weights(p0, 0.15)[0][0, 0].backward()
    assert_close(p0.grad, T([[0.3 / 0.81, -0.6 / 0.81, 0.0]]), atol=1e-6, rtol=0)


def test_learned_fusion_applies_one_weight_vector_per_pair():
    """fuse_reference(method="learned"): clip, then f(y) = Σ p̂_k c_k(y) with the same p̂ on both responses.
    v_r = (-1, -2); sources chosen (-0.5, -1.5) → clipped (-0.5, -1.0), rejected (-2.5, -1.8) → (-2.5, -2.0);
    p̂ = (0.25, 0.75): f_w = -0.125 - 0.75 = -0.875, f_l = -0.625 - 1.5 = -2.125; a zero weight ignores -inf."""
    f_w, f_l, info = fusion.fuse_reference(T([-1.0]), T([-2.0]), T([[-0.5, -1.5]]), T([[-2.5, -1.8]]),
                                           method="learned", pair_weights=T([[0.25, 0.75]]))
    assert_close((f_w, f_l), (T([-0.875]), T([-2.125])))
    assert info.shares("chosen", 1).tolist() == info.shares("rejected", 1).tolist() == [[0.25, 0.75]]
    f_w, _, _ = fusion.fuse_reference(T([-1.0]), T([-2.0]), T([[-0.5, -float("inf")]]), T([[-2.5, -1.8]]),
                                      method="learned", clip=False, pair_weights=T([[1.0, 0.0]]))
    assert f_w.item() == -0.5
    with pytest.raises(ValueError, match="needs pair_weights"):
        fusion.fuse_reference(T([-1.0]), T([-2.0]), T([[-0.5, -1.5]]), T([[-2.5, -1.8]]), method="learned")
    with pytest.raises(ValueError, match=r"candidates' shape \(1, 3\)"):
        fusion.fuse_reference(T([-1.0]), T([-2.0]), T([[-0.5, -1.5]]), T([[-2.5, -1.8]]), method="learned",
                              include_pivot=True, pair_weights=T([[0.5, 0.5]]))


# ---------------------------------------------------------------- the loss, by hand


def test_cv_squared_and_the_feedback_forms_by_hand():
    """CV² = Var/(Mean² + 1e-8), Var with Bessel's correction. I = (3, 1): mean 2, Var = (1 + 1)/1 = 2 → 0.5.
    I = (2, 2) → 0. One element → 0. p̂ = [[1, 0], [0.5, 0.5]]: batch I = (1.5, 0.5), Var 0.5, mean 1 → 0.5;
    per_sample: CV²(1, 0) = 0.5/0.25 = 2, CV²(0.5, 0.5) = 0 → mean 1."""
    assert asn.cv_squared(T([3.0, 1.0])).item() == pytest.approx(0.5, abs=1e-7)
    assert asn.cv_squared(T([2.0, 2.0])).item() == 0.0
    assert asn.cv_squared(T([4.0])).item() == 0.0
    w = T([[1.0, 0.0], [0.5, 0.5]])
    assert asn.feedback_loss(w, "batch").item() == pytest.approx(0.5, abs=1e-7)
    assert asn.feedback_loss(w, "per_sample").item() == pytest.approx(1.0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown feedback"):
        asn.feedback_loss(w, "pairwise")


def test_selector_loss_by_hand():
    """p̂ = (1, 0), c(y_w) = (-1, -2), c(y_l) = (-2, -1): f margin 1, −log σ(1) = log(1 + e⁻¹); CV²(1, 0) = 2, so
    λ_feed 0.5 adds 1. β_s = 2: −log σ(2)."""
    w, c_w, c_l = T([[1.0, 0.0]]), T([[-1.0, -2.0]]), T([[-2.0, -1.0]])
    loss = asn.selector_loss(w, c_w, c_l)
    assert loss.preference.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert loss.feedback.item() == pytest.approx(2.0, abs=1e-6)
    assert loss.total.item() == pytest.approx(math.log1p(math.exp(-1)) + 1.0, abs=1e-6)
    assert loss.agreement.item() == 1.0
    assert asn.selector_loss(w, c_w, c_l, beta_s=2.0, lambda_feed=0.0).total.item() == pytest.approx(
        math.log1p(math.exp(-2)), abs=1e-6)


# ---------------------------------------------------------------- the synthetic pool of the issue


def synthetic_pool(n: int, seed: int, *, right: tuple[float, float] = (1.0, 1.0),
                   wrong: tuple[float, float] = (0.8, 0.8), noise: float = 0.1):
    """Two sources A (0) and B (1), two domains (math, code), pairs alternating between them. Source k is right on
    domain k: its margin c_k(y_w) − c_k(y_l) is +right[k] there and −wrong[k] on the other domain (± noise), in
    nats/token, around −1.8. The frozen pivot prefers y_l (v_r(y_w) ≈ −4, v_r(y_l) <= −0.2, as at InfiFPO's step
    0), so clipping leaves the sources' values as they are. Token counts are drawn alike for both sources (no
    signal)."""
    g = torch.Generator().manual_seed(seed)
    domain = torch.arange(n) % 2
    ref_w, ref_l = -4.0 + noise * torch.randn(n, generator=g), -0.2 - noise * torch.randn(n, generator=g).abs()
    src_w, src_l = torch.empty(n, 2), torch.empty(n, 2)
    for k in range(2):
        mid = -1.8 + noise * torch.randn(n, generator=g)
        margin = torch.where(domain == k, right[k], -wrong[k]) + noise * torch.randn(n, generator=g)
        src_w[:, k], src_l[:, k] = mid + margin / 2, mid - margin / 2
    cand_w, cand_l = asn.candidate_values(ref_w, ref_l, src_w, src_l, clip=True, include_pivot=False)
    assert torch.equal(cand_w, src_w) and torch.equal(cand_l, src_l)
    log_n = torch.randint(10, 40, (2, n, 2), generator=g).float().log()
    features = asn.pair_features(cand_w, cand_l, log_n[0], log_n[1], F.one_hot(domain, 3).float())
    return features, cand_w, cand_l, domain


def _fit_and_measure(lambda_feed: float, seed: int, **pool) -> tuple[float, list[int]]:
    """Fit with the default options (τ 0.15, 100 epochs, batch 32, Adam lr 1e-3) but λ_feed on 64 pairs; return
    source A's importance (mean p̂_A over the pairs) and the per-domain argmax of the mean p̂."""
    features, cand_w, cand_l, domain = synthetic_pool(64, seed, **pool)
    net, _ = asn.fit_selector(features, cand_w, cand_l, asn.SelectorTraining(lambda_feed=lambda_feed, seed=seed))
    w = asn.selector_weights(net, features, 0.15)
    return w[:, 0].mean().item(), [int(w[domain == d].mean(dim=0).argmax()) for d in (0, 1)]


def test_symmetric_pool_uses_both_sources_with_or_without_feedback():
    """The plainest pool of the issue: A right by 1 nat/token on math, B on code, each wrong by 0.8 elsewhere. Both
    λ_feed = 0.5 and λ_feed = 0 route math to A and code to B with importance 0.5 each: the features hold each
    source's c(y_w) and c(y_l), so the preference term alone finds the split and there is no collapse to prevent."""
    for lambda_feed in (0.5, 0.0):
        importance_a, argmax = _fit_and_measure(lambda_feed, 0)
        assert argmax == [0, 1] and importance_a == pytest.approx(0.5, abs=0.05), lambda_feed


def test_feedback_loss_prevents_collapse_onto_the_confident_source():
    """A confident source A (right by 2 nats/token on math, wrong by only 0.05 on code) and a weak one B (right by
    0.05 on code, wrong by 2 on math); noise 0.1. Per domain the right choice is still A on math and B on code.

    With λ_feed = 0.5, on every seed: math → A, code → B, importance of A within 0.5 ± 0.1 (measured: 0.500, 0.513,
    0.500). With λ_feed = 0 the selector collapses onto A on 2 of the 3 seeds (importance 1.000 on seeds 0 and 1;
    seed 2 finds the split, 0.543): A's large margins pull every pair towards A early, and once p_A > 1 − τ on a code
    pair the τ mask leaves p̂ = (1, 0) with no gradient, so B's small advantage there is never learnt.
    """
    pool = {"right": (2.0, 0.05), "wrong": (0.05, 2.0)}
    collapsed = {0.5: 0, 0.0: 0}
    for lambda_feed in (0.5, 0.0):
        for seed in range(3):
            importance_a, argmax = _fit_and_measure(lambda_feed, seed, **pool)
            if lambda_feed > 0:
                assert argmax == [0, 1] and importance_a == pytest.approx(0.5, abs=0.1), seed
            collapsed[lambda_feed] += importance_a > 0.95
    assert collapsed == {0.5: 0, 0.0: 2}


# ---------------------------------------------------------------- the stage and the trainer


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _scored_output(tok, root, *, n=10, sources=("m0", "m1"), pivot="tiny"):
    """A finished scored-pairs output of ``n`` PO rows (tests/trainers/conftest.make_scored_rows), domains
    alternating math / code."""
    from tests.trainers.conftest import make_scored_rows

    rows = make_scored_rows(tok, n, k=len(sources), sources=sources)
    for i, row in enumerate(rows):
        row["domain"], row["pivot_model"] = ("math", "code")[i % 2], pivot
    out = StageOutput(root, "scored", {"test": list(sources), "pivot": pivot, "n": n})
    return out.write_all(rows), rows


def test_train_selector_writes_a_content_addressed_checkpoint(tiny_tok, tmp_path, capsys):
    scored, rows = _scored_output(tiny_tok, tmp_path / "data")
    path = train_selector(scored, tmp_path / "data", fraction=0.2, epochs=3, batch_size=1)
    assert path.name.startswith("selector-") and (path / CHECKPOINT).is_file()
    held = read_output(path)
    assert len(held) == 2 and {r["id"] for r in held} <= {r["id"] for r in rows}
    meta = json.loads((path / META).read_text())
    assert meta["sources"] == ["m0", "m1"] and meta["pivot_model"] == "tiny" and meta["candidates"] == ["m0", "m1"]
    assert meta["features"]["entropy"] is False and meta["features"]["per_candidate"][:2] == [
        "c_chosen_mean_logps", "c_rejected_mean_logps"]
    assert meta["options"]["tau"] == 0.15 and meta["options"]["lambda_feed"] == 0.5
    assert meta["options"]["feedback"] == "batch"
    assert [c["step"] for c in meta["curve"]] == list(range(1, 7))  # 3 epochs x 2 pairs, one per step
    assert set(meta["importance"]) == {"m0", "m1"} and meta["held_out"] == {"pairs": 2, "of_po_pairs": 10}
    for r in held:
        assert sum(r["weights"]) == pytest.approx(1.0, abs=1e-6)
    # the same inputs and options: reused; another option: another output
    assert train_selector(scored, tmp_path / "data", fraction=0.2, epochs=3, batch_size=1) == path
    assert selector_main(["--scored", str(scored), "--out", str(tmp_path / "data"), "--fraction", "0.2",
                          "--epochs", "3", "--batch_size", "1", "--lambda_feed", "0"]) == 0
    other = capsys.readouterr().out.strip()
    assert other != str(path) and json.loads((Path(other) / META).read_text())["options"]["lambda_feed"] == 0.0


def test_selector_options_follow_the_config_convention(tmp_path, capsys):
    help_lists_every_option(selector_main, SelectorOptions, capsys)
    misspelt_key_is_named(selector_main, tmp_path, "lamda_feed", "lambda_feed")
    with pytest.raises(ConfigError, match=r"fraction=1.0"):
        SelectorOptions(scored="x", fraction=1.0)


def _trainer(model, tok, rows, out, **kw):
    from infifpo.trainers.infifpo import InfiFPOConfig, InfiFPOTrainer
    from tests.trainers.conftest import cpu_args

    return InfiFPOTrainer(model, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          args=InfiFPOConfig(output_dir=str(out), **cpu_args(**kw)))


def test_infifpo_trains_with_the_frozen_selector_as_fused_reference(tiny_llama, tiny_tok, tmp_path):
    """fusion_method=learned: the selector's 2 held-out pairs are dropped, each pair gets the frozen selector's p̂
    (recomputed here from the checkpoint), the loss is −log σ(β[(π_w − Σp̂c_w) − (π_l − Σp̂c_l)]) and the source
    shares are p̂; training runs."""
    from tests.trainers.test_infifpo import _batch, _policy_mean_logps

    scored, rows = _scored_output(tiny_tok, tmp_path / "data")
    path = train_selector(scored, tmp_path / "data", fraction=0.2, epochs=3, batch_size=2)
    held = {r["id"] for r in read_output(path)}
    trainer = _trainer(tiny_llama, tiny_tok, rows, tmp_path / "run", fusion_method="learned",
                       selector_path=str(path), max_steps=2)
    kept = [r for r in rows if r["id"] not in held]
    assert sorted(trainer.train_dataset["id"]) == sorted(r["id"] for r in kept)
    selector = load_selector(path)
    from infifpo.trainers.selector import row_tensors

    features, c_w, c_l = row_tensors(kept, selector.spec)
    p_hat = asn.selector_weights(selector.net, features, 0.15)
    by_id = {r["id"]: i for i, r in enumerate(kept)}
    order = [by_id[i] for i in trainer.train_dataset["id"]]
    assert_close(T(trainer.train_dataset[WEIGHTS_COLUMN]), p_hat[order], atol=1e-6, rtol=0)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, _batch(trainer, 2))
    expected = []
    for j in range(2):
        row = kept[order[j]]
        f_w = (p_hat[order[j]] * c_w[order[j]]).sum().item()
        f_l = (p_hat[order[j]] * c_l[order[j]]).sum().item()
        pi_w, pi_l = _policy_mean_logps(tiny_llama, tiny_tok, row)
        expected.append(-F.logsigmoid(torch.tensor(2.5 * ((pi_w - f_w) - (pi_l - f_l)))))
    assert_close(loss, torch.stack(expected).mean(), atol=1e-5, rtol=0)
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert m["fusion/chosen_share/m0"] == pytest.approx(p_hat[order[:2], 0].mean().item(), abs=1e-5)
    assert m["fusion/rejected_share/m1"] == pytest.approx(p_hat[order[:2], 1].mean().item(), abs=1e-5)
    trainer.train()
    assert trainer.state.global_step == 2


def test_learned_fusion_refuses_a_selector_of_another_pool(tiny_llama, tiny_tok, tmp_path):
    scored, rows = _scored_output(tiny_tok, tmp_path / "data")
    path = str(train_selector(scored, tmp_path / "data", fraction=0.2, epochs=1))
    swapped = [{**r, "source_models": ["m1", "m0"]} for r in rows]
    with pytest.raises(SelectorError, match=r"trained on sources \['m0', 'm1'\].*fuse \['m1', 'm0'\]"):
        _trainer(tiny_llama, tiny_tok, swapped, tmp_path / "a", fusion_method="learned", selector_path=path)
    with pytest.raises(SelectorError, match=r"fuse \['m1'\] \(after fusion_sources\)"):
        _trainer(tiny_llama, tiny_tok, rows, tmp_path / "b", fusion_method="learned", selector_path=path,
                 fusion_sources=["m1"])
    other_pivot = [{**r, "pivot_model": "another"} for r in rows]
    with pytest.raises(SelectorError, match=r"scored with pivot 'tiny'.*\['another'\].*Train a selector"):
        _trainer(tiny_llama, tiny_tok, other_pivot, tmp_path / "c", fusion_method="learned", selector_path=path)
    with pytest.raises(SelectorError, match=r"include_pivot: False \(selector\) vs True"):
        _trainer(tiny_llama, tiny_tok, rows, tmp_path / "d", fusion_method="learned", selector_path=path,
                 include_pivot=True)
    with pytest.raises(SelectorError, match="not a selector output"):
        _trainer(tiny_llama, tiny_tok, rows, tmp_path / "e", fusion_method="learned", selector_path=str(scored))


def test_learned_fusion_options_are_checked():
    from infifpo.trainers.infifpo import InfiFPOConfig

    base = {"output_dir": "x", "use_cpu": True, "bf16": False}
    with pytest.raises(ConfigError, match="fusion_method=learned needs selector_path"):
        InfiFPOConfig(fusion_method="learned", **base)
    with pytest.raises(ConfigError, match="selector_path is read by fusion_method=learned only"):
        InfiFPOConfig(selector_path="sel", **base)
    with pytest.raises(ConfigError, match="InfiFPO-WRPO"):
        InfiFPOConfig(fusion_method="learned", selector_path="sel", loss_type=["wrpo"], **base)
    from infifpo.trainers.opd import FUSION_METHODS

    assert "learned" not in FUSION_METHODS
