"""`infifpo train --resume_from_checkpoint PATH|true`: a run killed right after a checkpoint continues from it, for
every method, exactly as the uninterrupted run (issue 19, item 1).

Each method trains STEPS steps three ways on the same tiny model and data (6 rows, batch 2: 3 steps per epoch, so the
resumed run starts mid-epoch and crosses an epoch boundary; a linear learning-rate decay, so the schedule matters):
uninterrupted; killed just after ``checkpoint-KILL_AT`` is written (an exception raised from ``on_save``: nothing
after the save runs, as with SIGKILL); and the same command again with ``--resume_from_checkpoint true``. The resumed
run must execute steps KILL_AT+1..STEPS only, log the uninterrupted run's losses at those steps, and end with its
weights (fp32 on CPU; tolerance ``ATOL``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from infifpo.schema import ConfigError
from infifpo.trainers import entry
from tests.trainers.conftest import make_scored_rows

STEPS, KILL_AT, SAVE_STEPS = 5, 2, 2
# Same process, same threads, same order of operations: the resumed losses and weights agree to fp32 round-off.
ATOL = 1e-5
COMMON = dict(bf16=False, report_to="none", per_device_train_batch_size=2, max_steps=STEPS, logging_steps=1,
              save_strategy="steps", save_steps=SAVE_STEPS, learning_rate=5e-3, lr_scheduler_type="linear",
              max_length=128, seed=0, disable_tqdm=True, dataloader_num_workers=0)


class Killed(Exception):
    """Stands for the kill: raised right after a checkpoint is complete."""


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after checkpoint-{state.global_step}")


class StepsRun(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tok) -> dict[str, str]:
    """Scored WRPO-style rows (6 sft + 6 po: every preference method can read them) and 6 OPD prompts."""
    root = tmp_path_factory.mktemp("resume_data")
    rows = make_scored_rows(tiny_tok, 12, k=2, wrpo=True)
    for row in rows[:6]:
        row["split"] = "sft"
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"add {i} and {i + 1}"}]} for i in range(6)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return {"pairs": str(root / "pairs.jsonl"), "prompts": str(root / "prompts.jsonl")}


def _argv(method: str, tmp_path: Path, out: Path, model: str, teacher: str, data: dict[str, str]) -> list[str]:
    keys = dict(COMMON, model_name_or_path=model, dataset_name=data["prompts" if method == "opd" else "pairs"])
    if method == "opd":
        keys.update(teacher_models=[teacher], teacher_model_init_kwargs={"dtype": "float32"}, num_generations=2,
                    max_completion_length=4, per_device_train_batch_size=4)
        del keys["max_length"]
    cfg = tmp_path / f"{method}.yaml"
    cfg.write_text(yaml.safe_dump(keys))
    return ["--method", method, "--config", str(cfg), "--output_dir", str(out)]


def _losses(out: Path) -> dict[int, float]:
    """step -> logged training loss, from the run's infifpo_train_log.json; every step logged once."""
    history = json.loads((out / entry.TRAIN_LOG).read_text())["log_history"]
    steps = [h["step"] for h in history if "loss" in h]
    assert len(steps) == len(set(steps)), f"a step was logged twice (trained twice?): {steps}"
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("method", ["sft", "dpo", "infifpo", "wrpo", "opd"])
def test_resume_continues_a_killed_run_exactly(method, tiny_llama, tiny_llama_b, data, tmp_path, monkeypatch):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert entry.main(_argv(method, tmp_path, full, tiny_llama, tiny_llama_b, data)) == 0

    argv = _argv(method, tmp_path, killed, tiny_llama, tiny_llama_b, data)
    m, script, args, model_args = entry.parse(argv)
    trainer = entry.build_trainer(m, script, args, model_args)
    trainer.add_callback(KillAfterSave(KILL_AT))
    with pytest.raises(Killed):
        entry.train_and_save(trainer, m, script, args, model_args, started=0.0)
    assert (killed / f"checkpoint-{KILL_AT}" / "trainer_state.json").is_file()
    assert not (killed / entry.TRAIN_LOG).exists()  # the kill came before the end of the run
    del trainer

    build = entry.build_trainer
    run: list[StepsRun] = []

    def build_and_count(*a, **kw):
        t = build(*a, **kw)
        run.append(StepsRun())
        t.add_callback(run[-1])
        return t

    monkeypatch.setattr(entry, "build_trainer", build_and_count)
    assert entry.main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert run[0].steps == list(range(KILL_AT + 1, STEPS + 1)), "the resumed run must not redo steps 1..KILL_AT"
    resolved = yaml.safe_load((killed / entry.RESOLVED_CONFIG).read_text())
    assert resolved["resume_from_checkpoint"] == str(killed / f"checkpoint-{KILL_AT}")

    want, got = _losses(full), _losses(killed)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], abs=ATOL), f"step {step}: loss {got[step]} != {want[step]}"
    assert len({round(want[s], 6) for s in want}) > 1  # the losses move: the comparison is not vacuous
    w_full, w_killed = _weights(full), _weights(killed)
    assert w_full.keys() == w_killed.keys()
    for name, value in w_full.items():
        torch.testing.assert_close(w_killed[name], value, atol=ATOL, rtol=0, msg=name)


def test_resume_true_takes_the_latest_complete_checkpoint(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()  # killed while saving: no trainer_state.json (written last)
    (tmp_path / "checkpoint-10" / "model.safetensors").write_text("")
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "trainer_state.json").write_text("{}")
    assert entry.resume_checkpoint("true", str(tmp_path)) == str(tmp_path / "checkpoint-9")
    assert entry.resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-9")
    assert entry.resume_checkpoint(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert entry.resume_checkpoint(None, str(tmp_path)) is None
    assert entry.resume_checkpoint("false", str(tmp_path)) is None


def test_resume_errors_are_named(tmp_path, tiny_llama, data, capsys):
    with pytest.raises(ConfigError, match="no complete checkpoint-N directory in output_dir"):
        entry.resume_checkpoint("true", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="does not exist"):
        entry.resume_checkpoint(str(tmp_path / "checkpoint-7"), str(tmp_path))
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ConfigError, match="not a complete Trainer checkpoint"):
        entry.resume_checkpoint(str(tmp_path / "checkpoint-3"), str(tmp_path))
    argv = _argv("dpo", tmp_path, tmp_path / "o", tiny_llama, tiny_llama, data)
    assert entry.main([*argv, "--resume_from_checkpoint", "true"]) == 2  # parse-time: before any model loads
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("infifpo train: ConfigError: --resume_from_checkpoint true: no complete checkpoint")
