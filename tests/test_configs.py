"""Every YAML under configs/ parses (recursively; torchtune's version missed 194 of 197 files)."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_to_a_mapping(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, f"{path} is empty or not a mapping"


PIPELINE_CONFIGS = [ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "paper_phi4.yaml"]


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_pipeline_config_train_keys_are_fields_of_their_trainer_configs(path):
    """Every `train:` override reaches TrlParser as a flag: it must be a field of the method's config classes (or
    one of `infifpo train`'s launch flags), or the pipeline would fail at its training stage, hours in."""
    import dataclasses

    from trl import ModelConfig

    from infifpo import pipeline
    from infifpo.trainers import entry

    cfg = pipeline.load_config(path)
    train = cfg["train"]
    for method in ["sft", *train["methods"]]:
        known = {f.name for t in (entry.TrainScriptArguments, entry._config_class(method), ModelConfig)
                 for f in dataclasses.fields(t)} | {"num_processes", "accelerate_config", "config"}
        keys = set(train.get("common", {})) | set(train.get(method, {}))
        assert keys <= known, f"{path.name}: {method}: unknown keys {sorted(keys - known)}"
    assert cfg["eval"]["benchmarks"], "the report needs benchmarks"
