"""`train.grid`: every method's hyper-parameters chosen on a dev split held out from the run's prompts, never on the
test items (issue: faithful baselines with the same hyper-parameter budget). End to end on tiny offline models, and
the config errors before any stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from infifpo import pipeline
from infifpo.schema import ConfigError
from infifpo.store import read_output
from tests.judge.conftest import make_tiny_reward_model

# The first test to use the fixture pays for it: the module fixture runs the whole tiny pipeline with a grid.
pytestmark = pytest.mark.timeout(1800)
LRS = [1.0e-5, 1.0e-3]


def _cfg(**train) -> dict:
    return {"pivot": "p", "sources": ["a"], "prompts": {"sources": ["arithmetic:train:24"]},
            "train": {"methods": ["dpo", "infifpo"], **train}}


@pytest.mark.parametrize(("grid", "match"), [
    ({"common": {"learning_rate": [1e-6]}}, "dev_items must be a positive integer"),
    ({"dev_items": 4, "ipo": {"beta": [1]}}, r"unknown key\(s\) \['ipo'\]"),
    ({"dev_items": 4, "common": {"learning_rate": []}}, "expected a non-empty list"),
    ({"dev_items": 4, "common": {"seed": [1, 2]}}, "not a seed or config key"),
    ({"dev_items": 4, "dpo": {"beta": [0.1, 0.5]}}, r"different numbers of points \{'dpo': 2, 'infifpo': 1\}"),
])
def test_bad_grids_are_config_errors(grid, match):
    with pytest.raises(ConfigError, match=match):
        pipeline.grid_of(_cfg(grid=grid))


def test_grid_points_are_the_product_of_common_and_the_methods_own():
    points = pipeline.grid_of(_cfg(grid={"dev_items": 4, "common": {"learning_rate": [1, 2]},
                                         "dpo": {"beta": [0.1, 0.5]}, "infifpo": {"beta": [1.0, 2.5]}}))
    assert points["dpo"] == [{"learning_rate": 1, "beta": 0.1}, {"learning_rate": 1, "beta": 0.5},
                             {"learning_rate": 2, "beta": 0.1}, {"learning_rate": 2, "beta": 0.5}]
    assert [p["beta"] for p in points["infifpo"]] == [1.0, 2.5, 1.0, 2.5]
    assert pipeline.grid_of(_cfg()) == {}


def test_dev_split_follows_each_prompt_source_and_needs_a_size():
    cfg = _cfg(grid={"dev_items": 5})
    cfg["prompts"]["sources"] = ["arithmetic:train:24", {"source": "gsm8k", "split": "train", "n": 3, "offset": 2}]
    assert pipeline.dev_specs(cfg) == [{"source": "arithmetic", "split": "train", "n": 5, "offset": 24},
                                       {"source": "gsm8k", "split": "train", "n": 5, "offset": 5}]
    cfg["prompts"]["sources"] = ["humaneval:test"]
    with pytest.raises(ConfigError, match="takes every row, so none is left for a dev split"):
        pipeline.dev_specs(cfg)


@pytest.fixture(scope="module")
def gridded(tmp_path_factory, tiny_llama, tiny_qwen):
    """A pipeline run with a learning-rate grid for DPO and InfiFPO and two seeds. Random tiny models answer every dev
    item wrong, so the dev accuracy is patched to prefer the second learning rate: the choice must follow it."""
    root = tmp_path_factory.mktemp("grid")
    cfg = {
        "name": "tiny-grid", "run_dir": str(root / "run"), "pivot": tiny_llama, "sources": [tiny_qwen],
        "backend": "transformers", "prompts": {"sources": ["arithmetic:train:16"], "seed": 0},
        "sample": {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 0, "pivot": {"n": 2},
                   "sources": {"n": 1}},
        "judge": {"reward_model": make_tiny_reward_model(str(root / "rm"))},
        "pair": {"sft_fraction": 0.5, "seed": 0, "allow_truncated_chosen": True},
        "score": {"dtype": "float32"},
        "train": {"methods": ["dpo", "infifpo"], "seeds": [0, 1], "grid": {"dev_items": 3,
                                                                           "common": {"learning_rate": LRS}},
                  "common": {"max_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1,
                             "save_strategy": "no", "bf16": False, "report_to": "none"},
                  "infifpo": {"length_normalize": False, "beta": 0.1}},
        "eval": {"benchmarks": ["arithmetic:test:2"], "max_tokens": 4},
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cfg = pipeline.load_config(path)
    real = pipeline.dev_accuracy

    def prefer_second(eval_dir):  # the grid point's checkpoint directory names its learning rate
        model = json.loads((Path(eval_dir) / "scores.json").read_text())["model"]
        return {**real(eval_dir), "dev_accuracy": 50.0 if f"learning_rate_{LRS[1]}" in model else 0.0}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "dev_accuracy", prefer_second)
        out = pipeline.run(cfg)
    return cfg, out


def _resolved(checkpoint) -> dict:
    return yaml.safe_load((Path(checkpoint) / "infifpo_train_config.yaml").read_text())


@pytest.mark.slow
def test_every_seed_trains_with_the_values_chosen_on_dev(gridded):
    cfg, out = gridded
    saved = json.loads((Path(cfg["run_dir"]) / "pipeline_outputs.json").read_text())
    for method in ("dpo", "infifpo"):
        g = saved["grid"]["methods"][method]
        assert [p["overrides"] for p in g["points"]] == [{"learning_rate": lr} for lr in LRS]
        assert g["chosen"] == {"learning_rate": LRS[1]} and [p["dev_accuracy"] for p in g["points"]] == [0.0, 50.0]
        assert all(p["dev_n"] == 3 for p in g["points"])
        # the first seed's run is the chosen grid run itself; the second seed trains with the chosen values
        assert out["checkpoints"][method] == next(Path(p) for lab, p in out["grid_checkpoints"].items()
                                                  if lab == g["chosen_label"])
        assert _resolved(out["checkpoints"][f"{method}@seed1"])["learning_rate"] == LRS[1]
        assert saved["runs"][f"{method}@seed1"]["overrides"] == {"learning_rate": LRS[1]}
    assert set(saved["grid_checkpoints"]) == set(saved["grid_evals"]) and len(saved["grid_evals"]) == 4
    assert not set(saved["grid_evals"]) & set(saved["evals"])  # grid points are not report rows
    report = (Path(cfg["run_dir"]) / "report.md").read_text()
    assert "## Hyper-parameters chosen on the dev split" in report and "rows 16-18" in report


@pytest.mark.slow
def test_dev_items_are_neither_training_prompts_nor_test_items(gridded):
    cfg, out = gridded
    dev_ids = {r["id"] for d in out["grid_evals"].values() for r in read_output(Path(d))}
    train_ids = {r["id"] for r in read_output(out["prompts"])}
    test_ids = {r["id"] for r in read_output(Path(out["evals"]["pivot"]))}
    assert len(dev_ids) == 3 and len(test_ids) == 2 and not dev_ids & train_ids and not dev_ids & test_ids
