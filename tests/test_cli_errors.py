"""One error style for every stage (issue 19, item 2): a named infifpo error or a missing input path is ONE line on
stderr, ``infifpo <stage>: <ErrorName>: <message>``, exit code 2, no traceback unless ``infifpo --debug`` (or
``INFIFPO_DEBUG=1``). Real ``infifpo`` processes, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infifpo import cli
from infifpo.schema import ChatTemplateError, ConfigError, InfiFPOError

REPO = Path(__file__).resolve().parents[1]


def _infifpo(*argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("INFIFPO_STAGE", cli.DEBUG_ENV))}
    return subprocess.run([sys.executable, "-m", "infifpo.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**clean, "HF_HUB_OFFLINE": "1", **env}, timeout=300)


def _one_line(proc: subprocess.CompletedProcess, stage: str, error: str) -> str:
    """The single stderr line of a failed stage (stage log lines, `LEVEL name: ...`, aside); checks its shape."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("WARNING ", "INFO "))]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"infifpo {stage}: {error}: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory) -> Path:
    """A real (tiny) prompts stage output."""
    root = tmp_path_factory.mktemp("prompts")
    proc = _infifpo("prompts", "--source", "arithmetic:train:3", "--out", str(root), cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(proc.stdout.strip().splitlines()[0])


def test_judge_on_a_missing_samples_path_says_it_does_not_exist(prompts_dir, tmp_path):
    proc = _infifpo("judge", "--samples", str(tmp_path / "nope"), "--prompts", str(prompts_dir), cwd=tmp_path)
    line = _one_line(proc, "judge", "StoreError")
    assert f"{tmp_path / 'nope'}: does not exist" in line
    assert "incomplete" not in line and "re-run" not in line and "records no digest" not in line


def test_sample_on_a_missing_prompts_path_is_a_named_error(tmp_path):
    proc = _infifpo("sample", "--prompts", str(tmp_path / "nope"), "--model", "smollm2-135m-instruct", cwd=tmp_path)
    line = _one_line(proc, "sample", "InputPathError")
    assert f"{tmp_path / 'nope'} does not exist" in line and "FileNotFoundError" not in proc.stderr


def test_prompts_bad_source_and_plan_missing_config_are_one_line(tmp_path):
    assert "unknown prompt source 'bogus'" in _one_line(_infifpo("prompts", "--source", "bogus:train:3",
                                                                 cwd=tmp_path), "prompts", "ConfigError")
    assert "nope.yaml does not exist" in _one_line(_infifpo("plan", "--config", "nope.yaml", cwd=tmp_path), "plan",
                                                   "InputPathError")


def test_pair_flag_typo_and_report_config_typo_are_one_line(tmp_path):
    line = _one_line(_infifpo("pair", "--judged", "j", "--prompts", "p", "--recipe", "infifpo", "--pivot", "x",
                              "--rnak-by", "reward", cwd=tmp_path), "pair", "ConfigError")
    assert "--rnak-by (did you mean --rank_by?)" in line
    (tmp_path / "report.yaml").write_text("run_dri: runs/x\n")
    line = _one_line(_infifpo("report", "--config", "report.yaml", cwd=tmp_path), "report", "ConfigError")
    assert "'run_dri' (did you mean 'run_dir'?)" in line


def test_eval_on_a_missing_model_is_one_line(tmp_path):
    line = _one_line(_infifpo("eval", "--model", str(tmp_path / "nope"), "--benchmarks", "arithmetic:test:2",
                              "--backend", "transformers", cwd=tmp_path), "eval", "ModelLoadError")
    assert "unknown model" in line


def test_train_flag_typo_suggests_the_flag_and_missing_config_is_named(tmp_path):
    line = _one_line(_infifpo("train", "--method", "dpo", "--leraning_rate", "1e-3", "--model_name_or_path", "x",
                              "--dataset_name", "org/data", cwd=tmp_path), "train", "ConfigError")
    assert "--leraning_rate (did you mean --learning_rate?)" in line
    line = _one_line(_infifpo("train", "--method", "dpo", "--config", "missing.yaml", cwd=tmp_path), "train",
                     "ConfigError")
    assert "--config missing.yaml: does not exist" in line
    line = _one_line(_infifpo("train", "--method", "dpo", "--learning_rate", "fast", "--model_name_or_path", "x",
                              "--dataset_name", "org/data", cwd=tmp_path), "train", "ConfigError")
    assert "invalid float value: 'fast'" in line
    line = _one_line(_infifpo("train", "--method", "dpo", "--model_name_or_path", "x", "--dataset_name",
                              str(tmp_path / "pairs.jsonl"), cwd=tmp_path), "train", "ConfigError")
    assert "does not exist" in line


def test_debug_flag_and_env_print_the_traceback_too(tmp_path):
    for proc in (_infifpo("--debug", "plan", "--config", "nope.yaml", cwd=tmp_path),
                 _infifpo("plan", "--config", "nope.yaml", cwd=tmp_path, INFIFPO_DEBUG="1")):
        assert proc.returncode == 2
        assert "Traceback (most recent call last)" in proc.stderr and "FileNotFoundError" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("infifpo plan: InputPathError: ")


def test_error_line_collapses_a_multi_line_message():
    line = cli.error_line("score", ConfigError("first line\n  second line\n"))
    assert line == "infifpo score: ConfigError: first line second line"
    assert cli.error_line("x", FileNotFoundError(2, "No such file or directory", "/a/b")).startswith(
        "infifpo x: InputPathError: /a/b does not exist")
    assert issubclass(cli.InputPathError, InfiFPOError)


def test_usage_mentions_debug(capsys):
    assert cli.main(["--help"]) == 0
    assert "--debug" in capsys.readouterr().out


# ---------------------------------------------------------------- chat template: before any model runs (item 6)
def test_score_checks_every_chat_template_before_the_pivot_is_scored(tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from infifpo.score import stage as score
    from tests.conftest import make_tiny_model
    from tests.trainers.conftest import make_scored_rows

    no_template = make_tiny_model(str(tmp_path / "plain"), tokenizer_kwargs={"with_template": False})
    rows = make_scored_rows(AutoTokenizer.from_pretrained(tiny_llama), 2, k=1)
    scored = []
    monkeypatch.setattr(score, "score_model", lambda ref, job, role="source": scored.append(ref))
    with pytest.raises(ChatTemplateError, match="chat_template.jinja in the model directory") as e:
        score.score_pairs(rows, pivot=tiny_llama, sources=[no_template], out_root=tmp_path / "out")
    assert no_template in str(e.value) and "--chat_template_path" in str(e.value)
    assert scored == []  # raised before the pivot (or anything) was scored


def test_train_without_chat_template_names_the_key_and_template_path_fixes_it(tmp_path):
    from transformers import AutoTokenizer

    from infifpo.trainers import entry
    from tests.conftest import CHAT_TEMPLATE, make_tiny_model
    from tests.trainers.conftest import make_scored_rows

    model = make_tiny_model(str(tmp_path / "plain"), tokenizer_kwargs={"with_template": False})
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT_TEMPLATE  # only to build rows whose token counts match
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_scored_rows(tok, 2, k=2)))
    argv = ["--method", "infifpo", "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "o"), "--max_steps", "1", "--report_to", "none", "--max_length", "128", "--bf16", "false"]
    method, script, args, model_args = entry.parse(argv)
    loaded = []
    with pytest.MonkeyPatch.context() as mp:  # no model may load before the template check
        mp.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loaded.append(a))
        with pytest.raises(ChatTemplateError, match=r"--chat_template_path FILE.jinja \(config key chat_templ"):
            entry.build_trainer(method, script, args, model_args)
    assert loaded == []
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    method, script, args, model_args = entry.parse([*argv, "--chat_template_path", str(template)])
    trainer = entry.build_trainer(method, script, args, model_args)
    assert trainer.processing_class.chat_template == CHAT_TEMPLATE
    with pytest.raises(ConfigError, match="chat_template_path .* does not exist"):
        entry.parse([*argv, "--chat_template_path", str(tmp_path / "missing.jinja")])


def test_a_failing_pipeline_stage_is_one_line_with_the_stages_own_error_and_its_log(tmp_path):
    cfg = {"name": "bad", "run_dir": str(tmp_path / "run"), "pivot": "smollm2-135m-instruct",
           "sources": ["gemma3-270m"],
           "prompts": {"sources": [{"source": "jsonl", "path": str(tmp_path / "no.jsonl")}]}}
    (tmp_path / "bad.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    proc = _infifpo("pipeline", "--config", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("infifpo ")]  # the rest: timestamped progress
    assert len(errors) == 1 and errors[0].startswith("infifpo pipeline: StageFailedError: "), proc.stderr[-3000:]
    line = errors[0]
    assert "stage 'prompts' failed (exit 2): infifpo prompts: ConfigError: jsonl:" in line
    assert str(tmp_path / "run" / "logs" / "prompts.log") in line and "run the same pipeline command again" in line
