"""`infifpo pipeline` end to end on tiny offline models: every stage runs as its own `infifpo <stage>` process, the
hand-offs line up (pairs → SFT → scored pairs with the SFT checkpoint as the frozen pivot → DPO / InfiFPO → eval of
every report row → report; WRPO, with its own SFT and sampling pass, seeds and ablation arms:
tests/test_pipeline_reproduce.py), a second run skips every finished stage, and a run killed during sampling,
scoring and training resumes to the same report without duplicated rows.

Random tiny models write gibberish, so the math verifier marks every sample wrong; a tiny random reward model
breaks the ties so that pairs exist. Real models run in `make fpo` (configs/tiny.yaml).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
        "prompts": {"sources": ["arithmetic:train:40"], "seed": 0},
        "sample": {"max_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 0, "pivot": {"n": 2},
                   "sources": {"n": 1}, "batch_prompts": 4},  # several flushes: the kill test lands mid-sampling
        "judge": {"reward_model": rm},
        "pair": {"recipe": "infifpo", "sft_fraction": 0.5, "seed": 0, "allow_truncated_chosen": True},
        "score": {"dtype": "float32", "write_every": 4},
        "train": {"methods": ["dpo", "infifpo"],
                  "common": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1,
                             "save_strategy": "no", "bf16": False, "report_to": "none"},
                  "infifpo": {"length_normalize": False, "beta": 0.1}},
        "eval": {"benchmarks": ["arithmetic:test:6", "humaneval:test:2"], "max_tokens": 12},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_runs_every_stage_and_resumes(run_config):
    cfg = pipeline.load_config(run_config)
    first = pipeline.run(cfg)
    pairs = read_output(first["pairs"]["infifpo"])
    scored = read_output(first["scored"])
    assert pairs and {r["split"] for r in pairs} <= {"sft", "po"}
    assert [r["id"] for r in scored] == [r["id"] for r in pairs if r["split"] == "po"]  # only PO rows are scored
    # The scored pivot is the SFT checkpoint the preference methods start from; every source scored every response.
    assert all(r["pivot_model"] == str(first["checkpoints"]["sft"]) for r in scored)
    assert all(len(r["fuse_chosen_logps"]) == 2 and r["ref_chosen_logps"] < 0 for r in scored)
    for method in ("sft", "dpo", "infifpo"):
        assert (first["checkpoints"][method] / "model.safetensors").exists(), method
        log = json.loads((first["checkpoints"][method] / "infifpo_train_log.json").read_text())
        assert any("loss" in entry for entry in log["log_history"]), method
    # Every report row was evaluated on every benchmark item, and the report renders them in the paper's order.
    assert set(first["evals"]) == {"pivot", *(f"source:{m}" for m in cfg["sources"]), "sft", "dpo", "infifpo"}
    for label, out in first["evals"].items():
        items = read_output(out)
        assert sorted(r["benchmark"] for r in items) == ["arithmetic"] * 6 + ["humaneval"] * 2, label
    saved = json.loads((run_config.parent / "run" / "pipeline_outputs.json").read_text())  # relative to the run dir
    assert saved["scored"] == str(Path(first["scored"]).resolve().relative_to((run_config.parent / "run").resolve()))
    assert pipeline.load_outputs(run_config.parent / "run")["scored"] == str(Path(first["scored"]).resolve())
    report = json.loads((run_config.parent / "run" / "report.json").read_text())
    assert (run_config.parent / "run" / "report.md").exists() and report
    assert set(json.loads((run_config.parent / "run" / "timings.json").read_text())) >= {
        "prompts", "judge", "pair/infifpo", "score", "train/sft", "train/infifpo", "eval/infifpo"}
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


def _partial(paths: list[Path]) -> list[Path]:
    """Part files with at least one row in stage outputs that are not finalized yet."""
    return [p for p in paths if p.stat().st_size > 0 and not (p.parent / "_SUCCESS").exists()]


def _kill_when(cmd: list[str], ready, log: Path, poll_s: float = 0.02) -> list[Path]:
    """Start the pipeline, SIGKILL its whole process group once ``ready()`` returns paths; return them. Like
    ``_run``, it runs in the log's folder, outside the repository: the packaged train configs are found from there."""
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, cwd=log.parent)
        while proc.poll() is None:
            hit = ready()
            if hit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return hit
            time.sleep(poll_s)
    raise AssertionError(f"the pipeline finished (exit {proc.returncode}) before the kill point; see {log}")


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as err:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=err, cwd=log.parent)


def _report_without_times(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    return {k: v for k, v in report.items() if k not in ("cost", "timings", "generated_at")}


def test_pipeline_killed_during_sampling_scoring_and_training_resumes(run_config, tmp_path):
    cfg = yaml.safe_load(run_config.read_text())
    run_dir = tmp_path / "killed"
    cfg["run_dir"] = str(run_dir)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "infifpo.cli", "pipeline", "--config", str(path)]
    data, log = run_dir / "data", tmp_path / "pipeline.log"

    # 1. During sampling: rows already flushed when the kill lands must survive unchanged (nothing is redone).
    hit = _kill_when(cmd, lambda: _partial(list(data.glob("samples-*/part-*.jsonl"))), log)
    before = {json.loads(line)["id"]: line for p in hit for line in p.read_text().splitlines() if line.endswith("}")}
    # 2. During scoring (SFT finished before it), 3. during a preference-training run.
    _kill_when(cmd, lambda: _partial([p for p in data.glob("*/part-*.jsonl") if "score" in p.parent.name]), log)
    _kill_when(cmd, lambda: [p for p in (run_dir / "checkpoints").glob("*/infifpo_train_config.yaml")
                             if not p.parent.name.startswith("sft") and not (p.parent / pipeline.TRAIN_DONE).exists()],
               log)
    _run(cmd, log)

    outputs = pipeline.load_outputs(run_dir)  # paths are recorded relative to the run directory
    stage_dirs = [*outputs["samples"].values(), *outputs["judged"], *outputs["pairs"].values(), outputs["scored"],
                  *outputs["evals"].values()]
    for d in stage_dirs:  # every stage output complete, verified against its checksums, no id twice
        ids = [r["id"] for r in read_output(d)]
        assert len(ids) == len(set(ids)) and ids, d
    final = {r["id"]: r for d in outputs["samples"].values() for r in read_output(d)}
    assert before and all(json.loads(line) == final[i] for i, line in before.items())
    for method in ("sft", "dpo", "infifpo"):
        assert (Path(outputs["checkpoints"][method]) / pipeline.TRAIN_DONE).exists()
    # Running it again changes nothing: the same report.
    first_report = _report_without_times(run_dir)
    _run(cmd, log)
    assert _report_without_times(run_dir) == first_report
    assert set(first_report) and (run_dir / "report.md").exists()
