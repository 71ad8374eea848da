"""Every shipped YAML parses (recursively; torchtune's version missed 194 of 197 files): the pipeline configs in
configs/, and the packaged train and accelerate configs in infifpo/trainers/configs/, each through its own parser."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG_DIR = ROOT / "infifpo" / "trainers" / "configs"
CONFIGS = sorted([*(ROOT / "configs").rglob("*.yaml"), *TRAIN_CONFIG_DIR.rglob("*.yaml")])


def test_there_are_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_to_a_mapping(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, f"{path} is empty or not a mapping"


PIPELINE_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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


@pytest.mark.parametrize("path", sorted(TRAIN_CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_packaged_train_config_parses_through_infifpo_train(path, tmp_path):
    """Each packaged train YAML through `infifpo train`'s own parser (TrlParser over the method's dataclasses) for
    its method, the file's stem; and a run without --config gets the same file."""
    from infifpo.trainers import entry, packaged_config

    method = path.stem
    assert packaged_config(method) == path
    args = ["--method", method, "--model_name_or_path", "m", "--dataset_name", str(tmp_path),
            "--output_dir", str(tmp_path)]
    _, _, explicit, _ = entry.parse([*args, "--config", str(path)])
    _, _, default, _ = entry.parse(args)
    yaml_keys = yaml.safe_load(path.read_text())
    for key in yaml_keys:
        if hasattr(explicit, key):
            assert getattr(explicit, key) == getattr(default, key), key
    assert explicit.learning_rate == yaml_keys.get("learning_rate", explicit.learning_rate)


# Each stage command's module and its options dataclass (`infifpo eval` with stage inputs is the eval stage).
STAGE_OPTIONS = {"prompts": ("data_prep.prompts", "PromptsOptions"), "sample": ("infifpo.sample", "SampleOptions"),
                 "judge": ("infifpo.judge.stage", "JudgeOptions"), "pair": ("infifpo.pair", "PairOptions"),
                 "score": ("infifpo.score.stage", "ScoreOptions"), "eval": ("infifpo.eval.stage", "EvalOptions"),
                 "report": ("infifpo.report.stage", "ReportOptions"),
                 "selector": ("infifpo.trainers.selector", "SelectorOptions"),
                 "merge": ("infifpo.merge.stage", "MergeOptions")}


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_every_stage_invocation_of_a_shipped_config_parses_through_the_stages_own_parser(path, tmp_path,
                                                                                        monkeypatch):
    """`infifpo pipeline` on each shipped config, with every stage process replaced by a check: the options file the
    pipeline wrote for it (``--config``) goes through that stage's own parser (``infifpo.config.parse_config`` over
    its options dataclass) and the stand-in returns an empty finished output. Every stage the config would run is
    invoked; a key the stage does not take would fail here, not hours into a run."""
    import importlib

    from data_prep.prompts import prompts_key
    from infifpo import pipeline
    from infifpo.config import parse_config
    from infifpo.store import StageOutput

    parsed: dict[str, list] = {}

    def fake_run_stage(name, args, log_dir, timings=None, label=None, model=None):
        if name == "train":  # TrlParser's own checks: test_pipeline_config_train_keys_are_fields_...
            out = Path(args[args.index("--output_dir") + 1])
            out.mkdir(parents=True, exist_ok=True)
            return [out]
        assert name in STAGE_OPTIONS and args[0] == "--config" and len(args) == 2, (name, args)
        module, cls = STAGE_OPTIONS[name]
        cls = getattr(importlib.import_module(module), cls)
        parsed.setdefault(name, []).append(parse_config(cls, args, prog=f"infifpo {name}"))
        if name == "report":
            return []
        opts = parsed[name][-1]  # a prompts output records its specs (the eval reads a benchmark's from there)
        key = prompts_key(opts.source, opts.seed) if name == "prompts" else {}
        return [StageOutput(tmp_path / "outputs", f"{name}-{len(parsed[name])}", key).write_all([])]

    monkeypatch.setattr(pipeline, "run_stage", fake_run_stage)
    monkeypatch.setattr(pipeline, "dev_accuracy", lambda _: {"dev_accuracy": 0.0, "dev_correct": 0, "dev_n": 0})
    cfg = pipeline.load_config(path)
    cfg["run_dir"] = str(tmp_path / "run")
    pipeline.run(cfg)
    methods = cfg["train"].get("methods", ["dpo", "infifpo"])
    # pivot, sources, every training run but a pairwise arm's components (the merged arm is the row)
    report_rows = 1 + len(cfg["sources"]) + sum("component_of" not in r for r in pipeline.planned_runs(cfg).values())
    evals = report_rows + sum(map(len, pipeline.grid_of(cfg).values()))  # + every grid point on the dev split
    assert len(parsed["eval"]) == evals
    assert len(parsed["sample"]) == 1 + len(cfg["sources"]) + ("wrpo" in methods) + evals  # + greedy evals
    planned = pipeline.planned_runs(cfg).values()
    learned = any(r["overrides"].get("fusion_method") == "learned" for r in planned)
    pairwise = any("merge" in r for r in planned)
    assert set(parsed) == set(STAGE_OPTIONS) - {*(() if learned else ["selector"]), *(() if pairwise else ["merge"])}
    if learned:  # the selector is trained with the options of the InfiFPO run that uses it
        assert all(sel.length_normalize and sel.clip and not sel.include_pivot for sel in parsed["selector"])
    # Greedy evals sample at temperature 0 (a dashed argv once dropped the 0, so it sampled at the default 0.8).
    greedy = [s for s in parsed["sample"] if (s.name or "").startswith("eval-")]
    assert len(greedy) == evals and all(s.temperature == 0.0 and s.n == 1 for s in greedy)
    pairs = parsed["pair"]
    assert pairs[0].recipe == "infifpo" and all(p.recipe in ("infifpo", "wrpo") for p in pairs)
    assert parsed["prompts"][0].source == cfg["prompts"]["sources"]
    pivot_run = parsed["sample"][0]
    assert pivot_run.pivot and pivot_run.max_tokens == cfg["sample"].get("max_tokens", pivot_run.max_tokens)
