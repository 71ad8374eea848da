"""`infifpo pipeline` for the paper's Table 2 and ablations (`make reproduce`): several seeds, InfiFPO ablation arms
(a pairwise arm: one run per source, merged) and the faithful WRPO recipe, end to end on tiny offline models; the
labels / runs contract of pipeline_outputs.json; resuming a killed training run from its latest checkpoint; config
errors before any stage runs.

Random tiny models write gibberish, so the math verifier marks every sample wrong; a tiny random reward model
breaks the ties so that pairs exist (as in tests/test_pipeline.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from infifpo import pipeline
from infifpo.schema import ConfigError
from infifpo.store import read_output
from tests.judge.conftest import make_tiny_reward_model

# The first test to use the module fixture pays for it: the whole tiny pipeline, twice (seeds, arms, a merge).
pytestmark = pytest.mark.timeout(1800)
ROOT = Path(__file__).resolve().parents[1]
# "{b}": the tag of the second source (tiny_llama_b) in its pairwise run's label; the first source's pairwise run is
# infifpo[one_source] itself (same seed and overrides: reused, not trained twice)
LABELS = ["sft", "sft_wrpo", "wrpo", "infifpo", "infifpo[one_source]", "infifpo[pairwise_rsaf/{b}]",
          "infifpo[pairwise_rsaf]", "wrpo@seed1", "infifpo@seed1"]
MERGED = ["infifpo[pairwise_rsaf]"]


def _labels(cfg: dict) -> list[str]:
    return [x.format(b=pipeline.source_tags(cfg["sources"])[cfg["sources"][1]]) for x in LABELS]


@pytest.fixture(scope="module")
def reproduce(tmp_path_factory, tiny_llama, tiny_qwen, tiny_llama_b):
    """(config, the first run's result, the second run's result, train.log after each run)."""
    root = tmp_path_factory.mktemp("reproduce")
    cfg = {
        "name": "tiny-reproduce", "run_dir": str(root / "run"), "pivot": tiny_llama,
        "sources": [tiny_qwen, tiny_llama_b], "backend": "transformers",
        "prompts": {"sources": ["arithmetic:train:24"], "seed": 0},
        "sample": {"max_tokens": 10, "temperature": 1.0, "top_p": 1.0, "seed": 0, "pivot": {"n": 2},
                   "sources": {"n": 1}},
        "judge": {"reward_model": make_tiny_reward_model(str(root / "rm"))},
        "pair": {"sft_fraction": 0.5, "seed": 0, "allow_truncated_chosen": True},
        "score": {"dtype": "float32"},
        "train": {"methods": ["wrpo", "infifpo"], "seeds": [0, 1], "ablation_seeds": [0],  # as reproduce.yaml
                  "ablations": {"one_source": {"sources": [tiny_qwen]}, "pairwise_rsaf": {"pairwise": "rsaf"}},
                  "common": {"max_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1,
                             "save_strategy": "no", "bf16": False, "report_to": "none"},
                  "infifpo": {"length_normalize": False, "beta": 0.1}},
        "eval": {"benchmarks": ["arithmetic:test:2"], "max_tokens": 4},
    }
    path = root / "reproduce.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cfg = pipeline.load_config(path)
    train_log = Path(cfg["run_dir"]) / "logs" / "train.log"
    first = pipeline.run(cfg)
    log_first = train_log.read_text()
    second = pipeline.run(cfg)
    return cfg, first, second, (log_first, train_log.read_text())


def _resolved(result: dict, label: str) -> dict:
    return yaml.safe_load((Path(result["checkpoints"][label]) / "infifpo_train_config.yaml").read_text())


@pytest.mark.slow
def test_labels_runs_and_timings_contract(reproduce):
    cfg, out, _, _ = reproduce
    saved = json.loads((Path(cfg["run_dir"]) / "pipeline_outputs.json").read_text())
    labels = _labels(cfg)
    b, pairwise_b = cfg["sources"][1], labels[5]
    trained, rows = [x for x in labels if x not in MERGED], [x for x in labels if "/" not in x]
    assert list(saved["checkpoints"]) == labels
    assert set(saved["evals"]) == {"pivot", *(f"source:{m}" for m in cfg["sources"]), *rows}
    assert all(isinstance(v, str) for key in ("checkpoints", "evals") for v in saved[key].values())
    arm = {"fusion_sources": [cfg["sources"][0]]}
    pairwise = {"method": "infifpo", "arm": pairwise_b[8:-1], "overrides": {"fusion_sources": [b]}}
    merged = {"method": "infifpo", "arm": "pairwise_rsaf", "overrides": {"pairwise": "rsaf"}}
    assert saved["runs"] == {
        "sft": {"method": "sft", "seed": 0, "arm": None, "overrides": {}},
        "sft_wrpo": {"method": "sft", "seed": 0, "arm": None, "overrides": {}},
        "wrpo": {"method": "wrpo", "seed": 0, "arm": None, "overrides": {}},
        "infifpo": {"method": "infifpo", "seed": 0, "arm": None, "overrides": {}},
        "infifpo[one_source]": {"method": "infifpo", "seed": 0, "arm": "one_source", "overrides": arm},
        pairwise_b: {**pairwise, "seed": 0, "component_of": ["infifpo[pairwise_rsaf]"]},
        "infifpo[pairwise_rsaf]": {**merged, "seed": 0, "merge": {
            "method": "rsaf", "components": ["infifpo[one_source]", pairwise_b]}},
        "wrpo@seed1": {"method": "wrpo", "seed": 1, "arm": None, "overrides": {}},
        "infifpo@seed1": {"method": "infifpo", "seed": 1, "arm": None, "overrides": {}},
    }
    assert ({f"train/{x}" for x in trained} | {f"merge/{x}" for x in MERGED} | {f"eval/{x}" for x in rows}
            <= set(saved["timings"]))
    assert not {f"eval/{x}" for x in labels if "/" in x} & set(saved["timings"])  # intermediates: not evaluated
    for label in trained:  # the seed each trainer ran with, and a finished model
        run, resolved = saved["runs"][label], _resolved(out, label)
        assert (resolved["seed"], resolved["data_seed"]) == (run["seed"], run["seed"]), label
        assert (Path(out["checkpoints"][label]) / "model.safetensors").exists(), label
    # Every preference run starts from its SFT checkpoint; InfiFPO and its arms share the scored pairs.
    for label in trained[2:]:
        start = out["checkpoints"]["sft_wrpo" if label.startswith("wrpo") else "sft"]
        assert _resolved(out, label)["model_name_or_path"] == str(start), label
        assert _resolved(out, label)["dataset_name"] == str(out["scored"] if "infifpo" in label
                                                            else out["pairs"]["wrpo"]), label
    scores = json.loads((Path(out["evals"]["infifpo[one_source]"]) / "scores.json").read_text())
    assert scores["benchmarks"]["arithmetic"]["n"] == 2
    assert (Path(cfg["run_dir"]) / "report.md").exists()


@pytest.mark.slow
def test_arms_and_seeds_differ_from_the_base_only_in_their_overrides(reproduce):
    cfg, out, _, _ = reproduce
    by_output_dir = {"output_dir", "logging_dir", "run_name"}  # follow the checkpoint directory

    def diff(a: str, b: str) -> set[str]:
        ra, rb = _resolved(out, a), _resolved(out, b)
        return {k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k)} - by_output_dir

    assert diff("infifpo", "infifpo[one_source]") == {"fusion_sources"}
    assert diff("infifpo[one_source]", _labels(cfg)[5]) == {"fusion_sources"}  # the other source's pairwise run
    assert diff("infifpo", "infifpo@seed1") == {"seed", "data_seed"}
    assert diff("wrpo", "wrpo@seed1") == {"seed", "data_seed"}
    assert _resolved(out, "infifpo[one_source]")["fusion_sources"] == [cfg["sources"][0]]
    # The arm fused one source: its per-source fusion metrics name that source only.
    log = json.loads((Path(out["checkpoints"]["infifpo[one_source]"]) / "infifpo_train_log.json").read_text())
    shares = {k.split("/", 2)[2] for e in log["log_history"] for k in e if k.startswith("fusion/chosen_share/")}
    assert shares == {cfg["sources"][0], "pivot"}


@pytest.mark.slow
def test_wrpo_trains_on_samples_of_its_own_sft_checkpoint(reproduce):
    cfg, out, _, _ = reproduce
    own = str(out["checkpoints"]["sft_wrpo"])
    first_pass = {r["id"]: r for r in read_output(out["pairs"]["wrpo_first_pass"])}
    sft_rows = read_output(out["pairs"]["sft_wrpo"])
    # WRPO's SFT: its own SFT third (first pass), the target y_ws = the best source response.
    assert sft_rows and all(r["split"] == "sft" for r in sft_rows)
    assert {r["id"] for r in sft_rows} == {i for i, r in first_pass.items() if r["split"] == "sft"}
    for r in sft_rows:
        assert r["chosen"] == first_pass[r["id"]]["source_chosen"] and r["chosen_model"] in cfg["sources"]
    assert _resolved(out, "sft_wrpo")["model_name_or_path"] == cfg["pivot"]
    assert _resolved(out, "sft_wrpo")["dataset_name"] == str(out["pairs"]["sft_wrpo"])
    # The quadruples WRPO trains on: y_wt / y_l are samples of the WRPO-SFT checkpoint, y_ws a source's.
    own_samples = {s["id"]: s for s in read_output(out["samples"][own])}
    assert own_samples and {s["model"] for s in own_samples.values()} == {own}
    po = [r for r in read_output(out["pairs"]["wrpo"]) if r["split"] == "po"]
    assert po
    for r in po:
        for side in ("chosen", "rejected"):
            sample = own_samples[r[f"{side}_sample_id"]]
            assert r[f"{side}_model"] == own and r[side][0]["content"] == sample["text"]
        assert r["source_chosen_model"] in cfg["sources"]
    # Same split as the first pass: WRPO optimises preferences on prompts its SFT did not train on.
    assert not {r["id"] for r in po} & {r["id"] for r in sft_rows}


@pytest.mark.slow
def test_a_second_run_skips_finished_work(reproduce):
    _, first, second, (log_first, log_second) = reproduce
    assert json.dumps(second, default=str) == json.dumps(first, default=str)
    assert log_second == log_first  # no training process started again


@pytest.mark.slow
def test_a_pairwise_arm_merges_its_per_source_runs_into_the_sft_checkpoint(reproduce):
    """infifpo[pairwise_rsaf]: one InfiFPO run per source (the first source's is infifpo[one_source]), merged by RSAF
    into the SFT checkpoint, evaluated, and reported as an ablation arm with its intervals and its cost; the
    per-source run is no row of its own. The second pipeline run started no merge."""
    cfg, out, _, _ = reproduce
    labels = _labels(cfg)
    pairwise_b = labels[5]
    assert _resolved(out, pairwise_b)["fusion_sources"] == [cfg["sources"][1]]
    record = json.loads((Path(out["checkpoints"][MERGED[0]]) / pipeline.MERGE_DONE).read_text())
    assert record["method"] == "rsaf" and record["base"] == str(Path(out["checkpoints"]["sft"]).resolve())
    assert record["models"] == [str(Path(out["checkpoints"][c]).resolve()) for c in (labels[4], pairwise_b)]
    assert json.loads((Path(out["evals"][MERGED[0]]) / "scores.json").read_text())["benchmarks"]["arithmetic"]["n"]
    assert (Path(cfg["run_dir"]) / "logs" / "merge.log").read_text().count("\n$ ") == 1  # not run again
    report = json.loads((Path(cfg["run_dir"]) / "report.json").read_text())
    keys = [r["key"] for r in [*report["table"]["rows"], *report["ablation"]["rows"]]]
    assert "infifpo[pairwise_rsaf]" in report["ablation"]["arms"] and pairwise_b not in keys
    row = next(r for r in report["ablation"]["rows"] if r["key"] == "infifpo[pairwise_rsaf]")
    assert row["seeds"] == [0] and row["benchmarks"]["arithmetic"]["ci95"] and row["compute_hours"]
    assert row["changes"] == {"pairwise": [None, "rsaf"]}
    cost = next(a for a in report["cost"]["arms"] if a["arm"] == "infifpo[pairwise_rsaf]")
    timings = json.loads((Path(cfg["run_dir"]) / "timings.json").read_text())
    own = [f"train/{labels[4]}", f"train/{pairwise_b}", f"merge/{MERGED[0]}"]
    assert cost["training_runs"] == [labels[4], pairwise_b] and cost["shared"] == [labels[4]]
    assert cost["merge"] == "rsaf" and cost["extra_scoring_s"] == 0.0
    assert cost["own_seconds"] == pytest.approx(sum(timings[t]["seconds"] for t in own))
    assert [f["label"] for f in report["fusion"] if f["row"] == "infifpo[pairwise_rsaf]"] == [pairwise_b]
    md = (Path(cfg["run_dir"]) / "report.md").read_text()
    assert "| InfiFPO [pairwise_rsaf] | pairwise=rsaf |" in md and "### Ablation arms: what each costs" in md


def _train_args(monkeypatch) -> list[list[str]]:
    """Record the arguments of every `infifpo train` the pipeline starts; each "run" only makes its output_dir."""
    calls: list[list[str]] = []

    def fake(name: str, args: list[str], *_, **__) -> list[Path]:
        calls.append(args)
        Path(args[args.index("--output_dir") + 1]).mkdir(parents=True, exist_ok=True)
        return []

    monkeypatch.setattr(pipeline, "run_stage", fake)
    return calls


def test_an_unfinished_run_resumes_from_its_latest_complete_checkpoint(tmp_path, monkeypatch):
    config = tmp_path / "infifpo.yaml"
    config.write_text("beta: 0.1\n")
    cfg = {"run_dir": str(tmp_path / "run"), "train": {"infifpo": {"config": str(config)}}}
    run = {"method": "infifpo", "seed": 1, "arm": None, "overrides": {"clip": False}}
    calls = _train_args(monkeypatch)
    timings = pipeline.Timings(tmp_path / "timings.json")
    out = pipeline.train("infifpo@seed1", run, cfg, "m", tmp_path / "scored", tmp_path / "logs", timings)
    assert "--resume_from_checkpoint" not in calls[0] and calls[0][calls[0].index("--seed") + 1] == "1"
    assert out.name.startswith("infifpo_seed1-")
    (out / pipeline.TRAIN_DONE).unlink()  # as if it had been killed after saving checkpoints
    for step, complete in ((2, True), (10, True), (12, False)):  # checkpoint-12 was being written when killed
        (out / f"checkpoint-{step}").mkdir()
        if complete:
            (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert pipeline.train("infifpo@seed1", run, cfg, "m", tmp_path / "scored", tmp_path / "logs", timings) == out
    assert calls[1][calls[1].index("--resume_from_checkpoint") + 1] == str(out / "checkpoint-10")
    assert calls[1][:len(calls[0])] == calls[0]
    pipeline.train("infifpo@seed1", run, cfg, "m", tmp_path / "scored", tmp_path / "logs", timings)
    assert len(calls) == 2  # finished: not started again


def _cfg(**train) -> dict:
    return {"pivot": "p", "sources": ["a", "b"], "train": {"methods": ["dpo", "infifpo"], **train}}


@pytest.mark.parametrize(("train", "match"), [
    ({"seeds": []}, "non-empty list of distinct integers"),
    ({"seeds": [0, 0]}, "non-empty list of distinct integers"),
    ({"seeds": [0, 1], "common": {"seed": 3}}, r"train.common: \['seed'\] are set per run"),
    ({"ablations": {"x": {"sources": ["c"]}}}, r"train.ablations.x.sources: \['c'\] must be"),
    ({"ablations": {"x": {"seed": 1}}}, "cannot differ per arm"),
    ({"ablations": {"a@b": {"clip": False}}}, "expected a name of letters"),
    ({"methods": ["dpo"], "ablations": {"x": {"clip": False}}}, "add infifpo to train.methods"),
    ({"seeds": [0, 1], "ablation_seeds": [2]}, r"distinct seeds from train.seeds \[0, 1\], got \[2\]"),
    ({"ablation_seeds": []}, "non-empty list of distinct seeds"),
    ({"ablation_seeds": [0, 0]}, "non-empty list of distinct seeds"),
])
def test_bad_seeds_and_ablations_are_config_errors(train, match):
    with pytest.raises(ConfigError, match=match):
        pipeline.planned_runs(_cfg(**train))


@pytest.mark.parametrize(("arm", "match"), [
    ({"pairwise": "average"}, r"train.ablations.x.pairwise: 'average' is not a merge method; set one of \['rsaf', "
                              r"'ties', 'task_arithmetic', 'dare_ties', 'sce'\]"),
    ({"pairwise": True}, "is not a merge method"),
    ({"pairwise": "rsaf", "sources": ["c"]}, r"train.ablations.x.sources: \['c'\] must be"),
])
def test_bad_pairwise_arms_are_config_errors(arm, match):
    with pytest.raises(ConfigError, match=match):
        pipeline.planned_runs(_cfg(ablations={"x": arm}))


def test_a_pairwise_arm_plans_one_run_per_source_then_its_merge():
    """Each source's run has the arm's other overrides and that source alone; an identical run planned already (the
    one-source arm's, another pairwise arm's) is reused; ``sources`` picks the sources paired."""
    cfg = {"pivot": "p", "sources": ["org/a", "other/a", "b"],
           "train": {"methods": ["infifpo"], "seeds": [0, 1], "ablations": {
               "rsaf": {"pairwise": "rsaf", "clip": False}, "one": {"sources": ["b"], "clip": False},
               "ties": {"pairwise": "ties", "clip": False}, "sub": {"pairwise": "rsaf", "sources": ["org/a", "b"]}}}}
    runs = pipeline.planned_runs(cfg)
    assert pipeline.source_tags(cfg["sources"]) == {"org/a": "a-0", "other/a": "a-1", "b": "b"}
    seed0 = [k for k, r in runs.items() if r["seed"] == 0]
    assert seed0 == ["sft", "infifpo", "infifpo[one]", "infifpo[rsaf/a-0]", "infifpo[rsaf/a-1]", "infifpo[rsaf]",
                     "infifpo[ties]", "infifpo[sub/a-0]", "infifpo[sub/b]", "infifpo[sub]"]
    assert runs["infifpo[rsaf/a-1]"] == {"method": "infifpo", "seed": 0, "arm": "rsaf/a-1",
                                         "overrides": {"clip": False, "fusion_sources": ["other/a"]},
                                         "component_of": ["infifpo[rsaf]", "infifpo[ties]"]}
    assert runs["infifpo[rsaf]"] == {"method": "infifpo", "seed": 0, "arm": "rsaf",
                                     "overrides": {"pairwise": "rsaf", "clip": False},
                                     "merge": {"method": "rsaf", "components": ["infifpo[rsaf/a-0]",
                                                                                "infifpo[rsaf/a-1]", "infifpo[one]"]}}
    assert runs["infifpo[ties]"]["merge"] == {"method": "ties", "components": runs["infifpo[rsaf]"]["merge"][
        "components"]}
    assert "component_of" not in runs["infifpo[one]"]  # a row of its own, also a pairwise run
    assert runs["infifpo[sub]"]["merge"]["components"] == ["infifpo[sub/a-0]", "infifpo[sub/b]"]
    assert runs["infifpo[sub/b]"]["overrides"] == {"fusion_sources": ["b"]}  # no clip override: not one's run
    assert runs["infifpo[rsaf]@seed1"]["merge"]["components"] == [
        "infifpo[rsaf/a-0]@seed1", "infifpo[rsaf/a-1]@seed1", "infifpo[one]@seed1"]


def test_a_merge_runs_once_from_the_sft_checkpoint_and_is_reused(tmp_path, monkeypatch):
    calls: list[list[str]] = []

    def fake(name: str, args: list[str], *_, **__) -> list[Path]:
        opts = yaml.safe_load(Path(args[1]).read_text())
        calls.append([name, opts])
        Path(opts["output"]).mkdir(parents=True)
        (Path(opts["output"]) / pipeline.MERGE_DONE).write_text("{}")
        return []

    monkeypatch.setattr(pipeline, "run_stage", fake)
    cfg = {"run_dir": str(tmp_path / "run")}
    run = {"method": "infifpo", "seed": 3, "arm": "x", "overrides": {"pairwise": "ties"},
           "merge": {"method": "ties", "components": ["infifpo[x/a]", "infifpo[one]"]}}
    ckpts = {"sft": tmp_path / "sft", "infifpo[x/a]": tmp_path / "a", "infifpo[one]": tmp_path / "one"}
    timings = pipeline.Timings(tmp_path / "timings.json")
    out = pipeline.merge("infifpo[x]@seed3", run, cfg, ckpts, tmp_path / "logs", timings)
    assert calls == [["merge", {"method": "ties", "base": str(tmp_path / "sft"),
                                "models": [str(tmp_path / "a"), str(tmp_path / "one")], "seed": 3,
                                "output": str(out)}]]
    assert out.parent == tmp_path / "run" / "checkpoints" and out.name.startswith("infifpo_x_seed3-")
    assert "merge/infifpo[x]@seed3" in timings.data
    assert pipeline.merge("infifpo[x]@seed3", run, cfg, ckpts, tmp_path / "logs", timings) == out
    assert len(calls) == 1  # done: not started again


def test_default_runs_are_todays_labels():
    runs = pipeline.planned_runs(_cfg())
    assert list(runs) == ["sft", "dpo", "infifpo"] and {r["seed"] for r in runs.values()} == {0}


def test_ablation_seeds_limit_the_arms_to_those_seeds():
    runs = pipeline.planned_runs(_cfg(seeds=[0, 1, 2], ablation_seeds=[1], ablations={"x": {"clip": False}}))
    assert list(runs) == ["sft", "dpo", "infifpo", "dpo@seed1", "infifpo@seed1", "infifpo[x]@seed1", "dpo@seed2",
                          "infifpo@seed2"]
    every = pipeline.planned_runs(_cfg(seeds=[0, 1], ablations={"x": {"clip": False}}))  # default: every seed
    assert [k for k in every if k.startswith("infifpo[x]")] == ["infifpo[x]", "infifpo[x]@seed1"]


def test_reproduce_config_plans_every_arm_and_seed_and_its_options_exist(capsys):
    """configs/reproduce.yaml: both SFTs, 3 seeds x 3 methods, 7 trained arms and 2 pairwise arms (RSAF, TIES) on the
    first seed, the pairwise arms sharing one extra run (the other is one_source's); every arm option is an
    InfiFPOConfig field (or the pipeline's pairwise); `infifpo plan` reads it."""
    from infifpo import plan
    from infifpo.trainers.infifpo import InfiFPOConfig

    path = ROOT / "configs" / "reproduce.yaml"
    runs = pipeline.planned_runs(pipeline.load_config(path))
    assert len(runs) == 2 + 3 * 3 + 7 + 1 + 2 and runs["infifpo@seed2"]["seed"] == 2
    assert {r["seed"] for r in runs.values() if r["arm"]} == {0}
    components = ["infifpo[one_source]", "infifpo[pairwise_rsaf/gemma3-270m]"]
    assert runs["infifpo[pairwise_rsaf]"]["merge"] == {"method": "rsaf", "components": components}
    assert runs["infifpo[pairwise_ties]"]["merge"] == {"method": "ties", "components": components}
    fields = {f.name for f in dataclasses.fields(InfiFPOConfig)}
    assert all(set(r["overrides"]) - {pipeline.PAIRWISE} <= fields for r in runs.values())
    assert plan.main(["--config", str(path)]) == 0 and "train/infifpo" in capsys.readouterr().out
