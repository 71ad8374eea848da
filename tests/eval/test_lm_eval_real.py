"""The lm-eval adapter against a real lm-evaluation-harness (0.4.13, a dev dependency), offline.

The task is local (tests/fixtures/lm_eval: ``infifpo_tiny_mc``, 8 multiple-choice items in a JSONL read through the HF
``json`` dataset builder) and the model is the tiny random Llama, so a run takes seconds on CPU; most of it is lm-eval
indexing its own task registry. ``run_lm_eval`` gets the task directory as ``include_path``; ``simple_evaluate`` is
wrapped to record lm-eval's own results dict of that same run, and the adapter's entry is checked against it:
accuracy = 100·acc (not acc_norm, which differs here), n = the effective n-samples (= the JSONL's lines, or the limit),
ci95 = accuracy ± 1.96·stderr in percent, clipped to [0, 100]. Nothing may reach the network: the hub and datasets
are offline and any TCP connect fails the test.
"""

from __future__ import annotations

import functools
import json
import socket
from pathlib import Path

import lm_eval  # a dev dependency: not skipped when missing, so CI cannot pass without running these
import pytest

from infifpo.eval.lm_eval_adapter import run_lm_eval

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval"
TASK = "infifpo_tiny_mc"
Z95 = 1.959964


def jsonl_items() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "tiny_mc.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def offline(monkeypatch, tmp_path) -> list:
    """Hub and datasets offline (the environment, and the flags those libraries read at import), the datasets cache
    in tmp_path, the working directory the task directory (its data_files are relative to it), and every TCP/UDP
    connect refused and recorded: the returned list must stay empty."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.chdir(FIXTURES)
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access in an offline test: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def recorded_run(monkeypatch, model_dir: str, limit: int | None) -> tuple[dict, dict]:
    """(the adapter's entry for TASK, lm-eval's own results dict of the same ``simple_evaluate`` call)."""
    calls = []
    real = lm_eval.simple_evaluate

    @functools.wraps(real)  # the adapter reads its signature
    def simple_evaluate(**kwargs):
        calls.append(real(**kwargs))
        return calls[-1]

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    out = run_lm_eval(model_dir, [TASK], batch_size=4, limit=limit, device="cpu", dtype="float32", seed=0,
                      include_path=FIXTURES)
    assert len(calls) == 1 and list(out) == [TASK]
    return out[TASK], calls[0]


def expected_interval(acc: float, stderr: float) -> list:
    return [pytest.approx(max(0.0, 100 * (acc - Z95 * stderr)), abs=1e-5),
            pytest.approx(min(100.0, 100 * (acc + Z95 * stderr)), abs=1e-5)]


@pytest.mark.timeout(120)
def test_entry_matches_lm_evals_own_results_on_a_local_task(tiny_llama, monkeypatch, offline) -> None:
    items = jsonl_items()
    entry, results = recorded_run(monkeypatch, tiny_llama, limit=None)
    block = results["results"][TASK]
    acc, stderr = block["acc,none"], block["acc_stderr,none"]
    # What makes the comparison discriminating: a run where acc and acc_norm differ and acc is neither 0 nor 1 (so a
    # conversion reading acc_norm, or scaling to percent twice, or not at all, gives another number).
    assert block["acc_norm,none"] != acc and 0 < acc < 1 and stderr > 0
    assert results["n-samples"][TASK] == {"original": len(items), "effective": len(items)} and len(items) == 8
    assert entry == {"n": len(items), "correct": round(acc * len(items)), "accuracy": pytest.approx(100 * acc),
                     "ci95": expected_interval(acc, stderr), "ci_method": "normal", "metric": "acc,none",
                     "source": "lm-eval"}
    assert entry["correct"] == pytest.approx(acc * len(items))  # acc is a mean over the 8 items: a whole count
    assert results["config"]["model_args"]["pretrained"] == tiny_llama and results["config"]["limit"] is None
    assert offline == []


@pytest.mark.timeout(120)
def test_a_limit_counts_the_effective_items(tiny_llama, monkeypatch, offline) -> None:
    entry, results = recorded_run(monkeypatch, tiny_llama, limit=5)
    block = results["results"][TASK]
    assert results["n-samples"][TASK] == {"original": len(jsonl_items()), "effective": 5}
    assert (entry["n"], entry["correct"], entry["metric"]) == (5, round(block["acc,none"] * 5), "acc,none")
    assert entry["accuracy"] == pytest.approx(100 * block["acc,none"])
    assert entry["ci95"] == expected_interval(block["acc,none"], block["acc_stderr,none"])
    assert offline == []


@pytest.mark.timeout(180)
def test_the_eval_stage_runs_a_local_task_from_its_include_path(tiny_llama, offline, tmp_path) -> None:
    """`infifpo eval --lm_eval TASK --lm_eval_include_path DIR`: the stage's scores carry lm-eval's entry for a task
    that exists only in DIR (lm-eval would not find it otherwise); a missing DIR is a ConfigError before any model
    loads."""
    from infifpo.config import parse_config
    from infifpo.eval import stage
    from infifpo.schema import ConfigError
    from infifpo.store import read_output
    from tests.eval.test_stage import judge, known_answer, prompts_output, write_samples

    root = tmp_path / "inputs"
    prompts = prompts_output(root, "arithmetic:test:2")
    samples = write_samples(tiny_llama, read_output(prompts), root, known_answer)
    argv = ["--samples", str(samples), "--judged", str(judge(samples, prompts, root)), "--prompts", str(prompts),
            "--model", tiny_llama, "--out", str(tmp_path / "out"), "--lm_eval", TASK, "--lm_eval_limit", "3"]
    with pytest.raises(ConfigError, match="no-such-dir: no such file or directory"):
        missing = str(tmp_path / "no-such-dir")
        stage.run_eval(parse_config(stage.EvalOptions, [*argv, "--lm_eval_include_path", missing], prog="t"))
    out = stage.run_eval(parse_config(stage.EvalOptions, [*argv, "--lm_eval_include_path", str(FIXTURES)], prog="t"))
    scores = json.loads((out / "scores.json").read_text())["benchmarks"]
    assert scores["arithmetic"]["n"] == 2 and scores[TASK]["n"] == 3 and scores[TASK]["source"] == "lm-eval"
    assert offline == []
