"""`infifpo train` artefacts and messages (issue 19, items 4 and 6): model cards that cite the method's own paper and
name the real base model, the pool and the data; no known noise on a run; the QLoRA reference-mismatch warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from infifpo.models.packaged import PACKAGED
from infifpo.models.resolve import MARKER
from infifpo.trainers import entry
from tests.conftest import make_tiny_model
from tests.trainers.conftest import make_scored_rows

FAST = dict(bf16=False, report_to="none", per_device_train_batch_size=2, max_steps=1, logging_steps=1,
            save_strategy="no", learning_rate=1e-3, max_length=128, seed=0, disable_tqdm=True)
DPO_PAPER = "2305.18290"


@pytest.fixture(scope="module")
def based_model(tmp_path_factory) -> str:
    """A tiny model whose own card says it was fine-tuned from the hub model org/tiny-base."""
    path = make_tiny_model(str(tmp_path_factory.mktemp("based")))
    (Path(path) / "README.md").write_text("---\nbase_model: org/tiny-base\n---\n# tiny\n")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_llama) -> str:
    from transformers import AutoTokenizer

    rows = make_scored_rows(AutoTokenizer.from_pretrained(tiny_llama), 4, k=2, wrpo=True, sources=("src-a", "src-b"))
    path = tmp_path_factory.mktemp("card_data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train(tmp_path: Path, method: str, model: str, data: str, **keys) -> Path:
    out = tmp_path / method
    cfg = tmp_path / f"{method}.yaml"
    cfg.write_text(yaml.safe_dump(dict(FAST, model_name_or_path=model, dataset_name=data, output_dir=str(out),
                                       **keys)))
    assert entry.main(["--method", method, "--config", str(cfg)]) == 0
    return out


def _card(out: Path) -> tuple[dict, str]:
    text = (out / "README.md").read_text()
    _, front, body = text.split("---", 2)
    return yaml.safe_load(front), body


@pytest.mark.parametrize(("method", "paper", "title"), [
    ("infifpo", "2505.13878", "InfiFPO: Implicit Model Fusion via Preference Optimization"),
    ("wrpo", "2412.03187", "Weighted-Reward Preference Optimization for Implicit Model Fusion")])
def test_model_card_cites_the_method_and_names_base_model_pool_and_data(method, paper, title, based_model, pairs,
                                                                       tmp_path):
    meta, body = _card(_train(tmp_path, method, based_model, pairs))
    assert meta["base_model"] == "org/tiny-base"
    assert f"https://huggingface.co/papers/{paper}" in body and title in body
    assert DPO_PAPER not in body and "rafailov" not in body  # not "introduced in" the DPO paper
    assert "fine-tuned version of [org/tiny-base](https://huggingface.co/org/tiny-base)" in body
    assert f"- method: `{method}`" in body and "`src-a`, `src-b`" in body and f"- data: `{pairs}`" in body


def test_model_card_of_an_unknown_base_names_the_local_model(tiny_llama, pairs, tmp_path):
    meta, body = _card(_train(tmp_path, "infifpo", tiny_llama, pairs))
    assert "base_model" not in meta and "[None]" not in body and f"local model `{tiny_llama}`" in body


def test_base_model_follows_packaged_names_cache_entries_and_train_outputs(based_model, tmp_path):
    name = "smollm2-135m-instruct"
    assert entry.base_model_of(name) == PACKAGED[name]["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    entry_dir = tmp_path / name  # a materialised cache entry carries the marker with its packaged name
    entry_dir.mkdir()
    (entry_dir / MARKER).write_text(json.dumps({"name": name}))
    assert entry.base_model_of(str(entry_dir)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    trained = tmp_path / "sft-out"  # an `infifpo train` output: the base of what it was trained from
    trained.mkdir()
    (trained / entry.RESOLVED_CONFIG).write_text(yaml.safe_dump({"model_name_or_path": str(entry_dir)}))
    assert entry.base_model_of(str(trained)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert entry.base_model_of(based_model) == "org/tiny-base"
    assert entry.base_model_of("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert entry.base_model_of(str(tmp_path / "nothing-here")) is None
    assert all(spec["quantization"].startswith("Q4") for spec in PACKAGED.values())


# ---------------------------------------------------------------- noise and warnings (item 6)
def test_known_noise_is_filtered_and_only_it(caplog):
    entry.silence_noise()
    entry.silence_noise()  # idempotent
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert sum(isinstance(f, entry._DropRecords) for f in log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        log.warning("something else from bitsandbytes")
    assert "kernels-community" not in caplog.text and "something else from bitsandbytes" in caplog.text


def test_a_training_run_logs_no_revision_or_kernels_noise(tiny_llama, pairs, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _train(tmp_path, "dpo", tiny_llama, pairs)
    assert "revision='main' ignored" not in caplog.text and "kernels-community" not in caplog.text


def test_qlora_warns_that_the_policy_no_longer_matches_the_scored_reference(tiny_llama, pairs, tmp_path, caplog):
    pytest.importorskip("bitsandbytes")
    argv = ["--method", "infifpo", "--model_name_or_path", tiny_llama, "--dataset_name", pairs, "--output_dir",
            str(tmp_path / "o"), "--load_in_4bit", "true", "--use_peft", "true", "--lora_r", "4", "--max_length",
            "128", "--bf16", "false", "--report_to", "none"]
    with caplog.at_level(logging.WARNING, logger=entry.__name__):
        entry.build_trainer(*entry.parse(argv))
    lines = [r.getMessage() for r in caplog.records if "no longer matches" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "4-bit policy" in lines[0] and "infifpo score --pivot" in lines[0] and "dequantize" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=entry.__name__):  # full precision: nothing to warn about
        entry.build_trainer(*entry.parse([a for a in argv if a not in ("--load_in_4bit", "true")]))
    assert "no longer matches" not in caplog.text
