"""`infifpo pipeline --config FILE` (what `make fpo` runs): every stage in order, each as its own `infifpo <stage>`
process, so vLLM engines and training never share memory or an import graph.

Order: prompts → sample (pivot, then each source) → judge → pair → SFT on the SFT split → score (the SFT checkpoint
as the frozen pivot, each source with its own tokenizer/template) → preference training of each configured method
from the SFT checkpoint. Stages are content-addressed and resumable (``infifpo.store``), so a re-run skips finished
work; a training run is skipped when its output directory holds the completion marker written here.
Owns: the ordering and the hand-off of output paths. Does not own: any stage's logic. Evaluation and the report are
not part of it yet (issue 7).
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
TOP_KEYS = {"name", "run_dir", "pivot", "sources", "backend", "prompts", "sample", "judge", "pair", "score", "train"}


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


def _train_flags(options: dict[str, Any]) -> list[str]:
    """TrlParser flags keep underscores: {"learning_rate": 1e-6} -> ["--learning_rate", "1e-06"]."""
    return [x for k, v in options.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def run_stage(name: str, args: list[str], log_dir: Path) -> list[Path]:
    """Run `infifpo <name> args` in a fresh process; return the completed output directories it printed."""
    cmd = [sys.executable, "-m", "infifpo.cli", name, *args]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    logger.info("stage %s: %s", name, " ".join(cmd[3:]))
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {name!r} failed (exit {proc.returncode}); see {log_path}")
    logger.info("stage %s done in %.0f s", name, time.time() - start)
    return _printed_outputs(proc.stdout)


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


def train(method: str, cfg: dict[str, Any], model: str, dataset: Path, log_dir: Path) -> Path:
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
    run_stage("train", args, log_dir)
    (out / TRAIN_DONE).write_text(json.dumps(key, indent=1))
    return out


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run every stage of ``cfg``; returns the output paths by stage."""
    run_dir = Path(cfg["run_dir"])
    data, logs = run_dir / "data", run_dir / "logs"
    backend = cfg.get("backend", "transformers")
    pivot, sources = cfg["pivot"], list(cfg["sources"])
    p = cfg["prompts"]
    prompts = _one(run_stage("prompts", [*[x for s in p["sources"] for x in ("--source", s)],
                                         "--seed", str(p.get("seed", 0)), "--out", str(data)], logs), "prompts")
    s = cfg.get("sample", {})
    common = {k: v for k, v in s.items() if k not in ("pivot", "sources")}
    samples = []
    for model in [pivot, *sources]:
        opts = {**common, **s.get("pivot" if model == pivot else "sources", {}), "pivot": model == pivot}
        samples.append(_one(run_stage("sample", ["--prompts", str(prompts), "--model", model, "--backend", backend,
                                                 "--out", str(data), *_flags(opts)], logs), "sample"))
    judged = run_stage("judge", ["--samples", *map(str, samples), "--prompts", str(prompts), "--out", str(data),
                                 *_flags(cfg.get("judge", {}))], logs)
    pair_opts = cfg.get("pair", {})
    pairs = _one(run_stage("pair", ["--judged", *map(str, judged), "--prompts", str(prompts), "--pivot", pivot,
                                    "--out", str(data), *_flags({"recipe": "infifpo", **pair_opts})], logs), "pair")
    sft = train("sft", cfg, pivot, pairs, logs)
    score_opts = {"backend": backend, **cfg.get("score", {})}
    scored = _one(run_stage("score", ["--pairs", str(pairs), "--pivot", str(sft), "--sources", *sources,
                                      "--out", str(data), *_flags(score_opts)], logs), "score")
    checkpoints = {"sft": sft}
    for method in cfg.get("train", {}).get("methods", ["dpo", "infifpo"]):
        checkpoints[method] = train(method, cfg, str(sft), scored, logs)
    result = {"prompts": prompts, "samples": samples, "judged": judged, "pairs": pairs, "scored": scored,
              "checkpoints": checkpoints}
    (run_dir / "pipeline_outputs.json").write_text(json.dumps(result, indent=1, default=str))
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
