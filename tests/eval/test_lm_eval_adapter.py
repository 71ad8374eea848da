"""The lm-eval adapter: conversion of lm-eval 0.4's results dict into our benchmark entries, and the named error when
lm-eval is not installed (a dev dependency, so its absence is simulated here). Runs against the real lm-eval:
tests/eval/test_lm_eval_real.py."""

from __future__ import annotations

import importlib
import sys
import types

import pytest

from infifpo.eval import lm_eval_adapter
from infifpo.eval.lm_eval_adapter import convert_results, convert_task, require_lm_eval, run_lm_eval
from infifpo.schema import ConfigError, DataFormatError

# The shape `lm_eval.simple_evaluate` returns (0.4.x): "<metric>,<filter>" keys, "<metric>_stderr,<filter>" beside
# them ("N/A" when not computed), groups under "groups" with their subtasks in "group_subtasks", and n-samples.
RESULTS = {
    "results": {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.0119,
                  "exact_match,flexible-extract": 0.31, "exact_match_stderr,flexible-extract": 0.0127},
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.7, "acc_stderr,none": 0.0094, "acc_norm,none": 0.65,
                     "acc_norm_stderr,none": 0.0098},
        "piqa": {"alias": "piqa", "acc,none": 0.75, "acc_stderr,none": "N/A"},
        "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.4, "acc_stderr,none": 0.0423},
        "mmlu_astronomy": {"alias": " - astronomy", "acc,none": 0.5, "acc_stderr,none": 0.0407},
        "bleu_task": {"alias": "bleu_task", "bleu,none": 12.0, "bleu_stderr,none": 0.5},
    },
    "groups": {"mmlu": {"alias": "mmlu", "acc,none": 0.4527, "acc_stderr,none": 0.0291}},
    "group_subtasks": {"mmlu": ["mmlu_anatomy", "mmlu_astronomy"], "gsm8k": [], "arc_easy": [], "piqa": []},
    "versions": {"gsm8k": 3.0, "arc_easy": 1.0, "piqa": 1.0},
    "n-shot": {"gsm8k": 5, "arc_easy": 0, "piqa": 0},
    "higher_is_better": {"gsm8k": {"exact_match": True}, "arc_easy": {"acc": True, "acc_norm": True}},
    "n-samples": {"gsm8k": {"original": 1319, "effective": 1319}, "arc_easy": {"original": 2376, "effective": 100},
                  "piqa": {"original": 1838, "effective": 1838}, "mmlu_anatomy": {"original": 135, "effective": 135},
                  "mmlu_astronomy": {"original": 152, "effective": 152}},
    "config": {"model": "hf", "model_args": "pretrained=/ckpt", "batch_size": 8, "limit": None},
}


def test_exact_match_task_prefers_strict_match_and_uses_its_stderr() -> None:
    e = convert_task(RESULTS, "gsm8k")
    assert e["metric"] == "exact_match,strict-match"
    assert e["n"] == 1319 and e["correct"] == 330  # round(0.25 * 1319) = round(329.75)
    assert e["accuracy"] == pytest.approx(25.0)
    # 25 ± 1.959964 * 1.19 = 25 ± 2.3324
    assert e["ci95"] == [pytest.approx(22.6676, abs=1e-3), pytest.approx(27.3324, abs=1e-3)]
    assert e["ci_method"] == "normal"


def test_accuracy_task_uses_effective_samples_and_acc_over_acc_norm() -> None:
    e = convert_task(RESULTS, "arc_easy")
    assert (e["metric"], e["n"], e["correct"], e["accuracy"]) == ("acc,none", 100, 70, pytest.approx(70.0))
    assert e["ci95"] == [pytest.approx(70 - 1.959964 * 0.94, abs=1e-3), pytest.approx(70 + 1.959964 * 0.94, abs=1e-3)]


def test_missing_stderr_gives_no_interval_and_groups_sum_their_subtasks() -> None:
    piqa = convert_task(RESULTS, "piqa")
    assert piqa["ci95"] is None and piqa["ci_method"] == "none" and piqa["n"] == 1838
    mmlu = convert_task(RESULTS, "mmlu")
    assert mmlu["n"] == 135 + 152 and mmlu["accuracy"] == pytest.approx(45.27)
    assert list(convert_results(RESULTS, ["piqa", "gsm8k"])) == ["piqa", "gsm8k"]


def test_unknown_task_or_metric_is_a_named_error() -> None:
    with pytest.raises(DataFormatError, match="no entry for task 'hellaswag'"):
        convert_task(RESULTS, "hellaswag")
    with pytest.raises(DataFormatError, match="bleu_task.*none of the metrics"):
        convert_task(RESULTS, "bleu_task")


def test_missing_lm_eval_is_a_config_error_naming_the_install(monkeypatch) -> None:
    assert require_lm_eval() is importlib.import_module("lm_eval")  # installed (dev dependency): absence is simulated
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError, installed or not
    with pytest.raises(ConfigError, match="pip install lm-eval"):
        require_lm_eval()
    with pytest.raises(ConfigError, match="pip install lm-eval"):
        run_lm_eval("/nonexistent", ["arc_easy"])


def test_eval_refuses_lm_eval_tasks_before_loading_any_model(monkeypatch, tmp_path) -> None:
    """The check runs before the model is resolved and before any stage runs, in both forms of `infifpo eval`: a
    model that does not exist would otherwise raise ModelLoadError (the inputs of the stage form, a StoreError), so
    ConfigError here shows nothing was loaded, generated or written."""
    from infifpo.evaluate import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError, match="pip install lm-eval"):
        main(["--model", str(tmp_path / "no-such-model"), "--benchmarks", "arithmetic:test:2", "--lm-eval", "arc_easy",
              "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="pip install lm-eval"):
        main(["--model", str(tmp_path / "no-such-model"), "--samples", str(tmp_path / "s"), "--judged",
              str(tmp_path / "j"), "--prompts", str(tmp_path / "p"), "--lm-eval", "arc_easy", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_run_lm_eval_passes_the_checkpoint_and_drops_arguments_an_older_release_lacks(monkeypatch) -> None:
    """Glue only: which arguments reach ``simple_evaluate``, and that its return value goes through the conversion.
    A module object stands in for lm-eval's package namespace (the real one: tests/eval/test_lm_eval_real.py)."""
    calls = []

    def simple_evaluate(model, model_args=None, tasks=None, batch_size=None, device=None, limit=None,
                        log_samples=True, random_seed=0):  # an older signature: no numpy/torch/fewshot seeds
        calls.append(dict(model=model, model_args=model_args, tasks=tasks, device=device, limit=limit,
                          log_samples=log_samples, random_seed=random_seed))
        return RESULTS

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    out = run_lm_eval("/ckpt/sft", ["arc_easy", "gsm8k"], limit=100, device="cpu", seed=3)
    assert calls == [{"model": "hf", "model_args": {"pretrained": "/ckpt/sft", "dtype": "auto",
                                                    "trust_remote_code": False},
                      "tasks": ["arc_easy", "gsm8k"], "device": "cpu", "limit": 100, "log_samples": False,
                      "random_seed": 3}]
    assert out == convert_results(RESULTS, ["arc_easy", "gsm8k"])
    assert lm_eval_adapter.METRIC_PREFERENCE[0] == "acc,none"
    with pytest.raises(ConfigError, match="no task_manager, so task directories"):  # not silently dropped
        run_lm_eval("/ckpt/sft", ["my_task"], device="cpu", include_path="/my/tasks")
    assert len(calls) == 1
