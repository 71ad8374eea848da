"""`infifpo eval --model M --benchmarks SPEC ...` (``infifpo.evaluate``, ``pipeline.eval_prompts`` and
``pipeline.evaluate_model``): one command that evaluates a model by running the stages through files, each in its own
process: `infifpo prompts` (per benchmark, and all of them), greedy `infifpo sample`, `infifpo judge`, then the eval
stage. On the offline tiny model with transformers here, and vLLM under the `vllm` mark: the outputs each stage
writes, an item too long for the context counted wrong, a re-run that redoes nothing, a torn eval output resumed."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from infifpo import evaluate, pipeline
from infifpo.eval.stage import count_params, read_scores
from infifpo.eval.stats import wilson_interval
from infifpo.schema import ConfigError
from infifpo.store import SUCCESS, read_output

BENCHMARKS = ["arithmetic:test:6", "gsm8k:test:3", "humaneval:test:2"]


def last_line(capsys) -> Path:
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def files(d: Path) -> dict[str, tuple[bytes, int]]:
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in d.iterdir() if f.is_file()}


def test_options_follow_the_config_convention_and_pick_the_form(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        evaluate.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(pipeline.EvaluateOptions):
        assert re.search(rf"^\s+--{f.name}(?=[\s,])", out, re.M), f.name
        assert "".join(f.metadata["help"].split()) in "".join(out.split()), f.name
    assert "--judged, --prompts, --samples" in out and "--judged DIR --help" in out
    with pytest.raises(SystemExit):
        evaluate.main(["--judged", "x", "--help"])  # the stage's own options
    assert "--samples SAMPLES" in capsys.readouterr().out
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"model": "m", "max_token": 8}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in .*typo\.yaml: 'max_token' \(did you mean "
                                          r"'max_tokens'\?\)"):
        evaluate.main(["--config", str(typo)])
    # A stage option on the command line or in --config selects the stage form, spelt either way.
    assert evaluate.stage_form(["--samples", "s"]) and evaluate.stage_form(["--judged=j"])
    assert not evaluate.stage_form(["--model", "m", "--benchmarks", "gsm8k:test:3"])
    stage_cfg = tmp_path / "stage.yaml"
    stage_cfg.write_text(yaml.safe_dump({"judged": "j", "model": "m"}))
    assert evaluate.stage_form(["--config", str(stage_cfg)])
    with pytest.raises(ConfigError, match=r"missing required option\(s\) samples, prompts"):
        evaluate.main(["--config", str(stage_cfg)])
    assert evaluate.STAGE_ONLY == ["judged", "prompts", "samples"]


def test_the_pipeline_eval_section_takes_the_options_but_model_label_and_out(tmp_path) -> None:
    dirs = (tmp_path / "data", tmp_path / "logs")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in the config's eval section: 'max_token' \(did you "
                                          r"mean 'max_tokens'\?\), 'model'"):
        pipeline.evaluate({"eval": {"benchmarks": ["arithmetic:test:2"], "max_token": 8, "model": "x"}},
                          {"pivot": "p"}, dirs, pipeline.Timings(tmp_path / "timings.json"))
    assert pipeline.evaluate({}, {"pivot": "p"}, dirs, pipeline.Timings(tmp_path / "timings.json")) == {}
    assert not dirs[0].exists()
    with pytest.raises(ConfigError, match="benchmarks is empty"):
        pipeline.EvaluateOptions(model="m", benchmarks=[])


def test_eval_end_to_end_transformers_rerun_and_resume(tiny_llama: str, tmp_path: Path, capsys) -> None:
    long_item = tmp_path / "long.jsonl"  # a prompt longer than the 1024-token context: an error row, scored wrong
    long_item.write_text(json.dumps({"id": "long-0", "prompt": "z" * 1100 + " What is 2+2?", "domain": "math",
                                     "answer": "4"}) + "\n")
    argv = ["--model", tiny_llama, "--label", "tiny", "--benchmarks", *BENCHMARKS, f"jsonl:{long_item}",
            "--backend", "transformers", "--max-tokens", "8", "--dtype", "float32", "--out", str(tmp_path)]
    assert evaluate.main(argv) == 0
    out = last_line(capsys)
    assert out.parent == tmp_path and out.name.startswith("eval-tiny-") and (out / SUCCESS).exists()
    # Every stage wrote its own output under --out: one prompts output per benchmark and one of them all, the greedy
    # samples and their verdicts.
    assert len(list(tmp_path.glob("prompts-*"))) == 5
    (samples_dir,) = tmp_path.glob(f"samples-eval-{Path(tiny_llama).name}-*")
    (judged_dir,) = tmp_path.glob("judged-eval-*")
    assert {p.name for p in (tmp_path / "logs").glob("*.log")} == {"prompts.log", "sample.log", "judge.log",
                                                                   "eval.log"}

    scores, rows = read_scores(out), read_output(out)
    assert list(scores["benchmarks"]) == ["arithmetic", "gsm8k", "humaneval", "jsonl:long"]
    for bench, e in scores["benchmarks"].items():
        verdicts = [r["correct"] for r in rows if r["benchmark"] == bench]
        assert (e["n"], e["correct"]) == (len(verdicts), sum(verdicts)), bench
        assert e["ci95"] == pytest.approx(list(wilson_interval(sum(verdicts), len(verdicts))))
    assert scores["model"] == tiny_llama and scores["label"] == "tiny" and scores["params"] == count_params(tiny_llama)
    assert scores["generation"]["backend"] == "transformers" and scores["generation"]["temperature"] == 0.0
    assert scores["generation"]["n"] == 1 and scores["generation"]["max_tokens"] == 8
    assert scores["generation"]["engine"] == {"dtype": "float32"}
    assert scores["generation"]["samples"] == str(samples_dir)
    samples = {s["prompt_id"]: s for s in read_output(samples_dir)}
    assert scores["tokens_generated"] == sum(s["num_tokens"] for s in samples.values()) > 0
    assert all(r["completion"] == samples[r["prompt_id"]]["text"] for r in rows)
    assert all(0 < s["num_tokens"] <= 8 for pid, s in samples.items() if pid != "long-0")
    assert {r["prompt_id"]: r["correct"] for r in read_output(judged_dir)} == {r["prompt_id"]: r["correct"]
                                                                                 for r in rows}
    long_row = next(r for r in rows if r["prompt_id"] == "long-0")
    assert (long_row["finish_reason"] == "error" and not long_row["correct"]
            and "generation error: prompt is" in long_row["reason"])

    # A finished eval: a re-run samples, judges and writes nothing and prints the same directory.
    before = {d: files(d) for d in (out, samples_dir, judged_dir)}
    assert evaluate.main(argv) == 0
    assert last_line(capsys) == out
    assert {d: files(d) for d in before} == before
    assert "already complete, skipping" in (tmp_path / "logs" / "sample.log").read_text().rsplit("\n$ ", 1)[1]

    # Killed while writing: no marker, no scores, half the rows and a torn last line. The re-run completes it
    # from the kept samples and verdicts without duplicating any row.
    part = next(out.glob("part-*.jsonl"))
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:20])
    (out / SUCCESS).unlink()
    (out / "scores.json").unlink()
    assert evaluate.main(argv) == 0
    assert read_output(out) == rows and read_scores(out)["benchmarks"] == scores["benchmarks"]
    assert {d: files(d) for d in (samples_dir, judged_dir)} == {d: before[d] for d in (samples_dir, judged_dir)}


@pytest.mark.vllm
def test_eval_end_to_end_vllm(tiny_llama: str, tmp_path: Path, capsys) -> None:
    """The vLLM path: the sample stage's engine on the prompts of every benchmark."""
    pytest.importorskip("vllm")
    argv = ["--model", tiny_llama, "--label", "tiny-vllm", "--benchmarks", "arithmetic:test:4", "humaneval:test:1",
            "--backend", "vllm", "--max-tokens", "8", "--dtype", "float32", "--max-model-len", "512",
            "--out", str(tmp_path)]
    assert evaluate.main(argv) == 0
    out = last_line(capsys)
    scores = read_scores(out)
    assert scores["generation"]["backend"] == "vllm" and scores["generation"]["engine"]["max_model_len"] == 512
    assert {b: e["n"] for b, e in scores["benchmarks"].items()} == {"arithmetic": 4, "humaneval": 1}
    samples = read_output(scores["generation"]["samples"])
    assert len(samples) == 5 and scores["tokens_generated"] == sum(s["num_tokens"] for s in samples) > 0
    assert all(s["finish_reason"] in ("stop", "length") and s["num_tokens"] <= 8 for s in samples)
    before = files(Path(scores["generation"]["samples"]))
    assert evaluate.main(argv) == 0 and last_line(capsys) == out
    assert files(Path(scores["generation"]["samples"])) == before
