"""`infifpo train`: YAML + CLI overrides through TrlParser, each method trains, LoRA and 4-bit QLoRA on CPU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml

from infifpo.schema import ConfigError
from infifpo.trainers import entry
from infifpo.trainers import launch as launcher
from tests.trainers.conftest import make_scored_rows

FAST = dict(bf16=False, report_to="none", per_device_train_batch_size=2, max_steps=3, logging_steps=1,
            save_strategy="no", learning_rate=1e-3, max_length=128, seed=0, disable_tqdm=True)


@pytest.fixture(scope="module")
def pairs_jsonl(tmp_path_factory, tiny_tok):
    """4 rows: 2 in the sft split, 2 in the po split (batch 2: every step sees the same rows)."""
    rows = make_scored_rows(tiny_tok, 4, k=2, wrpo=True)
    for row in rows[:2]:
        row["split"] = "sft"
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _yaml(tmp_path, **keys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(keys))
    return str(path)


def _train(argv):
    started = time.perf_counter()
    method, script, args, model_args = entry.parse(argv)
    trainer = entry.build_trainer(method, script, args, model_args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    entry.train_and_save(trainer, method, script, args, model_args, started=started)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(before[n], p)]
    return trainer, losses, changed


def assert_train_log(trainer, method: str) -> dict:
    """``output_dir/infifpo_train_log.json`` has docs/formats.md "Train log" keys and the trainer's own log history."""
    log = json.loads((Path(trainer.args.output_dir) / entry.TRAIN_LOG).read_text())
    assert set(log) == {"method", "log_history", "train_runtime_s", "setup_s", "world_size", "num_train_rows",
                        "global_batch_size", "max_steps", "precision"}
    assert log["method"] == method and log["world_size"] == 1 and log["precision"] == "fp32"
    assert log["num_train_rows"] == len(trainer.train_dataset) and log["max_steps"] == trainer.state.max_steps
    assert log["global_batch_size"] == trainer.args.per_device_train_batch_size
    assert log["train_runtime_s"] > 0 and log["setup_s"] > 0
    assert log["log_history"] == json.loads(json.dumps(trainer.state.log_history))
    losses = [h["loss"] for h in log["log_history"] if "loss" in h]
    assert losses == [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == log["max_steps"] // trainer.args.logging_steps
    return log


# LoRA for InfiFPO / WRPO through the Python API is in test_infifpo.py / test_wrpo.py.
@pytest.mark.parametrize(("method", "lora"), [("sft", False), ("sft", True), ("dpo", False), ("dpo", True),
                                              ("infifpo", False), ("wrpo", False)])
def test_each_method_trains_from_yaml(tiny_llama, pairs_jsonl, tmp_path, method, lora):
    keys = {**FAST, "learning_rate": 1e-2} if lora else FAST
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=pairs_jsonl, output_dir=str(tmp_path / "o"),
                use_peft=lora, lora_r=4, lora_alpha=8, **keys)
    trainer, losses, changed = _train(["--method", method, "--config", cfg])
    assert len(trainer.train_dataset) == 2  # the split column selected sft / po rows
    assert_train_log(trainer, method)
    # The wiring, not the math: each loss is proven by one SGD step against a hand computation (test_infifpo/wrpo).
    assert losses and all(math.isfinite(x) for x in losses)
    assert changed and (not lora or all("lora_" in n for n in changed))


def test_opd_writes_the_train_log_and_evaluates_held_out_prompts(tiny_llama, tiny_llama_b, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                            for i in range(6)))
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=str(rows), output_dir=str(tmp_path / "o"),
                teacher_models=[tiny_llama_b], teacher_model_init_kwargs={"dtype": "float32"}, num_generations=2,
                max_completion_length=3, bf16=False, report_to="none", per_device_train_batch_size=4, max_steps=2,
                logging_steps=1, save_strategy="no", learning_rate=1e-3, seed=0, disable_tqdm=True,
                eval_strategy="steps", eval_steps=1, eval_fraction=0.34, per_device_eval_batch_size=2)
    trainer, losses, _ = _train(["--method", "opd", "--config", cfg])
    log = assert_train_log(trainer, "opd")
    assert log["max_steps"] == 2 and any("opd/fused_teacher_score" in h for h in log["log_history"])
    assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (4, 2)
    evals = [h for h in log["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [1, 2] and all("eval_opd/teacher_share/pivot" in h for h in evals)


def test_cli_overrides_yaml_and_writes_resolved_config(tiny_llama, pairs_jsonl, tmp_path):
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=pairs_jsonl, output_dir=str(out),
                fusion_type="mean", **FAST)
    assert entry.main(["train"][1:] + ["--method", "infifpo", "--config", cfg, "--learning_rate", "0.002",
                                        "--max_steps", "1"]) == 0
    resolved = yaml.safe_load((out / entry.RESOLVED_CONFIG).read_text())
    assert resolved["learning_rate"] == 0.002 and resolved["max_steps"] == 1  # CLI wins over YAML
    assert resolved["fusion_method"] == "mean" and resolved["beta"] == 2.5 and resolved["method"] == "infifpo"
    assert (out / "model.safetensors").exists()
    assert json.loads((out / entry.TRAIN_LOG).read_text())["max_steps"] == 1


def test_unknown_yaml_key_suggests_the_field(tiny_llama, pairs_jsonl, tmp_path, capsys):
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=pairs_jsonl, output_dir=str(tmp_path),
                fusion_methd="mean")
    with pytest.raises(ConfigError, match="'fusion_methd' \\(did you mean 'fusion_method'\\?\\)"):
        entry.parse(["--method", "infifpo", "--config", cfg])
    assert entry.main(["--method", "infifpo", "--config", cfg]) == 2
    assert "did you mean 'fusion_method'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="Did you mean 'wrpo'"):
        entry.parse(["--method", "wrp", "--config", cfg])


def test_cpu_precision_default_is_bf16_where_supported(tiny_llama, pairs_jsonl, tmp_path):
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=pairs_jsonl, output_dir=str(tmp_path))
    _, _, args, _ = entry.parse(["--method", "infifpo", "--config", cfg])
    if not torch.cuda.is_available():
        assert args.use_cpu and args.bf16 == entry.cpu_supports_bf16()
    _, _, args, _ = entry.parse(["--method", "infifpo", "--config", cfg, "--bf16", "false"])
    assert args.bf16 is False


def test_qlora_4bit_trains_on_cpu(tiny_llama, pairs_jsonl, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    assert bnb is not None
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=pairs_jsonl, output_dir=str(tmp_path / "o"),
                load_in_4bit=True, bnb_4bit_quant_type="nf4", use_peft=True, lora_r=4, lora_alpha=8, **FAST)
    method, script, args, model_args = entry.parse(["--method", "infifpo", "--config", cfg, "--learning_rate", "0.01"])
    assert entry.quantization_config(model_args).bnb_4bit_compute_dtype == torch.float32
    trainer, losses, changed = _train(["--method", "infifpo", "--config", cfg, "--learning_rate", "0.01"])
    assert getattr(trainer.model, "is_loaded_in_4bit", False)
    assert losses and all(math.isfinite(x) for x in losses)
    assert changed and all("lora_" in n for n in changed)


# ---------------------------------------------------------------- relaunch under `accelerate launch`
def test_a_launched_process_never_relaunches(tiny_llama, pairs_jsonl, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(launcher.LAUNCHED_ENV, "1")
    out = tmp_path / "o"
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=pairs_jsonl, output_dir=str(out), **FAST)
    with caplog.at_level("WARNING", logger=entry.__name__):
        assert entry.main(["--method", "infifpo", "--config", cfg, "--num_processes", "2", "--max_steps", "1"]) == 0
    assert "already inside a launched process" in caplog.text
    log = json.loads((out / entry.TRAIN_LOG).read_text())
    assert log["world_size"] == 1 and log["max_steps"] == 1  # trained here, in this one process


@pytest.mark.parametrize("method", ["sft", "dpo", "infifpo", "wrpo"])
def test_in_training_evaluation_on_held_out_rows(tiny_llama, tiny_tok, tmp_path, method):
    """eval_strategy steps with TRL's own arguments: eval_fraction holds rows out of training (seeded), and every
    method logs its own metrics on them (InfiFPO: preference accuracy, margins, source shares , eval_ prefix)."""
    rows = make_scored_rows(tiny_tok, 8, k=2, wrpo=True)
    for row in rows[:4]:
        row["split"] = "sft"
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=str(data), output_dir=str(tmp_path / "o"),
                eval_strategy="steps", eval_steps=1, eval_fraction=0.25, per_device_eval_batch_size=2,
                **{**FAST, "max_steps": 2})
    trainer, _, _ = _train(["--method", method, "--config", cfg])
    assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (3, 1)
    train_ids = set(trainer.train_dataset["id"]) if "id" in trainer.train_dataset.column_names else None
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [1, 2] and all(math.isfinite(h["eval_loss"]) for h in evals)
    if method == "infifpo":
        assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_fusion/chosen_share/m0"} <= set(evals[0])
        assert train_ids is not None and trainer.eval_dataset["id"][0] not in train_ids


def test_evaluation_without_held_out_rows_is_a_named_error(tiny_llama, pairs_jsonl, tmp_path):
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=pairs_jsonl, output_dir=str(tmp_path / "o"),
                eval_strategy="steps", eval_steps=1, **FAST)
    with pytest.raises(ConfigError, match="needs held-out rows: give --eval_fraction"):
        _train(["--method", "dpo", "--config", cfg])
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=pairs_jsonl, output_dir=str(tmp_path / "o"),
                eval_fraction=0.99, **FAST)
    with pytest.raises(ConfigError, match="leaves none to train on"):
        _train(["--method", "dpo", "--config", cfg])
