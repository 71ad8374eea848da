"""InfiFPOTrainer: the DPO identity, a hand-computed max-margin loss, training, metrics, the official format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from torch.testing import assert_close
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from infifpo.logprobs import response_spans
from infifpo.schema import ConfigError, MissingEntropyError
from infifpo.store import read_jsonl
from infifpo.trainers.infifpo import InfiFPOConfig, InfiFPOTrainer
from tests.trainers.conftest import (
    assert_same_loss_and_grads,
    assert_sgd_step,
    cpu_args,
    make_scored_rows,
    plain_completion_logps,
    sgd_args,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "official_format_row.jsonl"


def _batch(trainer, n):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


@pytest.mark.parametrize(("length_normalize", "loss_type", "trl_loss_type", "beta"), [
    (False, "sigmoid", "sigmoid", 0.1), (True, "sigmoid", "sigmoid_norm", 0.5), (True, "ipo", "ipo", 0.5)])
def test_single_source_equal_to_reference_is_trl_dpo(tiny_llama, tiny_llama_b, tiny_tok, tmp_path, length_normalize,
                                                     loss_type, trl_loss_type, beta):
    """docs/methods.md sanity identity: one source whose values equal the frozen pivot's → f = r, and the InfiFPO loss
    and gradients equal TRL's DPO on the same reference: ``sigmoid`` with LN off; with LN on TRL's per-token forms
    (``sigmoid_norm``; ``ipo``, which TRL computes on per-token means). The policy (tiny_llama_b) differs from the
    reference (tiny_llama), so the DPO logits are not zero."""
    rows = make_scored_rows(tiny_tok, 4, k=1)
    plain = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    dpo = DPOTrainer(tiny_llama_b, ref_model=ref_model, train_dataset=plain, processing_class=tiny_tok,
                     args=DPOConfig(output_dir=str(tmp_path / "dpo"), precompute_ref_log_probs=True, beta=beta,
                                    loss_type=[trl_loss_type], **cpu_args()))
    ref_c, ref_r = dpo.train_dataset["ref_chosen_logps"], dpo.train_dataset["ref_rejected_logps"]
    for row, c, r in zip(rows, ref_c, ref_r, strict=True):  # the source is the pivot: sums, means, counts alike
        n_c, n_r = row["ref_chosen_num_tokens"], row["ref_rejected_num_tokens"]
        row.update(ref_chosen_logps=c, ref_rejected_logps=r, ref_mean_chosen_logps=c / n_c,
                   ref_mean_rejected_logps=r / n_r, fuse_chosen_logps=[c], fuse_rejected_logps=[r],
                   fuse_mean_chosen_logps=[c / n_c], fuse_mean_rejected_logps=[r / n_r],
                   fuse_chosen_num_tokens=[n_c], fuse_rejected_num_tokens=[n_r])
    infi = InfiFPOTrainer(tiny_llama_b, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                          args=InfiFPOConfig(output_dir=str(tmp_path / "infi"), length_normalize=length_normalize,
                                             beta=beta, loss_type=loss_type, **cpu_args()))
    batch_d, batch_i = _batch(dpo, 4), _batch(infi, 4)
    assert torch.equal(batch_d["input_ids"], batch_i["input_ids"])
    assert_same_loss_and_grads(infi, batch_i, dpo, batch_d, atol=1e-5)


def _policy_mean_logps(model_path, tok, row):
    """Plain forward: mean per-token log-prob (nats/token) of chosen and rejected over their completion tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    prompt_ids, spans = response_spans(tok, row["prompt"],
                                       [row["chosen"][0]["content"], row["rejected"][0]["content"]])
    out = []
    for span in spans:
        ids = torch.tensor([prompt_ids + span])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        out.append(logp[len(prompt_ids) - 1:].sum().item() / len(span))
    return out


def test_max_margin_with_clip_matches_hand_computation(tiny_llama, tiny_tok, tmp_path):
    """LN on (β = 2.5), clip on, pivot included: f(y_w) = max(v_r, max_k v_k), f(y_l) = min(v_r, min_k v_k).

    row 0: chosen v_r=-1.0, v=[-0.8,-1.5] -> f=-0.8 (m0, m1 clipped); rejected v_r=-1.2, v=[-1.0,-2.0] -> f=-2.0 (m1)
    row 1: chosen v_r=-0.9, v=[-0.5,-1.3] -> f=-0.5 (m0, m1 clipped); rejected v_r=-1.1, v=[-1.4,-1.05] -> f=-1.4 (m0)
    4 of 8 source values clipped; fused margins 1.2 and 0.9.
    """
    rows = make_scored_rows(tiny_tok, 2, k=2, sources=("m0", "m1"))
    hand = [(-1.0, [-0.8, -1.5], -1.2, [-1.0, -2.0], -0.8, -2.0),
            (-0.9, [-0.5, -1.3], -1.1, [-1.4, -1.05], -0.5, -1.4)]
    for row, (rc, sc, rr, sr, _, _) in zip(rows, hand, strict=True):
        row.update(ref_mean_chosen_logps=rc, fuse_mean_chosen_logps=sc, ref_mean_rejected_logps=rr,
                   fuse_mean_rejected_logps=sr)
        for r in ("chosen", "rejected"):  # sums = mean × count, as `infifpo score` writes them
            row[f"ref_{r}_logps"] = row[f"ref_mean_{r}_logps"] * row[f"ref_{r}_num_tokens"]
            row[f"fuse_{r}_logps"] = [m * n for m, n in zip(row[f"fuse_mean_{r}_logps"], row[f"fuse_{r}_num_tokens"],
                                                            strict=True)]
    trainer = InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                             args=InfiFPOConfig(output_dir=str(tmp_path), **cpu_args()))
    assert trainer.beta == 2.5
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, _batch(trainer, 2))
    expected = []
    for row, (*_, f_w, f_l) in zip(rows, hand, strict=True):
        pi_w, pi_l = _policy_mean_logps(tiny_llama, tiny_tok, row)
        expected.append(-torch.nn.functional.logsigmoid(torch.tensor(2.5 * ((pi_w - f_w) - (pi_l - f_l)))))
    assert_close(loss, torch.stack(expected).mean(), atol=1e-5, rtol=0)
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert m["fusion/clip_rate"] == pytest.approx(0.5)
    assert m["fusion/margin"] == pytest.approx((1.2 + 0.9) / 2)
    assert (m["fusion/chosen_share/m0"], m["fusion/chosen_share/m1"], m["fusion/chosen_share/pivot"]) == (1, 0, 0)
    assert (m["fusion/rejected_share/m0"], m["fusion/rejected_share/m1"]) == (0.5, 0.5)
    n_c = [len(response_spans(tiny_tok, r["prompt"], [r["chosen"][0]["content"]])[1][0]) for r in rows]
    assert m["fusion/chosen_num_tokens"] == pytest.approx(sum(n_c) / 2)



def test_confidence_fusion_logs_each_sources_weight_as_its_share(tiny_llama, tiny_tok, tmp_path):
    """Every fusion method logs fusion/<side>_share/<source> (was max-margin only): with clip off and the sources
    only, confidence weights ∝ 1/(−c_k) are row 0 chosen (−0.5, −1.5) -> (0.75, 0.25), row 1 (−1, −1) -> (0.5, 0.5)."""
    rows = make_scored_rows(tiny_tok, 2, k=2, sources=("m0", "m1"))
    for row, chosen in zip(rows, ([-0.5, -1.5], [-1.0, -1.0]), strict=True):
        row.update(fuse_mean_chosen_logps=chosen, fuse_mean_rejected_logps=[-2.0, -2.0])
        for r in ("chosen", "rejected"):  # sums = mean × count, as `infifpo score` writes them
            row[f"fuse_{r}_logps"] = [m * n for m, n in zip(row[f"fuse_mean_{r}_logps"], row[f"fuse_{r}_num_tokens"],
                                                            strict=True)]
    trainer = InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                             args=InfiFPOConfig(output_dir=str(tmp_path), fusion_method="confidence", clip=False,
                                                **cpu_args()))
    trainer.model.train()
    trainer.compute_loss(trainer.model, _batch(trainer, 2))
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert (m["fusion/chosen_share/m0"], m["fusion/chosen_share/m1"]) == pytest.approx((0.625, 0.375))
    assert (m["fusion/rejected_share/m0"], m["fusion/rejected_share/m1"]) == pytest.approx((0.5, 0.5))
    assert "fusion/chosen_share/pivot" not in m

def _with_entropies(rows, chosen_means, chosen_entropy, rejected_means, rejected_entropy, pivot_entropy=(1.0, 2.0)):
    """Set per-row source means [K] (sums = mean × count, as `infifpo score` writes them) and mean entropies."""
    for i, row in enumerate(rows):
        for r, means, entropy in (("chosen", chosen_means[i], chosen_entropy[i]),
                                  ("rejected", rejected_means[i], rejected_entropy[i])):
            row[f"fuse_mean_{r}_logps"] = list(means)
            row[f"fuse_{r}_logps"] = [m * n for m, n in zip(means, row[f"fuse_{r}_num_tokens"], strict=True)]
            row[f"fuse_mean_{r}_entropy"] = list(entropy)
        row["ref_mean_chosen_entropy"], row["ref_mean_rejected_entropy"] = pivot_entropy
    return rows


def test_uncertainty_fusion_matches_hand_computation_and_logs_its_weights(tiny_llama, tiny_tok, tmp_path):
    """docs/methods.md §UDF, clip off, sources only: w_k ∝ 1/(H̄_k − s̄_k), f = Σ w_k c_k.

    row 0 chosen: s̄ = (−0.5, −1.5), H̄ = (0.5, 0.5) -> 1/(1, 2) -> w = (2/3, 1/3)
    row 1 chosen: s̄ = (−1, −1), H̄ = (1, 3) -> 1/(2, 4) -> w = (2/3, 1/3)
    rejected, both rows: s̄ = (−2, −2), H̄ = (2, 0) -> 1/(4, 2) -> w = (1/3, 2/3)
    Shares: chosen m0 2/3, m1 1/3; rejected m0 1/3, m1 2/3. LN on: f_w = (−5/6, −1), f_l = −2, so the mean
    fusion/margin = (7/6 + 1)/2 = 13/12. LN off: the same weights (CE is always the per-token mean) on the sums.
    """
    rows = _with_entropies(make_scored_rows(tiny_tok, 2, k=2, sources=("m0", "m1")),
                           [(-0.5, -1.5), (-1.0, -1.0)], [(0.5, 0.5), (1.0, 3.0)],
                           [(-2.0, -2.0)] * 2, [(2.0, 0.0)] * 2)
    for length_normalize in (True, False):
        trainer = InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                                 args=InfiFPOConfig(output_dir=str(tmp_path), fusion_method="uncertainty", clip=False,
                                                    length_normalize=length_normalize, **cpu_args()))
        trainer.model.train()
        trainer.compute_loss(trainer.model, _batch(trainer, 2))
        m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        assert (m["fusion/chosen_share/m0"], m["fusion/chosen_share/m1"]) == pytest.approx((2 / 3, 1 / 3), abs=1e-5)
        assert (m["fusion/rejected_share/m0"], m["fusion/rejected_share/m1"]) == pytest.approx((1 / 3, 2 / 3),
                                                                                               abs=1e-5)
        assert "fusion/chosen_share/pivot" not in m
        if length_normalize:
            want = 13 / 12
        else:
            f_w = [2 / 3 * r["fuse_chosen_logps"][0] + 1 / 3 * r["fuse_chosen_logps"][1] for r in rows]
            f_l = [1 / 3 * r["fuse_rejected_logps"][0] + 2 / 3 * r["fuse_rejected_logps"][1] for r in rows]
            want = sum(w - lo for w, lo in zip(f_w, f_l, strict=True)) / 2
        assert m["fusion/margin"] == pytest.approx(want, abs=1e-4)


def test_uncertainty_fusion_trains_with_the_pivot_as_a_candidate(tiny_llama, tiny_tok, tmp_path):
    """include_pivot: the pivot's mean entropy and mean log-prob make its weight; training runs and logs every
    candidate's share, the shares summing to 1 per side."""
    rows = make_scored_rows(tiny_tok, 4, k=2, sources=("m0", "m1"))
    _with_entropies(rows, [r["fuse_mean_chosen_logps"] for r in rows], [(0.3, 1.2)] * 4,
                    [r["fuse_mean_rejected_logps"] for r in rows], [(0.8, 0.1)] * 4)
    trainer = InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                             args=InfiFPOConfig(output_dir=str(tmp_path), fusion_method="uncertainty",
                                                include_pivot=True, **cpu_args()))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 3 and all(math.isfinite(e["loss"]) for e in logged)
    for side in ("chosen", "rejected"):
        shares = [logged[-1][f"fusion/{side}_share/{n}"] for n in ("m0", "m1", "pivot")]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5) and min(shares) > 0


def test_uncertainty_fusion_without_entropy_columns_says_to_rescore(tiny_llama, tiny_tok, tmp_path):
    """Scored pairs without entropies (the vLLM scorer, or scored before they existed): a MissingEntropyError that
    names the columns and the fix; a row whose entropy is null names the row."""
    rows = make_scored_rows(tiny_tok, 2, k=2)
    args = InfiFPOConfig(output_dir=str(tmp_path), fusion_method="uncertainty", **cpu_args())
    with pytest.raises(MissingEntropyError, match=r"no \['fuse_mean_chosen_entropy', .*\] column.*"
                                                  r"`infifpo score --backend transformers"):
        InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok, args=args)
    _with_entropies(rows, [r["fuse_mean_chosen_logps"] for r in rows], [(0.3, 1.2)] * 2,
                    [r["fuse_mean_rejected_logps"] for r in rows], [(0.8, 0.1)] * 2)
    rows[1]["fuse_mean_rejected_entropy"] = None
    with pytest.raises(MissingEntropyError, match=r"row 1 \(id='p001'\), field 'fuse_mean_rejected_entropy': no "
                                                  r"value.*--backend transformers"):
        InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok, args=args)
    rows[1]["fuse_mean_rejected_entropy"] = [0.8, 0.1]
    for row in rows:
        del row["ref_mean_chosen_entropy"]
    InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok, args=args)
    with pytest.raises(MissingEntropyError, match="ref_mean_chosen_entropy"):  # include_pivot needs the pivot's
        InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                       args=InfiFPOConfig(output_dir=str(tmp_path), fusion_method="uncertainty", include_pivot=True,
                                          **cpu_args()))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _hand_infifpo_loss(model, tok, rows, beta):
    """docs/methods.md, LN on, max_margin with clip (init): f(y_w) = max(v_r, max_k v_k), f(y_l) = min(v_r, min_k v_k);
    −log σ(β[(π̄_w − f_w) − (π̄_l − f_l)]) averaged over rows, π̄ from plain forwards."""
    losses = []
    for row in rows:
        texts = [row[r][-1]["content"] for r in ("chosen", "rejected")]
        sums, n = plain_completion_logps(model, tok, row["prompt"], texts)
        f_w = max(row["ref_mean_chosen_logps"], *row["fuse_mean_chosen_logps"])
        f_l = min(row["ref_mean_rejected_logps"], *row["fuse_mean_rejected_logps"])
        u = beta * ((sums[0] / n[0] - f_w) - (sums[1] / n[1] - f_l))
        losses.append(-torch.nn.functional.logsigmoid(u))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_sgd_step_follows_the_hand_computed_gradient(tiny_llama, tiny_tok, tmp_path, lora):
    """One SGD step moves every trainable parameter by −lr ∇L, L the InfiFPO loss computed by hand (plain forwards,
    the docs/methods.md max-margin form); with LoRA only adapter weights are trainable."""
    from peft import LoraConfig

    rows = make_scored_rows(tiny_tok, 2, k=2)  # batch 2 of 2 rows: the step sees both pairs
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    trainer = InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                             peft_config=peft,
                             args=InfiFPOConfig(output_dir=str(tmp_path), **sgd_args(learning_rate=0.5)))
    assert trainer.beta == 2.5
    assert_sgd_step(trainer, lambda m: _hand_infifpo_loss(m, tiny_tok, rows, 2.5), lr=0.5)
    assert not lora or all("lora_" in n for n in _params(trainer.model))


def test_official_format_example_loads_and_trains(tiny_llama, tiny_tok, tmp_path):
    rows = read_jsonl(EXAMPLE)
    assert "prompt" not in rows[0] and "ref_chosen_num_tokens" not in rows[0]
    trainer = InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                             args=InfiFPOConfig(output_dir=str(tmp_path), **sgd_args(learning_rate=0.5)))
    # TRL extracted the shared prompt: the completion is the assistant turn only.
    first = trainer.train_dataset[0]
    assert tiny_tok.decode(first["chosen_ids"]) == json.loads(EXAMPLE.read_text().splitlines()[0])["chosen"][1][
        "content"] + "|"
    as_ours = [{**r, "prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
               for r in rows]
    assert_sgd_step(trainer, lambda m: _hand_infifpo_loss(m, tiny_tok, as_ours, 2.5), lr=0.5)
    assert "fusion/chosen_share/src0" in trainer.state.log_history[0]  # no source_models column: src0..


def test_config_defaults_and_run_script_aliases(tmp_path):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    cfg = InfiFPOConfig(**base)
    assert (cfg.fusion_method, cfg.length_normalize, cfg.beta, cfg.clip, cfg.include_pivot) == (
        "max_margin", True, 2.5, True, True)
    assert cfg.margin_against == "init" and cfg.ref_offset is None and cfg.precompute_ref_log_probs
    alias = InfiFPOConfig(fusion_type="mean", length_norm=False, **base)
    assert (alias.fusion_method, alias.length_normalize, alias.beta) == ("mean", False, 0.1)
    assert InfiFPOConfig(beta=0.7, **base).beta == 0.7
    assert cfg.max_length == 4096  # the paper's, not TRL's inherited 1024
    # docs/methods.md §Fusion (choice): mean/confidence weight the N sources only unless asked; max-margin keeps the
    # pivot
    assert [InfiFPOConfig(fusion_method=m, **base).include_pivot for m in ("mean", "confidence", "max_margin_pair")] \
        == [False, False, True]
    assert InfiFPOConfig(fusion_method="mean", include_pivot=True, **base).include_pivot is True
    with pytest.raises(ConfigError, match="per-token"):
        InfiFPOConfig(loss_type="ipo", length_normalize=False, **base)
    with pytest.raises(ConfigError, match="hinge"):
        InfiFPOConfig(loss_type="hinge", **base)
    with pytest.raises(ConfigError, match="max_margin"):
        InfiFPOConfig(fusion_method="maxmargin", **base)


def test_wrpo_variant_loss_matches_hand_computation_with_fused_references(tiny_llama, tiny_tok, tmp_path):
    """InfiFPO-WRPO (docs/methods.md §The InfiFPO loss): the WRPO objective with every reference term replaced by f.

    LN off (sums), two sources, max_margin with clip against the initial pivot: f(y_ws) = max(r_ws, max_k s_k(y_ws)),
    f(y_wt) = max(r_wt, max_k s_k(y_wt)), f(y_l) = min(r_l, min_k s_k(y_l)); α constant 0.3, β 0.05;
    L = −log σ(β[α(π_ws − f_ws) + (1 − α)(π_wt − f_wt) − (π_l − f_l)]) with π from plain forwards.
    """
    rows = make_scored_rows(tiny_tok, 4, k=2, wrpo=True)
    infi = InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                          args=InfiFPOConfig(output_dir=str(tmp_path / "i"), loss_type="wrpo", length_normalize=False,
                                             alpha_max=0.3, is_dynamic=False, **cpu_args(beta=0.05)))
    infi.model.train()
    loss = infi.compute_loss(infi.model, _batch(infi, 4))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    expected = []
    with torch.no_grad():
        for row in rows:
            responses = ("source_chosen", "chosen", "rejected")
            pi = plain_completion_logps(model, tiny_tok, row["prompt"], [row[r][0]["content"] for r in responses])[0]
            f_ws, f_wt = (max(row[f"ref_{r}_logps"], *row[f"fuse_{r}_logps"]) for r in responses[:2])
            f_l = min(row["ref_rejected_logps"], *row["fuse_rejected_logps"])
            z = 0.05 * (0.3 * (pi[0].item() - f_ws) + 0.7 * (pi[1].item() - f_wt) - (pi[2].item() - f_l))
            expected.append(math.log1p(math.exp(-z)))
    assert loss.item() == pytest.approx(sum(expected) / 4, abs=1e-5)
    assert infi._metrics["train"]["alpha"] == [0.3]


@pytest.mark.parametrize("option", [
    {"label_smoothing": 0.1}, {"ld_alpha": 0.5}, {"f_divergence_type": "js_divergence"}, {"use_weighting": True},
    {"loss_weights": [1.0]}, {"padding_free": True}, {"truncation_mode": "keep_end"}])
def test_inherited_options_the_loss_ignores_are_refused(tmp_path, option):
    """TRL DPO options that InfiFPO's and WRPO's losses would silently ignore are named errors, not no-ops."""
    from infifpo.trainers.wrpo import WRPOConfig

    name = next(iter(option))
    for config in (InfiFPOConfig, WRPOConfig):
        with pytest.raises(ConfigError, match=name):
            config(output_dir=str(tmp_path), use_cpu=True, bf16=False, **option)
