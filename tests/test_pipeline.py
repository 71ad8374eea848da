"""`infifpo pipeline` end to end on tiny offline models: every stage runs as its own `infifpo <stage>` process, the
hand-offs line up (pairs → SFT → scored pairs with the SFT checkpoint as the frozen pivot → InfiFPO / DPO), and a
second run skips every finished stage.

Random tiny models write gibberish, so the math verifier marks every sample wrong; a tiny random reward model
breaks the ties so that pairs exist. Real models run in `make fpo` (configs/tiny.yaml).
"""

from __future__ import annotations

import json

import pytest
import yaml

from infifpo import pipeline
from infifpo.store import read_output
from tests.judge.conftest import make_tiny_reward_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, tiny_llama, tiny_qwen, tiny_llama_b):
    root = tmp_path_factory.mktemp("pipeline")
    rm = make_tiny_reward_model(str(root / "rm"))
    cfg = {
        "name": "tiny-offline", "run_dir": str(root / "run"), "pivot": tiny_llama,
        "sources": [tiny_qwen, tiny_llama_b], "backend": "transformers",
        "prompts": {"sources": ["arithmetic:train:10"], "seed": 0},
        "sample": {"max_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 0, "pivot": {"n": 2},
                   "sources": {"n": 1}},
        "judge": {"reward_model": rm},
        "pair": {"recipe": "infifpo", "sft_fraction": 0.5, "seed": 0},
        "score": {"dtype": "float32"},
        "train": {"methods": ["dpo", "infifpo"],
                  "common": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1,
                             "save_strategy": "no", "bf16": False, "report_to": "none"},
                  "infifpo": {"length_normalize": False, "beta": 0.1}},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_runs_every_stage_and_resumes(run_config):
    cfg = pipeline.load_config(run_config)
    first = pipeline.run(cfg)
    pairs = read_output(first["pairs"])
    scored = read_output(first["scored"])
    assert pairs and {r["split"] for r in pairs} <= {"sft", "po"}
    assert [r["id"] for r in scored] == [r["id"] for r in pairs]
    # The scored pivot is the SFT checkpoint the preference methods start from; every source scored every response.
    assert all(r["pivot_model"] == str(first["checkpoints"]["sft"]) for r in scored)
    assert all(len(r["fuse_chosen_logps"]) == 2 and r["ref_chosen_logps"] < 0 for r in scored)
    for method in ("sft", "dpo", "infifpo"):
        assert (first["checkpoints"][method] / "model.safetensors").exists(), method
    stages_logged = (cfg_path := (run_config.parent / "run" / "logs")).iterdir()
    assert {p.name for p in stages_logged} >= {"prompts.log", "sample.log", "judge.log", "pair.log", "score.log",
                                               "train.log"}
    # A second run finds every stage done: the same outputs, and no training process is started again.
    train_log = (cfg_path / "train.log").read_text()
    second = pipeline.run(cfg)
    assert json.dumps(second, default=str) == json.dumps(first, default=str)
    assert (cfg_path / "train.log").read_text() == train_log


def test_unknown_pipeline_key_is_an_error_with_a_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pivot: a\nsources: [b]\nprompts: {sources: []}\nsampel: {}\n")
    with pytest.raises(Exception, match="Did you mean 'sample'"):
        pipeline.load_config(bad)
