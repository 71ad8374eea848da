"""`infifpo pipeline --config FILE` (what `make fpo` and `make reproduce` run): every stage in order, each as its own
`infifpo <stage>` process, so vLLM engines and training never share memory or an import graph.

Order: prompts → sample (pivot, then each source) → judge → pair (the InfiFPO recipe) → SFT on the SFT split →
[with ``wrpo``: the faithful WRPO recipe, ``wrpo_pairs``] → score (the SFT checkpoint as the frozen pivot, each
source with its own tokenizer/template, PO rows only) → preference training of each configured method (and each
InfiFPO ablation arm) once per seed, a pairwise arm's merge after its runs → eval of every report row (pivot,
sources, every checkpoint but a pairwise arm's intermediate runs) → report.
Stages are content-addressed and resumable (``infifpo.store``), so a re-run skips finished work; a training run is
skipped when its output directory holds the completion marker written here, and resumed from its latest complete
``checkpoint-*`` (``--resume_from_checkpoint``) when it has one but no marker. Wall time per stage is kept in
``<run_dir>/timings.json``.

Runs (``train.seeds``, default [0]; ``train.ablations``, {arm: InfiFPO overrides}): SFT (and WRPO's own SFT) once,
with the first seed; each method and arm once per seed (TRL ``seed`` and ``data_seed``), each arm on the same scored
pairs as InfiFPO (``sources: [...]`` in an arm is the trainer's ``fusion_sources``). A *pairwise* arm
(``pairwise: <merge method>``, e.g. ``{pairwise: rsaf}``; docs/methods.md, RSAF) is one InfiFPO run per source
(pivot + that source: the arm's other overrides and ``fusion_sources: [source]``; with ``sources``, one per listed
source), labelled "infifpo[<arm>/<source tag>]" (``source_tags``) unless an identical run is already planned (a
one-source arm's, another pairwise arm's: reused, not trained twice), then `infifpo merge` of those runs into the SFT
checkpoint they start from, the arm's checkpoint ("infifpo[<arm>]", timing "merge/<label>"). The per-source runs
are intermediates: in ``checkpoints`` and ``runs`` (marked ``component_of``: [the merged labels]), not evaluated,
not report rows; the merged label's ``runs`` entry has ``merge``: {"method", "components"}. Labels in
``pipeline_outputs.json`` (``checkpoints`` and ``evals``: {label: path}; ``runs``: {label: {"method", "seed", "arm",
"overrides"}} for every trained label): "sft", "sft_wrpo", "dpo" / "wrpo" / "infifpo" for the first seed,
"<method>@seed<k>" for seed k after it, "infifpo[<arm>]" and "infifpo[<arm>]@seed<k>"; timings "train/<label>",
"eval/<label>" (the eval of a label is its own sample, judge and eval processes: ``evaluate_model``, also what
`infifpo eval --model` runs; timings "eval/<label>/sample", "eval/<label>/judge", "eval/<label>").
Owns: the ordering, the runs and their labels, and the hand-off of output paths (``<run_dir>/pipeline_outputs.json``).
Does not own: any stage's logic.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from infifpo.config import check_keys
from infifpo.eval.stage import ModelEvalOptions, read_benchmarks, safe_label
from infifpo.provenance import output_digest
from infifpo.schema import ConfigError, StageFailedError
from infifpo.store import (
    RESULT_FILE_ENV,
    StageOutput,
    atomic_write,
    fingerprint,
    read_output,
    read_recorded_outputs,
    safe_name,
)
from infifpo.trainers import packaged_config

logger = logging.getLogger("infifpo.pipeline")
TRAIN_DONE = "infifpo_train_done.json"
TOP_KEYS = {"name", "run_dir", "pivot", "sources", "backend", "prompts", "sample", "judge", "pair", "score", "train",
            "eval", "report"}
SEED_KEYS = ("seed", "data_seed")  # TRL training arguments set per run from train.seeds
ARM_ALIASES = {"sources": "fusion_sources"}  # an ablation arm's pipeline name -> the InfiFPOConfig field
PAIRWISE = "pairwise"  # an arm key (pipeline only): one InfiFPO run per source, then merged by this merge method
MERGE_DONE = "merge.json"  # = infifpo.merge.stage.RECORD_FILE: written last (the merge is renamed into place)
ARM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
STAGE_STOP_S = 60.0  # a stopped stage's time to unwind (vLLM's shutdown, its own descendants' grace) before SIGKILL


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The pipeline YAML as a dict; unknown top-level keys are a ConfigError with a did-you-mean."""
    from infifpo.config import suggest

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    for key in cfg:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}.{suggest(key, TOP_KEYS)}")
    for key in ("pivot", "sources", "prompts"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing required key {key!r}")
    cfg.setdefault("name", Path(path).stem)
    cfg.setdefault("run_dir", f"runs/{cfg['name']}")
    check_stage_sections(cfg, path)  # a stage option the stage does not take fails here, not hours in
    planned_runs(cfg)  # train.seeds / train.ablations / train.grid errors before any stage runs
    if grid_of(cfg):
        dev_specs(cfg)
    return cfg


# What the pipeline sets itself in each stage's options (inputs, outputs, the model); a stage section holds the rest.
PIPELINE_SETS = {"sample": ("prompts", "model", "name", "models", "out", "json", "pivot"),
                 "judge": ("samples", "prompts", "out"), "pair": ("judged", "prompts", "pivot", "out"),
                 "score": ("pairs", "pivot", "sources", "out")}
PIPELINE_ONLY = {"pair": ("wrpo_sft_fraction",)}  # section keys that are the pipeline's, not the stage's


def stage_options_classes() -> dict[str, type]:
    """The options dataclass of each stage a pipeline config section configures (``infifpo.config``)."""
    from infifpo.judge.stage import JudgeOptions
    from infifpo.pair import PairOptions
    from infifpo.sample import SampleOptions
    from infifpo.score.stage import ScoreOptions

    return {"sample": SampleOptions, "judge": JudgeOptions, "pair": PairOptions, "score": ScoreOptions}


def check_stage_sections(cfg: dict[str, Any], path: str | os.PathLike) -> None:
    """ConfigError (with a did-you-mean) for a key of the prompts / sample / judge / pair / score section that the
    stage does not take or the pipeline sets itself, and for a ``pair.recipe`` other than infifpo (the pipeline
    builds the infifpo pairs, and WRPO's when ``train.methods`` has wrpo)."""
    from infifpo.config import check_keys

    prompts = cfg.get("prompts")
    if not isinstance(prompts, dict) or not isinstance(prompts.get("sources"), list):
        raise ConfigError(f"{path}: prompts must be a mapping with a `sources:` list (and an optional seed).")
    check_keys(prompts, ("sources", "seed"), f"{path}, section prompts", "The section takes sources and seed.")
    for stage, cls in stage_options_classes().items():
        section = cfg.get(stage) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section {stage} must be a mapping of `infifpo {stage}` options.")
        known = [f.name for f in dataclasses.fields(cls) if f.name not in PIPELINE_SETS[stage]]
        known += PIPELINE_ONLY.get(stage, ())
        fix = (f"Keys are the options `infifpo {stage} --help` lists, less those the pipeline sets "
               f"({', '.join(PIPELINE_SETS[stage])}).")
        parts = {stage: section}
        if stage == "sample":  # per-role options under sample.pivot / sample.sources
            parts = {"sample": {k: v for k, v in section.items() if k not in ("pivot", "sources")},
                     **{f"sample.{r}": section[r] for r in ("pivot", "sources") if isinstance(section.get(r), dict)}}
        if stage == "pair" and section.get("recipe", "infifpo") != "infifpo":
            raise ConfigError(f"{path}: pair.recipe {section['recipe']!r}: the pipeline builds the infifpo pairs "
                              "(SFT, DPO, InfiFPO) and WRPO's own when train.methods has wrpo; leave pair.recipe out "
                              "or set it to infifpo.")
        for where, keys in parts.items():
            check_keys(keys, known, f"{path}, section {where}", fix)
    if cfg.get("eval"):
        check_keys(cfg["eval"], EVAL_CONFIG_KEYS, f"{path}, section eval",
                   "Keys are the options of `infifpo eval --help` but model, label and out.")


def methods_of(cfg: dict[str, Any]) -> list[str]:
    """``train.methods`` (default dpo, infifpo): the preference methods, trained from the SFT checkpoint."""
    methods = list((cfg.get("train") or {}).get("methods", ["dpo", "infifpo"]))
    if len(set(methods)) != len(methods) or "sft" in methods:
        raise ConfigError(f"train.methods {methods}: list each preference method once (SFT always runs).")
    return methods


def seeds_of(cfg: dict[str, Any]) -> list[int]:
    """``train.seeds`` (default [0]): training seeds; the first is SFT's and keeps the unsuffixed labels."""
    seeds = (cfg.get("train") or {}).get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds)):
        raise ConfigError(f"train.seeds must be a non-empty list of distinct integers, got {seeds!r}.")
    return seeds


def arms_of(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``train.ablations`` as {arm: overrides of the infifpo train config}, ``sources`` renamed ``fusion_sources``; an
    arm's ``pairwise`` (a method of `infifpo merge`) makes it a pairwise arm (``_plan_pairwise``)."""
    arms = (cfg.get("train") or {}).get("ablations") or {}
    if not isinstance(arms, dict):
        raise ConfigError(f"train.ablations must map arm names to InfiFPO overrides, got {arms!r}.")
    if arms and "infifpo" not in methods_of(cfg):
        raise ConfigError("train.ablations are InfiFPO arms: add infifpo to train.methods.")
    out = {}
    for name, overrides in arms.items():
        if not (isinstance(name, str) and ARM_NAME.fullmatch(name) and isinstance(overrides, dict) and overrides):
            raise ConfigError(f"train.ablations.{name}: expected a name of letters, digits, '_', '.', '-' mapping to "
                              f"a non-empty mapping of InfiFPO options, got {overrides!r}.")
        arm = {ARM_ALIASES.get(k, k): v for k, v in overrides.items()}
        if set(arm) & {*SEED_KEYS, "config"}:
            raise ConfigError(f"train.ablations.{name}: {sorted(set(arm) & {*SEED_KEYS, 'config'})} cannot differ "
                              "per arm (seeds come from train.seeds; an arm overrides the infifpo config).")
        chosen = arm.get("fusion_sources")
        if chosen is not None and (not isinstance(chosen, list) or not chosen
                                   or any(x not in cfg["sources"] for x in chosen)):
            raise ConfigError(f"train.ablations.{name}.sources: {chosen!r} must be a non-empty list of the config's "
                              f"sources {cfg['sources']}.")
        if PAIRWISE in arm:
            _check_pairwise(name, arm[PAIRWISE])
        out[name] = arm
    return out


def _check_pairwise(arm: str, method: Any) -> None:
    """ConfigError unless ``method`` (an arm's ``pairwise``) is a method of `infifpo merge`."""
    from infifpo.merge.stage import METHODS  # imports torch and safetensors: only for a config with a pairwise arm

    if method not in METHODS:
        raise ConfigError(f"train.ablations.{arm}.pairwise: {method!r} is not a merge method; set one of "
                          f"{list(METHODS)} (`infifpo merge --method`).")


def source_tags(sources: list[str]) -> dict[str, str]:
    """{source: its tag in a pairwise run's label}: the directory-safe basename ("Qwen/Qwen2.5-7B" -> "Qwen2.5-7B"),
    with "-<index>" added to every source whose basename another source shares."""
    names = [safe_label(Path(str(m).rstrip("/")).name) for m in sources]
    return {m: n if names.count(n) == 1 else f"{n}-{i}" for i, (m, n) in enumerate(zip(sources, names, strict=True))}


def ablation_seeds_of(cfg: dict[str, Any]) -> list[int]:
    """``train.ablation_seeds`` (default: every seed of ``train.seeds``): the seeds the ablation arms train with. Each
    arm is one extra run per listed seed on the same scored pairs; a subset of the seeds keeps the arms affordable."""
    seeds = seeds_of(cfg)
    chosen = (cfg.get("train") or {}).get("ablation_seeds", seeds)
    if (not isinstance(chosen, list) or not chosen or len(set(chosen)) != len(chosen)
            or any(x not in seeds or isinstance(x, bool) for x in chosen)):
        raise ConfigError(f"train.ablation_seeds must be a non-empty list of distinct seeds from train.seeds {seeds}, "
                          f"got {chosen!r}.")
    return chosen


GRID_KEYS = ("dev_items",)  # train.grid's own keys; the others are "common" and method names


def grid_of(cfg: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """``train.grid`` as {method: [point, ...]}, each point a mapping of training options; {} without a grid.

    ``train.grid: {common: {learning_rate: [...]}, dpo: {beta: [...]}, ..., dev_items: N}``: every method of
    ``train.methods`` gets the product of ``common``'s values and its own. ConfigError for an unknown method, a
    value that is not a non-empty list, a seed or config key, a missing ``dev_items`` or methods with different
    numbers of points (every method gets the same hyper-parameter budget)."""
    grid = (cfg.get("train") or {}).get("grid")
    if not grid:
        return {}
    methods = methods_of(cfg)
    if not isinstance(grid, dict):
        raise ConfigError(f"train.grid must be a mapping (common, a method's name, dev_items), got {grid!r}.")
    unknown = sorted(set(grid) - {"common", *methods, *GRID_KEYS})
    if unknown:
        raise ConfigError(f"train.grid: unknown key(s) {unknown}; keys are common, dev_items and the methods of "
                          f"train.methods {methods}.")
    dev = grid.get("dev_items")
    if isinstance(dev, bool) or not isinstance(dev, int) or dev <= 0:
        raise ConfigError(f"train.grid.dev_items must be a positive integer (dev prompts per prompt source, held out "
                          f"after the run's own), got {dev!r}.")
    points = {}
    for method in methods:
        values = {**(grid.get("common") or {}), **(grid.get(method) or {})}
        for key, vals in values.items():
            if key in (*SEED_KEYS, "config") or not isinstance(vals, list) or not vals:
                raise ConfigError(f"train.grid: {key}: expected a non-empty list of values of a training option "
                                  f"(not a seed or config key), got {vals!r}.")
        points[method] = [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]
    if len({len(p) for p in points.values()}) > 1:
        raise ConfigError(f"train.grid gives the methods different numbers of points "
                          f"{ {m: len(p) for m, p in points.items()} }; give every method the same budget.")
    return points


def dev_specs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The dev split of ``train.grid``: for each prompt source of the run, the ``dev_items`` rows that follow the
    run's own in the same seeded order (``offset``), so they are held out from the prompts every pair comes from.
    ConfigError for a source without a size (it has no rows after it)."""
    from data_prep.prompts import parse_spec

    n = cfg["train"]["grid"]["dev_items"]
    out = []
    for raw in cfg["prompts"]["sources"]:
        spec = {k: v for k, v in parse_spec(raw).items() if v is not None}
        if "n" not in spec:
            raise ConfigError(f"train.grid: prompt source {raw!r} takes every row, so none is left for a dev split; "
                              "give it a size (e.g. arithmetic:train:128).")
        out.append({**spec, "offset": spec.get("offset", 0) + spec["n"], "n": n})
    return out


def run_label(method: str, seed: int, first_seed: int, arm: str | None = None) -> str:
    """A run's label: "infifpo", "infifpo[mean]", and "dpo@seed1", "infifpo[mean]@seed1" for a later seed."""
    return method + (f"[{arm}]" if arm else "") + ("" if seed == first_seed else f"@seed{seed}")


def planned_runs(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every training run (and merge) of ``cfg`` by label, in training order: {"method", "seed", "arm", "overrides"}
    (the arm's InfiFPO overrides; {} for other runs), plus ``component_of`` / ``merge`` for a pairwise arm's runs
    (``_plan_pairwise``). "sft" (and, with wrpo, WRPO's own SFT "sft_wrpo") once with the first seed; every method
    once per seed, then, per seed of ``train.ablation_seeds``, every trained arm, then every pairwise arm (its runs,
    then its merge). ConfigError for a bad ``train.seeds`` / ``train.ablations`` / ``train.ablation_seeds`` or a seed
    key set elsewhere in ``train``."""
    tcfg = cfg.get("train") or {}
    methods, seeds, arms, arm_seeds = methods_of(cfg), seeds_of(cfg), arms_of(cfg), ablation_seeds_of(cfg)
    for scope in ("common", "sft", *methods):
        if set(tcfg.get(scope) or {}) & set(SEED_KEYS):
            raise ConfigError(f"train.{scope}: {sorted(set(tcfg[scope]) & set(SEED_KEYS))} are set per run from "
                              "train.seeds (default [0]); list the seeds there instead.")
    first = seeds[0]
    runs = {name: {"method": "sft", "seed": first, "arm": None, "overrides": {}}
            for name in ["sft", *(["sft_wrpo"] if "wrpo" in methods else [])]}
    for seed in seeds:
        for method in methods:
            runs[run_label(method, seed, first)] = {"method": method, "seed": seed, "arm": None, "overrides": {}}
        if seed not in arm_seeds:
            continue
        for arm, overrides in arms.items():  # the trained arms first: a pairwise arm may reuse one of their runs
            if PAIRWISE not in overrides:
                runs[run_label("infifpo", seed, first, arm)] = {"method": "infifpo", "seed": seed, "arm": arm,
                                                                 "overrides": overrides}
        for arm, overrides in arms.items():
            if PAIRWISE in overrides:
                _plan_pairwise(runs, cfg["sources"], arm, overrides, seed, first)
    return runs


def _plan_pairwise(runs: dict[str, dict[str, Any]], sources: list[str], arm: str, overrides: dict[str, Any],
                   seed: int, first: int) -> None:
    """Add pairwise arm ``arm`` at ``seed`` to ``runs``: one InfiFPO run per source of the arm's ``sources`` (default
    every source) with the arm's other overrides and ``fusion_sources: [that source]``, then the merged label. A run
    already planned with the same method, seed and overrides (a one-source arm, another pairwise arm's) is reused;
    a new one is labelled "infifpo[<arm>/<source tag>]" and marked ``component_of`` (an intermediate, not a report
    row). The merged label's entry carries ``merge``: {"method", "components": [run labels, in source order]}."""
    label = run_label("infifpo", seed, first, arm)
    common = {k: v for k, v in overrides.items() if k not in (PAIRWISE, "fusion_sources")}
    tags = source_tags(sources)
    components = []
    for source in overrides.get("fusion_sources") or sources:
        own = {"method": "infifpo", "seed": seed, "arm": f"{arm}/{tags[source]}",
               "overrides": {**common, "fusion_sources": [source]}}
        same = next((k for k, r in runs.items() if "merge" not in r
                     and all(r[f] == own[f] for f in ("method", "seed", "overrides"))), None)
        if same is None:
            same = run_label("infifpo", seed, first, own["arm"])
            runs[same] = {**own, "component_of": []}
        if "component_of" in runs[same]:
            runs[same]["component_of"].append(label)
        components.append(same)
    runs[label] = {"method": "infifpo", "seed": seed, "arm": arm, "overrides": overrides,
                   "merge": {"method": overrides[PAIRWISE], "components": components}}


def stage_config(log_dir: Path, label: str, options: dict[str, Any]) -> list[str]:
    """Write one stage invocation's options (the stage's own option names, ``infifpo.config``) to
    ``<run_dir>/configs/<label>.yaml`` and return ``["--config", that file]``: what every stage ran with stays
    beside its log. Paths become strings, None values are left out (the stage's default applies)."""
    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list | tuple) else v

    path = log_dir.parent / "configs" / f"{safe_name(label.replace('/', '.').replace(':', '-'))}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump({k: plain(v) for k, v in options.items() if v is not None}, sort_keys=False))
    return ["--config", str(path)]


def _spec_label(spec: str | dict[str, Any]) -> str:
    """A prompt source spec in a timing label: strings as they are, mappings as JSON."""
    return json.dumps(spec, sort_keys=True) if isinstance(spec, dict) else str(spec)


def _train_flags(options: dict[str, Any]) -> list[str]:
    """TrlParser flags keep underscores: {"learning_rate": 1e-6} -> ["--learning_rate", "1e-06"]; a list gives one
    value per item: {"fusion_sources": ["a", "b"]} -> ["--fusion_sources", "a", "b"]."""
    return [x for k, v in options.items()
            for x in (f"--{k}", *(str(i).lower() if isinstance(i, bool) else str(i)
                                  for i in (v if isinstance(v, list) else [v])))]


class Timings:
    """Wall seconds of every stage process that did work, persisted in ``<run_dir>/timings.json``.

    A stage whose outputs are the ones already recorded under its label was skipped (cached): its first timing is
    kept. A run killed mid-stage records nothing for that stage; the resumed run records the remaining part only.
    """

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, label: str, stage: str, model: str | None, seconds: float, outputs: list[Path]) -> None:
        key = sorted(str(p) for p in outputs)
        if self.data.get(label, {}).get("outputs") == key:
            return
        self.data[label] = {"stage": stage, "model": model, "seconds": round(seconds, 3), "outputs": key}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))

    def summary(self) -> dict[str, dict[str, Any]]:
        return {k: {f: v[f] for f in ("stage", "model", "seconds")} for k, v in self.data.items()}


def run_stage(name: str, args: list[str], log_dir: Path, timings: Timings | None = None, label: str | None = None,
              model: str | None = None) -> list[Path]:
    """Run `infifpo <name> args` in a fresh process; return the completed output directories it recorded in its
    result file (``store.record_outputs``; the stage's stdout and stderr go to ``log_dir/<name>.log``)."""
    cmd = [sys.executable, "-m", "infifpo.cli", name, *args]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    result_file = log_dir / f".{name}.{os.getpid()}.{time.monotonic_ns()}.result.jsonl"
    logger.info("stage %s: %s", label or name, " ".join(cmd[3:]))
    start = time.time()
    offset = log_path.stat().st_size if log_path.exists() else 0
    try:
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, RESULT_FILE_ENV: str(result_file)})
            _wait_unwound(proc)
        if proc.returncode != 0:
            raise StageFailedError(f"stage {name!r} failed (exit {proc.returncode}): "
                                   f"{_stage_error(log_path, offset, name)} Log: {log_path}. Fix that and run the "
                                   "same pipeline command again: finished stages are reused.")
        outputs = read_recorded_outputs(result_file)
    finally:
        result_file.unlink(missing_ok=True)
    seconds = time.time() - start
    logger.info("stage %s done in %.0f s", label or name, seconds)
    if timings is not None:
        timings.record(label or name, name, model, seconds, outputs)
    return outputs


def _wait_unwound(proc: subprocess.Popen) -> int:
    """The exit code of stage process ``proc``. Interrupted while waiting (a stop signal reached this process and,
    through ``infifpo.cli``, the stage too), the stage gets ``STAGE_STOP_S`` to unwind, stopping its engines, before
    it is killed: killed at once (as ``subprocess.run`` does), it would leave its engine processes orphaned."""
    try:
        return proc.wait()
    except BaseException:
        try:
            proc.wait(timeout=STAGE_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def _stage_error(log_path: Path, offset: int, name: str) -> str:
    """The stage's own one-line error (``infifpo <name>: ...``) from what this run appended to its log, or the last
    non-empty line there."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        lines = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    own = [x for x in lines if x.startswith(f"infifpo {name}:")]
    return (own or lines or ["(the stage wrote nothing)"])[-1]


def _one(paths: list[Path], stage: str) -> Path:
    if len(paths) != 1:
        raise RuntimeError(f"stage {stage!r} printed {len(paths)} output directories, expected one: {paths}")
    return paths[0]


def train(label: str, run: dict[str, Any], cfg: dict[str, Any], model: str, dataset: Path, log_dir: Path,
          timings: Timings) -> Path:
    """Train run ``label`` (``planned_runs``) unless an identical run already finished; returns its output directory.

    Options: ``train.common`` < ``train.<method>`` < the run's overrides, then ``seed`` and ``data_seed``. A run
    killed after saving a checkpoint resumes from its latest complete one."""
    tcfg = cfg.get("train", {})
    method = run["method"]
    overrides = {**tcfg.get("common", {}), **tcfg.get(method, {}), **run["overrides"],
                 **dict.fromkeys(SEED_KEYS, run["seed"])}
    config_file = str(overrides.pop("config", None) or packaged_config(method))
    key = {"method": method, "model": model, "dataset": str(dataset), "config": Path(config_file).read_text(),
           "overrides": overrides}
    out = Path(cfg["run_dir"]) / "checkpoints" / f"{safe_name(label)}-{fingerprint(key)}"
    if (out / TRAIN_DONE).exists():
        logger.info("train %s: already done in %s", label, out)
        return out
    args = ["--method", method, "--config", config_file, "--model_name_or_path", model,
            "--dataset_name", str(dataset), "--output_dir", str(out), *_train_flags(overrides)]
    if any(out.glob("checkpoint-*")):  # killed after saving a checkpoint: resume from the latest complete one
        from infifpo.trainers.entry import latest_checkpoint  # imports torch: only when there is one

        resume = latest_checkpoint(out)
        if resume is not None:
            logger.info("train %s: resuming from %s", label, resume)
            args += ["--resume_from_checkpoint", str(resume)]
    start = time.time()
    run_stage("train", args, log_dir, label=f"train/{label}")
    timings.record(f"train/{label}", "train", model, time.time() - start, [out])
    (out / TRAIN_DONE).write_text(json.dumps(key, indent=1))
    return out


def merge(label: str, run: dict[str, Any], cfg: dict[str, Any], checkpoints: dict[str, Path], log_dir: Path,
          timings: Timings) -> Path:
    """The merged checkpoint of pairwise arm ``label`` (``planned_runs``): one `infifpo merge` process merging the
    arm's component runs into the SFT checkpoint they start from, by the arm's method (the merge's own defaults;
    ``seed``: the run's), unless that merge is already there (its record is written last); timing "merge/<label>"."""
    spec = run["merge"]
    base, models = checkpoints["sft"], [checkpoints[c] for c in spec["components"]]
    opts = {"method": spec["method"], "base": str(base), "models": [str(m) for m in models], "seed": run["seed"]}
    out = Path(cfg["run_dir"]) / "checkpoints" / f"{safe_name(label)}-{fingerprint(opts)}"
    if (out / MERGE_DONE).exists():
        logger.info("merge %s: already done in %s", label, out)
        return out
    start = time.time()
    run_stage("merge", stage_config(log_dir, f"merge/{label}", {**opts, "output": out}), log_dir,
              label=f"merge/{label}")
    timings.record(f"merge/{label}", "merge", str(base), time.time() - start, [out])
    return out


def pair(cfg: dict[str, Any], recipe: str, judged: list[Path], prompts: Path, dirs: tuple[Path, Path],
         timings: Timings, *, pivot: str | None = None, label: str | None = None) -> Path:
    """The pairs of one recipe (same judged samples, split seed and options for every recipe), with ``pivot``
    (default the config's) as the target model. WRPO splits by ``pair.wrpo_sft_fraction`` (default: the recipe's
    one third), and names its sources, so that other judged models (the original pivot's samples in the second
    pass) are left out."""
    data, logs = dirs
    opts = dict(cfg.get("pair", {}))
    wrpo_fraction = opts.pop("wrpo_sft_fraction", None)
    opts["recipe"] = recipe
    if recipe == "wrpo":
        opts.update(sft_fraction=wrpo_fraction, sources=opts.get("sources") or list(cfg["sources"]))
    label = label or f"pair/{recipe}"
    opts = {"judged": judged, "prompts": prompts, "pivot": pivot or cfg["pivot"], "out": data, **opts}
    return _one(run_stage("pair", stage_config(logs, label, opts), logs, timings, label), "pair")


def wrpo_sft_rows(first_pass: Path, data: Path) -> Path:
    """WRPO's SFT rows: the SFT split of the first-pass quadruples with chosen = y_ws (the best source response)
    and its provenance columns, as a content-addressed output ``sft-wrpo-*`` (the SFT trainer reads ``chosen``)."""
    out = StageOutput(data, "sft-wrpo", {"stage": "sft_wrpo_rows", "version": 1, "pairs": output_digest(first_pass)})
    if not out.is_complete():
        rows = [{**{k: v for k, v in r.items() if not k.startswith(("chosen", "rejected", "source_chosen"))},
                 **{k.removeprefix("source_"): v for k, v in r.items() if k.startswith("source_chosen")}}
                for r in read_output(first_pass) if r["split"] == "sft"]
        out.write_all(rows)
    return out.path


def wrpo_pairs(cfg: dict[str, Any], prompts: Path, judged: list[Path], dirs: tuple[Path, Path], timings: Timings,
               run: dict[str, Any]) -> tuple[dict[str, Path], Path, Path]:
    """The faithful WRPO recipe (docs/methods.md "Data recipes"): first-pass quadruples split one third SFT / two
    thirds PO, y_ws = best source sample; WRPO's own SFT ("sft_wrpo") from the pivot on the SFT third with
    chosen = y_ws; a second sampling pass from that checkpoint (the pivot's sampling options and n), judged like the
    rest; then the quadruples WRPO trains on, y_wt / y_l = best / worst of the checkpoint's samples (its path is their
    model name and the pair stage's pivot). The checkpoint samples every prompt, not only the PO two thirds: judge and
    pair join samples to one prompts output, which the sources' samples already fix; the SFT third's rows are unused.
    Returns ({"wrpo_first_pass", "sft_wrpo", "wrpo"}: data directories, the sft_wrpo checkpoint, its samples)."""
    data, logs = dirs
    first = pair(cfg, "wrpo", judged, prompts, dirs, timings, label="pair/wrpo_first_pass")
    sft_rows = wrpo_sft_rows(first, data)
    checkpoint = train("sft_wrpo", run, cfg, cfg["pivot"], sft_rows, logs, timings)
    samples = sample_model(cfg, str(checkpoint), prompts, dirs, timings, pivot=True, label="sample/sft_wrpo")
    judged_own = _one(judge_samples([samples], prompts, cfg.get("judge", {}), dirs, timings, "judge/sft_wrpo"),
                      "judge")
    final = pair(cfg, "wrpo", [*judged, judged_own], prompts, dirs, timings, pivot=str(checkpoint))
    return {"wrpo_first_pass": first, "sft_wrpo": sft_rows, "wrpo": final}, checkpoint, samples


DEFAULT_EVAL_BENCHMARKS = ("gsm8k:test:30", "arithmetic:test:40", "humaneval:test:10")


@dataclass(kw_only=True)
class EvaluateOptions(ModelEvalOptions):
    """`infifpo eval --model M --benchmarks SPEC ...`: one model evaluated by the stages composed through files
    (``evaluate_model``). The pipeline's ``eval`` section takes the same keys but model, label and out."""

    benchmarks: list[str | dict[str, Any]] = field(default_factory=lambda: list(DEFAULT_EVAL_BENCHMARKS), metadata={
        "help": "prompt source specs, one per benchmark (`infifpo prompts --source`): gsm8k:test:N arithmetic:test:N "
                "humaneval:test:N jsonl:PATH ..., or a JSON object with the keys of a config mapping"})
    backend: Literal["vllm", "transformers"] = field(default="vllm", metadata={"help": "generation engine"})
    max_tokens: int = field(default=256, metadata={"help": "new tokens per completion"})
    seed: int = field(default=0, metadata={"help": "seed of the benchmark subsets (and of generation)"})
    dtype: str | None = field(default=None, metadata={"help": "engine dtype (bfloat16 | float32 | auto)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "vLLM context length (prompt + completion tokens)"})
    device: str | None = field(default=None, metadata={"help": "transformers backend device (cpu | cuda)"})
    code_timeout: float = field(default=10.0, metadata={"help": "wall seconds per sandboxed test run"})
    workers: int = field(default=2, metadata={"help": "judging threads"})

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ConfigError("infifpo eval: benchmarks is empty; give at least one spec, e.g. gsm8k:test:30.")


EVAL_CONFIG_KEYS = [f.name for f in fields(EvaluateOptions) if f.name not in ("model", "label", "out")]


def prompts_stage(sources: list[str | dict[str, Any]], seed: int, dirs: tuple[Path, Path], timings: Timings | None,
                  label: str) -> Path:
    """One `infifpo prompts` process building ``sources`` with ``seed``; returns its output."""
    data, logs = dirs
    opts = {"source": sources, "seed": seed, "out": data}
    return _one(run_stage("prompts", stage_config(logs, label, opts), logs, timings, label), "prompts")


def judge_samples(samples: list[Path], prompts: Path, options: dict[str, Any], dirs: tuple[Path, Path],
                  timings: Timings | None, label: str | None = None) -> list[Path]:
    """One `infifpo judge` process over ``samples`` drawn from ``prompts``, with ``options`` (the stage's own option
    names); returns the judged outputs, one per samples output."""
    data, logs = dirs
    label = label or "judge"
    opts = {"samples": samples, "prompts": prompts, "out": data, **options}
    return run_stage("judge", stage_config(logs, label, opts), logs, timings, label)


def eval_prompts(specs: list[str | dict[str, Any]], seed: int, dirs: tuple[Path, Path],
                 timings: Timings | None) -> tuple[Path, list[Path]]:
    """The eval's prompts through `infifpo prompts`: (the output of every spec, which is sampled and judged; one output
    per spec, the benchmarks `infifpo eval` counts). With one spec both are the same output. The benchmarks are
    checked (``eval.stage.read_benchmarks``: verifiable items, each benchmark once) before any model is loaded."""
    benchmarks = [prompts_stage([s], seed, dirs, timings, f"prompts/eval/{_spec_label(s)}") for s in specs]
    read_benchmarks(benchmarks)
    union = benchmarks[0] if len(specs) == 1 else prompts_stage(specs, seed, dirs, timings, "prompts/eval")
    return union, benchmarks


def evaluate_model(opts: EvaluateOptions, prompts: Path, benchmarks: list[Path], dirs: tuple[Path, Path],
                   timings: Timings | None, label: str | None = None) -> Path:
    """`infifpo eval` of ``opts.model`` composed from the stages (``eval_prompts`` gives ``prompts`` and
    ``benchmarks``), each in its own process, resumable and content-addressed: greedy `infifpo sample` (n 1,
    temperature 0, top-p 1, the eval's max_tokens, seed and engine; model column ``eval-<model basename>``),
    `infifpo judge` (verifiers only), then the `infifpo eval` summary. Returns the eval output; timings
    ``eval/<label>/sample``, ``eval/<label>/judge`` and ``eval/<label>`` (``label``: default the output's)."""
    data, logs = dirs
    label = label or opts.output_label()
    greedy = {"name": f"eval-{safe_label(Path(opts.model).name)}", "n": 1, "temperature": 0.0, "top_p": 1.0,
              "max_tokens": opts.max_tokens, "seed": opts.seed, "dtype": opts.dtype,
              "max_model_len": opts.max_model_len, "engine_arg": [f"device={opts.device}"] if opts.device else None}
    samples = sample_model({"backend": opts.backend, "sample": greedy}, opts.model, prompts, dirs, timings,
                           pivot=False, label=f"eval/{label}/sample")
    judged = _one(judge_samples([samples], prompts, {"code_timeout": opts.code_timeout, "workers": opts.workers},
                                dirs, timings, f"eval/{label}/judge"), "judge")
    summary = {"samples": samples, "judged": judged, "prompts": benchmarks, "model": opts.model,
               "label": opts.output_label(), "out": data, "lm_eval": opts.lm_eval or None,
               "lm_eval_limit": opts.lm_eval_limit, "lm_eval_include_path": opts.lm_eval_include_path or None}
    return _one(run_stage("eval", stage_config(logs, f"eval/{label}", summary), logs, timings, f"eval/{label}",
                          opts.model), "eval")


def evaluate(cfg: dict[str, Any], rows: dict[str, str], dirs: tuple[Path, Path], timings: Timings) -> dict[str, Path]:
    """`infifpo eval` of every report row (label -> model or checkpoint), composed from the stages
    (``evaluate_model``) on one set of eval prompts; {} when the config has no ``eval``. Its keys are those of
    ``EvaluateOptions`` but model, label and out (ConfigError with a did-you-mean else); backend defaults to the
    config's."""
    ecfg = dict(cfg.get("eval") or {})
    if not ecfg:
        return {}
    check_keys(ecfg, EVAL_CONFIG_KEYS, "the config's eval section", "Keys are the options of `infifpo eval --help` "
               "but model, label and out.")
    ecfg.setdefault("backend", cfg.get("backend", "transformers"))
    options = {label: EvaluateOptions(model=model, label=label.replace(":", "-"), out=str(dirs[0]), **ecfg)
               for label, model in rows.items()}
    first = next(iter(options.values()))
    prompts, benchmarks = eval_prompts(first.benchmarks, first.seed, dirs, timings)
    return {label: evaluate_model(opts, prompts, benchmarks, dirs, timings, label) for label, opts in options.items()}


def grid_label(method: str, point: dict[str, Any]) -> str:
    """A grid point's run label: "grid/dpo/learning_rate=5e-06,beta=0.1"."""
    return f"grid/{method}/" + ",".join(f"{k}={v}" for k, v in point.items())


def dev_accuracy(eval_dir: Path) -> dict[str, Any]:
    """Pooled greedy accuracy (%) over every dev benchmark of one eval output: {"dev_accuracy", "dev_correct",
    "dev_n"}."""
    benchmarks = json.loads((Path(eval_dir) / "scores.json").read_text())["benchmarks"].values()
    correct, n = sum(b["correct"] for b in benchmarks), sum(b["n"] for b in benchmarks)
    return {"dev_accuracy": 100.0 * correct / n if n else 0.0, "dev_correct": correct, "dev_n": n}


def select_on_dev(cfg: dict[str, Any], runs: dict[str, dict[str, Any]], bases: dict[str, tuple[str, Path]],
                  prompts: Path, dirs: tuple[Path, Path], timings: Timings) -> dict[str, Any]:
    """Every method's ``train.grid`` points trained with the first seed from the method's base (``bases``: {method:
    (model, dataset)}) and evaluated greedily on the dev split (``dev_specs``: held out from ``prompts``, never the
    test items); the point with the highest pooled dev accuracy is chosen (ties: the first in grid order). Returns
    {} without a grid, else {"dev": specs, "methods": {method: {"chosen": point, "chosen_label", "points": [{"label",
    "overrides", "checkpoint", "eval", "dev_accuracy", "dev_correct", "dev_n"}]}}}. ConfigError when a dev prompt
    is one of the run's own."""
    grid = grid_of(cfg)
    if not grid:
        return {}
    data, logs = dirs
    specs = dev_specs(cfg)
    dev_prompts, benchmarks = eval_prompts(specs, cfg["prompts"].get("seed", 0), dirs, timings)
    shared = {r["id"] for r in read_output(dev_prompts)} & {r["id"] for r in read_output(prompts)}
    if shared:  # offsets make this impossible for the named sources; a user file may hold duplicates
        raise ConfigError(f"train.grid: {len(shared)} dev prompt(s) are also the run's own prompts (e.g. "
                          f"{sorted(shared)[0]!r}); the dev split must be held out.")
    ecfg = {k: v for k, v in (cfg.get("eval") or {}).items() if k != "benchmarks"}
    ecfg.setdefault("backend", cfg.get("backend", "transformers"))
    out: dict[str, Any] = {"dev": specs, "methods": {}}
    for method, points in grid.items():
        model, dataset = bases[method]
        tried = []
        for point in points:
            label = grid_label(method, point)
            checkpoint = train(label, {**runs[method], "overrides": point}, cfg, model, dataset, logs, timings)
            opts = EvaluateOptions(model=str(checkpoint), label=safe_label(label), out=str(data), **ecfg)
            evaluated = evaluate_model(opts, dev_prompts, benchmarks, dirs, timings, label)
            tried.append({"label": label, "overrides": point, "checkpoint": checkpoint, "eval": evaluated,
                          **dev_accuracy(evaluated)})
            logger.info("grid %s: dev accuracy %.1f %% (%d/%d)", label, tried[-1]["dev_accuracy"],
                        tried[-1]["dev_correct"], tried[-1]["dev_n"])
        best = max(tried, key=lambda t: t["dev_accuracy"])  # max keeps the first of equals
        out["methods"][method] = {"chosen": best["overrides"], "chosen_label": best["label"], "points": tried}
        logger.info("grid %s: chose %s (dev %.1f %%)", method, best["overrides"], best["dev_accuracy"])
    return out


def apply_grid(runs: dict[str, dict[str, Any]], grid: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``runs`` with each gridded method's chosen values under its runs' own overrides (an ablation arm starts from
    InfiFPO's chosen values and changes what it names)."""
    chosen = {m: g["chosen"] for m, g in (grid.get("methods") or {}).items()}
    return {label: {**spec, "overrides": {**chosen.get(spec["method"], {}), **spec["overrides"]}}
            for label, spec in runs.items()}


def add_selectors(cfg: dict[str, Any], runs: dict[str, dict[str, Any]], scored: Path, dirs: tuple[Path, Path],
                  timings: Timings) -> dict[str, dict[str, Any]]:
    """``runs`` with ``selector_path`` set for every InfiFPO run whose fusion is ``learned`` and that names none: the
    ASN selector of its options (`infifpo selector` on the scored pairs, with the run's length_normalize, clip,
    include_pivot and seed; docs/methods.md §ASN), one stage process per run (content-addressed: equal options share
    one output). Timings ``selector/<label>``."""
    data, logs = dirs
    tcfg = cfg.get("train") or {}
    packaged = yaml.safe_load(packaged_config("infifpo").read_text()) or {}
    out = {}
    for label, spec in runs.items():
        opts = {**packaged, **tcfg.get("common", {}), **tcfg.get("infifpo", {}), **spec["overrides"]}
        if spec["method"] != "infifpo" or opts.get("fusion_method") != "learned" or opts.get("selector_path"):
            out[label] = spec
            continue
        selector = {"scored": scored, "out": data, "seed": spec["seed"],
                    "length_normalize": opts.get("length_normalize", True), "clip": opts.get("clip", True),
                    "include_pivot": bool(opts.get("include_pivot") or False)}
        path = _one(run_stage("selector", stage_config(logs, f"selector/{label}", selector), logs, timings,
                              f"selector/{label}"), "selector")
        out[label] = {**spec, "overrides": {**spec["overrides"], "selector_path": str(path)}}
    return out


def sample_model(cfg: dict[str, Any], model: str, prompts: Path, dirs: tuple[Path, Path], timings: Timings, *,
                 pivot: bool, label: str | None = None) -> Path:
    """One `infifpo sample` process: ``sample`` options under ``sample.pivot`` or ``sample.sources``."""
    data, logs = dirs
    s = cfg.get("sample", {})
    common = {k: v for k, v in s.items() if k not in ("pivot", "sources")}
    label = label or f"sample/{model}"
    opts = {"prompts": prompts, "model": model, "backend": cfg.get("backend", "transformers"), "out": data, **common,
            **s.get("pivot" if pivot else "sources", {}), "pivot": pivot}
    return _one(run_stage("sample", stage_config(logs, label, opts), logs, timings, label, model), "sample")


def sample_all(cfg: dict[str, Any], prompts: Path, dirs: tuple[Path, Path], timings: Timings) -> dict[str, Path]:
    """One `infifpo sample` process per model of the pool (pivot first), each with its own n."""
    return {m: sample_model(cfg, m, prompts, dirs, timings, pivot=m == cfg["pivot"])
            for m in [cfg["pivot"], *cfg["sources"]]}


OUTPUTS_FILE = "pipeline_outputs.json"
PATH_KEYS = ("prompts", "samples", "judged", "pairs", "scored", "checkpoints", "evals", "grid_checkpoints",
             "grid_evals")  # what holds output paths


def _map_paths(value: Any, fn: Any) -> Any:
    if isinstance(value, dict):
        return {k: _map_paths(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_paths(v, fn) for v in value]
    return fn(value)


def relative_outputs(result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``result`` with every output path under ``run_dir`` made relative to it (the file stays valid when the run
    directory moves); model references and paths elsewhere are kept as they are."""
    root = Path(run_dir).resolve()

    def rel(p: Any) -> Any:
        path = Path(p).resolve()
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(p)

    return {k: _map_paths(v, rel) if k in PATH_KEYS else v for k, v in result.items()}


def load_outputs(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``<run_dir>/pipeline_outputs.json`` with its output paths resolved against ``run_dir`` (absolute paths)."""
    root = Path(run_dir).resolve()
    out = json.loads((root / OUTPUTS_FILE).read_text())
    return {k: _map_paths(v, lambda p: str(root / p)) if k in PATH_KEYS else v for k, v in out.items()}


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run every stage of ``cfg``; returns the output paths by stage (also written to pipeline_outputs.json)."""
    run_dir = Path(cfg["run_dir"])
    dirs = data, logs = run_dir / "data", run_dir / "logs"
    timings = Timings(run_dir / "timings.json")
    pivot, sources = cfg["pivot"], list(cfg["sources"])
    runs = planned_runs(cfg)
    if any("merge" in r for r in runs.values()) and importlib.util.find_spec("mergekit") is None:
        raise ConfigError("train.ablations has a pairwise arm, whose merge runs on mergekit, which is not installed: "
                          "`pip install 'infifpo[merge]'`, or drop the arm.")  # before hours of stages, not after
    p = cfg["prompts"]
    prompts = prompts_stage(p["sources"], p.get("seed", 0), dirs, timings, "prompts")
    samples = sample_all(cfg, prompts, dirs, timings)
    judged = judge_samples(list(samples.values()), prompts, cfg.get("judge", {}), dirs, timings, "judge")
    pairs = {"infifpo": pair(cfg, "infifpo", judged, prompts, dirs, timings)}
    checkpoints = {"sft": train("sft", runs["sft"], cfg, pivot, pairs["infifpo"], logs, timings)}
    if "sft_wrpo" in runs:
        wrpo_data, checkpoint, own_samples = wrpo_pairs(cfg, prompts, judged, dirs, timings, runs["sft_wrpo"])
        pairs.update(wrpo_data)
        checkpoints["sft_wrpo"], samples[str(checkpoint)] = checkpoint, own_samples
    score_opts = {"pairs": pairs["infifpo"], "pivot": checkpoints["sft"], "sources": sources, "out": data,
                  "backend": cfg.get("backend", "transformers"), **cfg.get("score", {})}
    scored = _one(run_stage("score", stage_config(logs, "score", score_opts), logs, timings), "score")
    # WRPO: its own quadruples and SFT, a live frozen reference (official setting)
    bases = {m: (str(checkpoints["sft_wrpo"]), pairs["wrpo"]) if m == "wrpo" else (str(checkpoints["sft"]), scored)
             for m in methods_of(cfg)}
    grid = select_on_dev(cfg, runs, bases, prompts, dirs, timings)
    runs = add_selectors(cfg, apply_grid(runs, grid), scored, dirs, timings)
    for method, g in (grid.get("methods") or {}).items():  # the chosen point is the first seed's run itself
        checkpoints[method] = next(p["checkpoint"] for p in g["points"] if p["label"] == g["chosen_label"])
    for label, spec in runs.items():
        if label in checkpoints:
            continue
        if "merge" in spec:  # a pairwise arm: its component runs are planned (and trained) before it
            checkpoints[label] = merge(label, spec, cfg, checkpoints, logs, timings)
            continue
        checkpoints[label] = train(label, spec, cfg, *bases[spec["method"]], logs, timings)
    rows = {"pivot": pivot, **{f"source:{m}": m for m in sources},
            **{k: str(v) for k, v in checkpoints.items() if "component_of" not in runs.get(k, {})}}
    evals = evaluate(cfg, rows, dirs, timings)
    result = {"name": cfg["name"], "run_dir": str(run_dir), "config": cfg, "pivot": pivot, "sources": sources,
              "prompts": prompts, "samples": samples, "judged": judged, "pairs": pairs, "scored": scored,
              "checkpoints": checkpoints, "evals": evals, "runs": runs, "timings": timings.summary()}
    if grid:  # paths apart (PATH_KEYS), so the rest stays plain values
        points = [p for g in grid["methods"].values() for p in g["points"]]
        result["grid_checkpoints"] = {p["label"]: p["checkpoint"] for p in points}
        result["grid_evals"] = {p["label"]: p["eval"] for p in points}
        result["grid"] = {"dev": grid["dev"], "methods": {
            m: {**g, "points": [{k: v for k, v in p.items() if k not in ("checkpoint", "eval")} for p in g["points"]]}
            for m, g in grid["methods"].items()}}
    atomic_write(run_dir / OUTPUTS_FILE, json.dumps(relative_outputs(result, run_dir), indent=1, default=str))
    if cfg.get("report", True):
        run_stage("report", stage_config(logs, "report", {"run_dir": run_dir}), logs)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="infifpo pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="pipeline YAML (see configs/tiny.yaml)")
    ap.add_argument("--run-dir", help="override the config's run_dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    if args.run_dir:
        cfg["run_dir"] = args.run_dir
    start = time.time()
    result = run(cfg)
    print(json.dumps(result, indent=1, default=str))
    print(f"pipeline {cfg['name']} finished in {time.time() - start:.0f} s; outputs under {cfg['run_dir']}")
    return 0
