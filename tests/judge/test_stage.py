"""The `infifpo judge` stage: join by prompt_id, verdicts per domain, rewards, resumable keyed output."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from infifpo.judge.reward_model import score_with_reward_model
from infifpo.judge.stage import JudgeOptions, judge_rows, main
from infifpo.models.resolve import model_identity
from infifpo.provenance import InputMismatchError, prompt_set_digest
from infifpo.schema import JUDGED_COLUMNS, ConfigError, DataFormatError, sample_id
from infifpo.store import StageOutput, read_output
from tests.config_convention import (
    dashed_flags_parse_alike,
    help_lists_every_option,
    imports_light,
    misspelt_key_is_named,
    parse_with_yaml,
)

ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def _prompts() -> list[dict]:
    base = {"tests": None, "entry_point": None, "answer": None, "source": "test"}
    return [
        {**base, "id": "m1", "prompt": [{"role": "user", "content": "12 * 7?"}], "domain": "math", "answer": "84"},
        {**base, "id": "m2", "prompt": [{"role": "user", "content": "1000 + 250?"}], "domain": "math",
         "answer": "1,250"},
        {**base, "id": "c1", "prompt": [{"role": "user", "content": "```python\nfrom typing import List\n"
                                         "def add(a: int, b: int) -> int:\n```"}],
         "domain": "code", "tests": ADD_TEST, "entry_point": "add"},
        {**base, "id": "g1", "prompt": [{"role": "user", "content": "Say hi."}], "domain": "general"},
    ]


TEXTS = {
    ("m1", 0): "12 * 7 = 84. The answer is 84.",
    ("m1", 1): "12 * 7 = 94. The answer is 94.",
    ("m2", 0): "The answer is $1,250.",
    ("m2", 1): "Let me think about 1000",  # truncated: finish_reason "length"
    ("c1", 0): "```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```",
    ("c1", 1): "```python\ndef add(a, b):\n    return a - b\n```",
    ("g1", 0): "Hi!",
    ("g1", 1): "Hello.",
}


def _samples(model: str = "m") -> list[dict]:
    rows = []
    for (pid, k), text in TEXTS.items():
        rows.append({"id": sample_id(pid, model, k), "prompt_id": pid, "model": model, "sample_index": k,
                     "completion_ids": [1, 2], "text": text,
                     "finish_reason": "length" if pid == "m2" and k else "stop",
                     "gen_logp": -1.5, "num_tokens": 2, "seed": 0})
    return rows


EXPECTED = {("m1", 0): True, ("m1", 1): False, ("m2", 0): True, ("m2", 1): False, ("c1", 0): True, ("c1", 1): False,
            ("g1", 0): None, ("g1", 1): None}


def _write(root: Path, name: str, rows: list[dict], **key) -> str:
    return str(StageOutput(root, name, {"test": name, **key}).write_all(rows))


def _write_samples(root: Path, rows: list[dict]) -> str:
    """A samples output recording the prompts it was drawn from, as `infifpo sample` writes it."""
    return _write(root, "samples-m", rows, prompts=prompt_set_digest(_prompts()))


def test_judge_rows_joins_by_prompt_id_not_order() -> None:
    prompts = _prompts()
    random.Random(1).shuffle(prompts)
    samples = _samples()
    random.Random(2).shuffle(samples)
    rows = judge_rows(samples, prompts, workers=2, progress=False, code_timeout=60.0)
    assert [r["id"] for r in rows] == [s["id"] for s in samples]
    got = {(r["prompt_id"], r["sample_index"]): r["correct"] for r in rows}
    assert got == EXPECTED
    assert all(list(r) == list(JUDGED_COLUMNS) and r["reward"] is None for r in rows)
    reasons = {(r["prompt_id"], r["sample_index"]): r["judge_reason"] for r in rows}
    assert reasons[("m1", 1)].startswith("math: wrong (extracted '94'")
    assert reasons[("m2", 1)].startswith("math: ") and "finish_reason=length" in reasons[("m2", 1)]
    assert reasons[("c1", 1)] == "code: exit code 1: AssertionError"
    assert reasons[("g1", 0)].startswith("general: no verifier")


def test_unknown_prompt_id_is_a_named_error() -> None:
    samples = _samples()
    samples[3]["prompt_id"] = "nope"
    with pytest.raises(DataFormatError, match=r"row 3 .*prompt_id 'nope'"):
        judge_rows(samples, _prompts(), progress=False)


def test_stage_writes_keyed_output_with_rewards_and_skips_when_done(tmp_path: Path, tiny_rm: str, capsys) -> None:
    prompts_dir = _write(tmp_path, "prompts", _prompts())
    samples_dir = _write_samples(tmp_path, _samples())
    argv = ["--samples", samples_dir, "--prompts", prompts_dir, "--out", str(tmp_path), "--workers", "2"]
    assert main(argv + ["--reward-model", tiny_rm]) == 0
    out_dir = Path(capsys.readouterr().out.splitlines()[0])
    assert out_dir.name.startswith("judged-m-")
    rows = read_output(out_dir)
    verdicts = {(r["prompt_id"], r["sample_index"]): r["correct"] for r in rows}
    assert verdicts == EXPECTED, {r["id"]: r["judge_reason"] for r in rows}
    by_id = {p["id"]: p for p in _prompts()}
    expected_rewards = score_with_reward_model([by_id[r["prompt_id"]]["prompt"] for r in rows],
                                               [r["text"] for r in rows], tiny_rm, progress=False)
    assert [r["reward"] for r in rows] == pytest.approx(expected_rewards, abs=1e-5)
    # Verified samples (math, code) get a reward too: `pair --rank_by reward` ranks every domain by it alone.
    assert {by_id[r["prompt_id"]]["domain"] for r in rows if isinstance(r["reward"], float)} == {"math", "code",
                                                                                                "general"}
    key = json.loads((out_dir / "meta.json").read_text())["key"]
    assert key["reward_model"] == {"identity": model_identity(tiny_rm)} and key["code_timeout"] == 10.0
    # Done: a second run reuses it; different settings (no reward model) give a different output.
    assert main(argv + ["--reward-model", tiny_rm]) == 0
    assert Path(capsys.readouterr().out.splitlines()[0]) == out_dir
    assert main(argv) == 0
    other = Path(capsys.readouterr().out.splitlines()[0])
    assert other != out_dir and all(r["reward"] is None for r in read_output(other))


def test_stage_resumes_after_a_crash_without_redoing_rows(tmp_path: Path, capsys) -> None:
    prompts_dir = _write(tmp_path, "prompts", _prompts())
    samples_dir = _write_samples(tmp_path, _samples())
    from infifpo.judge.stage import judged_output

    # A generous code timeout: a loaded CI machine must not turn a correct program into a timeout.
    out = judged_output(samples_dir, prompts_dir, str(tmp_path), {"reward_model": None, "code_timeout": 60.0})
    first = judge_rows(_samples()[:3], _prompts(), progress=False, code_timeout=60.0)
    first[0]["judge_reason"] = "from the first run"  # proves the row is kept, not recomputed
    with out.open_shard() as w:
        w.write(first)
    with open(out.path / "part-00000-of-00001.jsonl", "a") as f:
        f.write('{"id": "m2|m|0", "trunc')  # a crash mid-line
    assert main(["--samples", samples_dir, "--prompts", prompts_dir, "--out", str(tmp_path), "--batch-size", "2",
                 "--code-timeout", "60"]) == 0
    assert Path(capsys.readouterr().out.splitlines()[0]) == out.path
    rows = read_output(out.path)
    assert sorted(r["id"] for r in rows) == sorted(s["id"] for s in _samples())
    assert {r["id"]: r["judge_reason"] for r in rows}[first[0]["id"]] == "from the first run"
    verdicts = {(r["prompt_id"], r["sample_index"]): r["correct"] for r in rows}
    assert verdicts == EXPECTED, {r["id"]: r["judge_reason"] for r in rows}


def test_samples_that_record_no_prompts_are_refused_before_writing(tmp_path: Path) -> None:
    """Samples written by hand or by an older infifpo say nothing of their prompts: the join cannot be checked."""
    prompts_dir = _write(tmp_path, "prompts", _prompts())
    samples_dir = _write(tmp_path, "samples-m", _samples())
    with pytest.raises(InputMismatchError, match=r"^prompts unknown: .*samples-m-\w+ records no digest of the prompts"
                                                 r".*Pass the prompts output .* or sample again"):
        main(["--samples", samples_dir, "--prompts", prompts_dir, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_options_follow_the_config_convention(tmp_path: Path, capsys) -> None:
    help_lists_every_option(main, JudgeOptions, capsys)
    misspelt_key_is_named(main, tmp_path, "reward_modle", "reward_model")
    opts = parse_with_yaml(JudgeOptions, tmp_path, {"samples": ["s1", "s2"], "prompts": "p", "workers": 3,
                                                    "code_timeout": 5}, ["--workers", "1", "--samples", "s3"])
    assert (opts.samples, opts.prompts, opts.workers, opts.code_timeout) == (["s3"], "p", 1, 5.0)
    opts = dashed_flags_parse_alike(JudgeOptions, ["--samples", "s1", "s2", "--prompts", "p", "--reward_model", "rm",
                                                   "--code_timeout", "5", "--batch_size", "2", "--rm_batch_size", "4"])
    assert opts == JudgeOptions(samples=["s1", "s2"], prompts="p", reward_model="rm", workers=opts.workers,
                                code_timeout=5.0, batch_size=2, rm_batch_size=4)
    with pytest.raises(ConfigError, match="infifpo judge: batch_size must be positive, got 0"):
        main(["--samples", "s", "--prompts", "p", "--batch_size", "0"])
    imports_light("infifpo.judge.stage", "JudgeOptions")
