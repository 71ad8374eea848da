"""InfiFPOConfig.fusion_sources: fusing a named subset of the scored sources (the pipeline's one-source ablation)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from torch.testing import assert_close

from infifpo.schema import ConfigError
from infifpo.trainers.infifpo import InfiFPOConfig, InfiFPOTrainer
from tests.trainers.conftest import cpu_args, make_scored_rows
from tests.trainers.test_infifpo import _batch, _policy_mean_logps

# Per row (LN means, nats/token): chosen v_r, sources [m0, m1]; rejected v_r, sources [m0, m1].
VALUES = [(-1.0, [-0.8, -1.5], -1.2, [-1.0, -2.0]), (-0.9, [-0.5, -1.3], -1.1, [-1.4, -1.05])]


def _rows(tok):
    rows = make_scored_rows(tok, 2, k=2, sources=("m0", "m1"))
    for row, (rc, sc, rr, sr) in zip(rows, VALUES, strict=True):
        row.update(ref_mean_chosen_logps=rc, fuse_mean_chosen_logps=sc, ref_mean_rejected_logps=rr,
                   fuse_mean_rejected_logps=sr)
        for r in ("chosen", "rejected"):  # sums = mean x count, as `infifpo score` writes them
            row[f"ref_{r}_logps"] = row[f"ref_mean_{r}_logps"] * row[f"ref_{r}_num_tokens"]
            row[f"fuse_{r}_logps"] = [m * n for m, n in zip(row[f"fuse_mean_{r}_logps"], row[f"fuse_{r}_num_tokens"],
                                                            strict=True)]
    return rows


def test_fusion_sources_fuses_only_the_named_source(tiny_llama, tiny_tok, tmp_path):
    """max_margin, clip, pivot included, fusing m1 only: f(y_w) = max(v_r, v_m1), f(y_l) = min(v_r, v_m1).

    row 0: chosen -1.5 clipped to v_r -1.0; rejected -2.0 (m1). row 1: chosen -1.3 clipped to -0.9; rejected -1.05
    clipped to -1.1. Fused margins 1.0 and 0.2 (with m0 too they would be 1.2 and 0.9); 3 of 4 values clipped.
    """
    rows = _rows(tiny_tok)
    trainer = InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                             args=InfiFPOConfig(output_dir=str(tmp_path), fusion_sources=["m1"], **cpu_args()))
    assert trainer.train_dataset["source_models"] == [["m1"], ["m1"]]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, _batch(trainer, 2))
    expected = []
    for row, f_w, f_l in zip(rows, (-1.0, -0.9), (-2.0, -1.1), strict=True):
        pi_w, pi_l = _policy_mean_logps(tiny_llama, tiny_tok, row)
        expected.append(-torch.nn.functional.logsigmoid(torch.tensor(2.5 * ((pi_w - f_w) - (pi_l - f_l)))))
    assert_close(loss, torch.stack(expected).mean(), atol=1e-5, rtol=0)
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert m["fusion/margin"] == pytest.approx((1.0 + 0.2) / 2)
    assert m["fusion/clip_rate"] == pytest.approx(0.75)
    assert not any("/m0" in k for k in m) and "fusion/rejected_share/m1" in m


def test_fusion_sources_names_must_be_scored_sources(tiny_llama, tiny_tok, tmp_path):
    with pytest.raises(ConfigError, match="not all among its source_models"):
        InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(_rows(tiny_tok)), processing_class=tiny_tok,
                       args=InfiFPOConfig(output_dir=str(tmp_path), fusion_sources=["m9"], **cpu_args()))
