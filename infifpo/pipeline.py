"""`infifpo pipeline --config FILE` (what `make fpo` runs): every stage in order, each as its own `infifpo <stage>`
process, so vLLM engines and training never share memory or an import graph.

Order: prompts → sample (pivot, then each source) → judge → pair (the InfiFPO recipe; the WRPO recipe too when
``wrpo`` is a method) → SFT on the SFT split → score (the SFT checkpoint as the frozen pivot, each source with its
own tokenizer/template, PO rows only) → preference training of each configured method from the SFT checkpoint →
eval of every report row (pivot, sources, SFT, each method) → report. Stages are content-addressed and resumable
(``infifpo.store``), so a re-run skips finished work; a training run is skipped when its output directory holds the
completion marker written here. Wall time per stage is kept in ``<run_dir>/timings.json``.
Owns: the ordering and the hand-off of output paths (``<run_dir>/pipeline_outputs.json``). Does not own: any
stage's logic.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from infifpo.schema import ConfigError
from infifpo.store import SUCCESS, fingerprint

logger = logging.getLogger("infifpo.pipeline")
TRAIN_DONE = "infifpo_train_done.json"
TOP_KEYS = {"name", "run_dir", "pivot", "sources", "backend", "prompts", "sample", "judge", "pair", "score", "train",
            "eval", "report"}


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The pipeline YAML as a dict; unknown top-level keys are a ConfigError with a did-you-mean."""
    import difflib

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    for key in cfg:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(key, TOP_KEYS, n=1)
            raise ConfigError(f"{path}: unknown key {key!r}." + (f" Did you mean {close[0]!r}?" if close else ""))
    for key in ("pivot", "sources", "prompts"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing required key {key!r}")
    cfg.setdefault("name", Path(path).stem)
    cfg.setdefault("run_dir", f"runs/{cfg['name']}")
    return cfg


def _flags(options: dict[str, Any]) -> list[str]:
    """{"max_tokens": 64, "pivot": True} -> ["--max-tokens", "64", "--pivot"] (argparse-style stage flags)."""
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (None, False):
            out += [flag, *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    return out


def _source_arg(spec: str | dict[str, Any]) -> str:
    """A config's prompt source as one ``infifpo prompts --source`` value: strings as they are, mappings as JSON."""
    return json.dumps(spec, sort_keys=True) if isinstance(spec, dict) else str(spec)


def _train_flags(options: dict[str, Any]) -> list[str]:
    """TrlParser flags keep underscores: {"learning_rate": 1e-6} -> ["--learning_rate", "1e-06"]."""
    return [x for k, v in options.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


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
    """Run `infifpo <name> args` in a fresh process; return the completed output directories it printed."""
    cmd = [sys.executable, "-m", "infifpo.cli", name, *args]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    logger.info("stage %s: %s", label or name, " ".join(cmd[3:]))
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {name!r} failed (exit {proc.returncode}); see {log_path}")
    seconds = time.time() - start
    logger.info("stage %s done in %.0f s", label or name, seconds)
    outputs = _printed_outputs(proc.stdout)
    if timings is not None:
        timings.record(label or name, name, model, seconds, outputs)
    return outputs


def _printed_outputs(stdout: str) -> list[Path]:
    paths: list[Path] = []
    for line in stdout.splitlines():
        line = line.strip()
        try:
            value = json.loads(line) if line.startswith("{") else None
        except json.JSONDecodeError:
            value = None
        for cand in (value.values() if isinstance(value, dict) else [line]):
            p = Path(str(cand))
            try:
                done = (p / SUCCESS).exists()
            except OSError:  # a log line, not a path (too long for a file name)
                done = False
            if done and p not in paths:
                paths.append(p)
    return paths


def _one(paths: list[Path], stage: str) -> Path:
    if len(paths) != 1:
        raise RuntimeError(f"stage {stage!r} printed {len(paths)} output directories, expected one: {paths}")
    return paths[0]


def train(method: str, cfg: dict[str, Any], model: str, dataset: Path, log_dir: Path, timings: Timings) -> Path:
    """Train one method unless an identical run already finished; returns its output directory."""
    tcfg = cfg.get("train", {})
    overrides = {**tcfg.get("common", {}), **tcfg.get(method, {})}
    config_file = overrides.pop("config", f"configs/train/{method}.yaml")
    key = {"method": method, "model": model, "dataset": str(dataset), "config": Path(config_file).read_text(),
           "overrides": overrides}
    out = Path(cfg["run_dir"]) / "checkpoints" / f"{method}-{fingerprint(key)}"
    if (out / TRAIN_DONE).exists():
        logger.info("train %s: already done in %s", method, out)
        return out
    args = ["--method", method, "--config", config_file, "--model_name_or_path", model,
            "--dataset_name", str(dataset), "--output_dir", str(out), *_train_flags(overrides)]
    start = time.time()
    run_stage("train", args, log_dir, label=f"train/{method}")
    timings.record(f"train/{method}", "train", model, time.time() - start, [out])
    (out / TRAIN_DONE).write_text(json.dumps(key, indent=1))
    return out


def pair(cfg: dict[str, Any], recipe: str, judged: list[Path], prompts: Path, dirs: tuple[Path, Path],
         timings: Timings) -> Path:
    """The pairs of one recipe (same judged samples, split and seed for every recipe)."""
    data, logs = dirs
    opts = {**cfg.get("pair", {}), "recipe": recipe}
    args = ["--judged", *map(str, judged), "--prompts", str(prompts), "--pivot", cfg["pivot"], "--out", str(data),
            *_flags(opts)]
    return _one(run_stage("pair", args, logs, timings, f"pair/{recipe}"), "pair")


def evaluate(cfg: dict[str, Any], rows: dict[str, str], dirs: tuple[Path, Path], timings: Timings) -> dict[str, Path]:
    """`infifpo eval` of every report row (label -> model or checkpoint); {} when the config has no ``eval``."""
    ecfg = dict(cfg.get("eval") or {})
    if not ecfg:
        return {}
    data, logs = dirs
    benchmarks = ecfg.pop("benchmarks")
    ecfg.setdefault("backend", cfg.get("backend", "transformers"))
    out = {}
    for label, model in rows.items():
        args = ["--model", model, "--label", label.replace(":", "-"), "--benchmarks", *benchmarks,
                "--out", str(data), *_flags(ecfg)]
        out[label] = _one(run_stage("eval", args, logs, timings, f"eval/{label}", model), "eval")
    return out


def sample_all(cfg: dict[str, Any], prompts: Path, dirs: tuple[Path, Path], timings: Timings) -> dict[str, Path]:
    """One `infifpo sample` process per model of the pool (pivot first), each with its own n."""
    data, logs = dirs
    s = cfg.get("sample", {})
    common = {k: v for k, v in s.items() if k not in ("pivot", "sources")}
    samples = {}
    for model in [cfg["pivot"], *cfg["sources"]]:
        is_pivot = model == cfg["pivot"]
        opts = {**common, **s.get("pivot" if is_pivot else "sources", {}), "pivot": is_pivot}
        args = ["--prompts", str(prompts), "--model", model, "--backend", cfg.get("backend", "transformers"),
                "--out", str(data), *_flags(opts)]
        samples[model] = _one(run_stage("sample", args, logs, timings, f"sample/{model}", model), "sample")
    return samples


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run every stage of ``cfg``; returns the output paths by stage (also written to pipeline_outputs.json)."""
    run_dir = Path(cfg["run_dir"])
    dirs = data, logs = run_dir / "data", run_dir / "logs"
    timings = Timings(run_dir / "timings.json")
    pivot, sources = cfg["pivot"], list(cfg["sources"])
    methods = list(cfg.get("train", {}).get("methods", ["dpo", "infifpo"]))
    p = cfg["prompts"]
    prompts = _one(run_stage("prompts", [*[x for s in p["sources"] for x in ("--source", _source_arg(s))],
                                         "--seed", str(p.get("seed", 0)), "--out", str(data)], logs, timings),
                   "prompts")
    samples = sample_all(cfg, prompts, dirs, timings)
    judged = run_stage("judge", ["--samples", *map(str, samples.values()), "--prompts", str(prompts),
                                 "--out", str(data), *_flags(cfg.get("judge", {}))], logs, timings)
    pairs = {recipe: pair(cfg, recipe, judged, prompts, dirs, timings)
             for recipe in ["infifpo", *(["wrpo"] if "wrpo" in methods else [])]}
    checkpoints = {"sft": train("sft", cfg, pivot, pairs["infifpo"], logs, timings)}
    score_opts = {"backend": cfg.get("backend", "transformers"), **cfg.get("score", {})}
    scored = _one(run_stage("score", ["--pairs", str(pairs["infifpo"]), "--pivot", str(checkpoints["sft"]),
                                      "--sources", *sources, "--out", str(data), *_flags(score_opts)], logs, timings),
                  "score")
    for method in methods:  # WRPO trains on its own quadruples with a live frozen reference (the official setting)
        dataset = pairs["wrpo"] if method == "wrpo" else scored
        checkpoints[method] = train(method, cfg, str(checkpoints["sft"]), dataset, logs, timings)
    rows = {"pivot": pivot, **{f"source:{m}": m for m in sources}, **{k: str(v) for k, v in checkpoints.items()}}
    evals = evaluate(cfg, rows, dirs, timings)
    result = {"name": cfg["name"], "run_dir": str(run_dir), "config": cfg, "pivot": pivot, "sources": sources,
              "prompts": prompts, "samples": samples, "judged": judged, "pairs": pairs, "scored": scored,
              "checkpoints": checkpoints, "evals": evals, "timings": timings.summary()}
    (run_dir / "pipeline_outputs.json").write_text(json.dumps(result, indent=1, default=str))
    if cfg.get("report", True):
        run_stage("report", ["--run-dir", str(run_dir)], logs)
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
