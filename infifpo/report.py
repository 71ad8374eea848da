"""`infifpo report --run-dir runs/<name>`: the paper-style results table, cost accounting and training plots of a run.

Reads ``<run_dir>/pipeline_outputs.json`` and the files it points to (CONTRACTS §1-4: train logs, score_stats.json,
eval scores.json and per-item rows, sample rows); writes ``report.md``, ``report.json`` and ``plots/*.png`` in the
run directory. Owns: the table layout (InfiFPO paper Table 2: rows pivot, sources, SFT, SFT-DPO, SFT-WRPO, InfiFPO;
columns benchmarks, Avg, size, compute hours), the InfiFPO-vs-baselines comparison (paired bootstrap over items),
and the fusion-overhead ratio. Does not own: computing any score (`eval`) or timing (`pipeline`), or plotting
(`plots`). A missing input renders as "—" with a note naming the stage to re-run; a corrupt one is a named error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from infifpo import plots
from infifpo.eval.stats import mean_of_groups_bootstrap_ci, paired_bootstrap
from infifpo.report_markdown import DASH, render_markdown
from infifpo.schema import DataFormatError, InfiFPOError
from infifpo.store import SUCCESS, StoreError, read_output

logger = logging.getLogger("infifpo.report")
TRAIN_LOG = "infifpo_train_log.json"
METHODS = {"sft": "SFT", "dpo": "SFT-DPO", "wrpo": "SFT-WRPO", "infifpo": "InfiFPO"}
# Training-side wall time a trained row paid (timings labels); InfiFPO also pays scoring every response once.
COMPUTE_LABELS = {"sft": ["train/sft"], "dpo": ["train/sft", "train/dpo"], "wrpo": ["train/sft", "train/wrpo"],
                  "infifpo": ["train/sft", "score", "train/infifpo"]}
OVERHEAD_TARGET = 1.5  # issue 7: InfiFPO's whole cost at most 1.5x SFT-DPO's training with a live reference
PRECISION = {"bfloat16": "bf16", "bf16": "bf16", "float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16"}


# -- inputs ---------------------------------------------------------------------------------------------------------
def read_json(path: Path, stage: str, *, required: bool = False) -> dict[str, Any] | None:
    """A JSON object file; None when absent and not ``required``; StoreError naming the file and ``stage`` else."""
    if not path.is_file():
        if required:
            raise StoreError(f"{path}: missing. Re-run {stage} to write it.")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: corrupt JSON ({e}). Re-run {stage} to rewrite it.") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: expected a JSON object, got {type(data).__name__}. Re-run {stage} to rewrite it.")
    return data


class Run:
    """``pipeline_outputs.json`` of a run, with its (cwd-relative) paths resolved, and the notes on missing inputs."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.file = self.run_dir / "pipeline_outputs.json"
        self.out = read_json(self.file, "the pipeline (`infifpo pipeline --config FILE`)", required=True)
        for key, kind in (("pivot", str), ("sources", list)):
            if not isinstance(self.out.get(key), kind):
                raise DataFormatError(f"{self.file}: key {key!r} missing or not a {kind.__name__}. Re-run the "
                                      "pipeline (`infifpo pipeline --config FILE`) to rewrite it.")
        for key in ("checkpoints", "evals", "timings", "samples"):
            if not isinstance(self.out.setdefault(key, {}), dict):
                raise DataFormatError(f"{self.file}: key {key!r} must be an object. Re-run the pipeline.")
        bad = [k for k, v in self.out["timings"].items() if not isinstance((v or {}).get("seconds"), int | float)]
        if bad:
            raise DataFormatError(f"{self.file}: timings {bad[:3]} lack numeric 'seconds'. Re-run the pipeline.")
        # pipeline paths are relative to the directory it ran in: the recorded run_dir's parent, seen from here
        recorded, here = Path(self.out.get("run_dir") or self.run_dir), self.run_dir.resolve()
        up = len(recorded.parts)
        self.base = here.parents[up - 1] if not recorded.is_absolute() and 0 < up <= len(here.parents) else Path.cwd()
        self.notes: list[str] = []

    def path(self, p: str) -> Path:
        """A path as recorded by the pipeline (relative to where it ran), found from wherever the report runs."""
        p = Path(p)
        return p if p.is_absolute() or p.exists() else self.base / p


def short_name(model: str) -> str:
    """The last path component of a model name or path ("HuggingFaceTB/SmolLM2-135M" -> "SmolLM2-135M")."""
    return Path(str(model).rstrip("/")).name or str(model)


def format_params(n: int | None) -> str:
    """A parameter count as the paper writes it: 134515008 -> "135M", 14.7e9 -> "14.7B"."""
    if not n:
        return DASH
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


# -- results table --------------------------------------------------------------------------------------------------
def _row_specs(run: Run) -> list[dict[str, Any]]:
    pivot, ckpts = run.out["pivot"], run.out["checkpoints"]
    rows = [{"key": "pivot", "name": f"{short_name(pivot)} (pivot)", "kind": "pivot", "model": pivot}]
    rows += [{"key": f"source:{m}", "name": f"{short_name(m)} (source)", "kind": "source", "model": m}
             for m in run.out["sources"]]
    return rows + [{"key": k, "name": name, "kind": "trained", "model": ckpts[k]} for k, name in METHODS.items()
                   if k in ckpts]


def _load_scores(run: Run, key: str) -> dict[str, Any] | None:
    stage = f"`infifpo eval` (pipeline stage eval/{key})"
    d = run.out["evals"].get(key)
    scores = read_json(run.path(d) / "scores.json", stage) if d else None
    if scores is None:
        run.notes.append(f"no eval for row {key!r}" + (f" ({d}/scores.json missing)" if d else "") + f": re-run {stage}.")
        return None
    bench = scores.get("benchmarks")
    if not isinstance(bench, dict) or any(not isinstance(b, dict) or "accuracy" not in b or len(b.get("ci95") or ()) != 2
                                          for b in bench.values()):
        raise DataFormatError(f"{run.path(d) / 'scores.json'}: 'benchmarks' must map each benchmark to an object with "
                              f"'accuracy' and 'ci95' (CONTRACTS §3). Re-run {stage}.")
    return scores


def build_table(run: Run) -> dict[str, Any]:
    """Rows in paper order with per-benchmark accuracy (%) and Wilson CI, Avg, parameter count and compute hours."""
    rows = _row_specs(run)
    benchmarks: list[str] = []
    for row in rows:
        scores = _load_scores(run, row["key"]) or {}
        row["eval_dir"] = run.out["evals"].get(row["key"]) if scores else None
        row["params"] = scores.get("params")
        row["size"] = format_params(row["params"])
        row["_bench"] = scores.get("benchmarks", {})
        benchmarks += [b for b in row["_bench"] if b not in benchmarks]
    timings = run.out["timings"]
    for row in rows:
        bench = row.pop("_bench")
        row["benchmarks"] = {b: ({k: bench[b].get(k) for k in ("accuracy", "ci95", "n", "correct")} if b in bench
                                 else None) for b in benchmarks}
        accs = [v["accuracy"] for v in row["benchmarks"].values() if v]
        row["avg"] = sum(accs) / len(accs) if accs and len(accs) == len(benchmarks) else None
        labels = COMPUTE_LABELS.get(row["key"]) if row["kind"] == "trained" else None
        have = labels is not None and all(label in timings for label in labels)
        row["compute_seconds"] = sum(float(timings[label]["seconds"]) for label in labels) if have else None
        row["compute_hours"] = row["compute_seconds"] / 3600 if have else None
        if labels and not have:
            run.notes.append(f"compute hours of {row['name']}: timings lack {[x for x in labels if x not in timings]}.")
    return {"benchmarks": benchmarks, "columns": [*benchmarks, "Avg", "Size", "Compute hours"], "rows": rows}


# -- comparisons ----------------------------------------------------------------------------------------------------
def _items(run: Run, row: dict[str, Any]) -> dict[str, dict[str, bool]] | None:
    """benchmark -> {item id: correct} from the eval's per-item rows; None when the rows are not there."""
    d = row["eval_dir"]
    if not d or not (run.path(d) / SUCCESS).exists():
        return None
    out: dict[str, dict[str, bool]] = {}
    for r in _read_rows(run.path(d), f"eval/{row['key']}"):
        out.setdefault(r["benchmark"], {})[r["id"]] = bool(r["correct"])
    return out


def _diff(a: dict[str, Any], b: dict[str, Any], ia: dict | None, ib: dict | None, bench: str) -> dict[str, Any]:
    common = sorted(set(ia.get(bench, {})) & set(ib.get(bench, {}))) if ia and ib else []
    if common:
        diff, lo, hi = paired_bootstrap([ia[bench][i] for i in common], [ib[bench][i] for i in common])
        return {"diff": diff, "ci95": [lo, hi], "n": len(common), "method": "paired bootstrap",
                "distinguishable": lo > 0 or hi < 0, "_d": [float(ia[bench][i]) - float(ib[bench][i]) for i in common]}
    ca, cb = a["benchmarks"][bench]["ci95"], b["benchmarks"][bench]["ci95"]
    return {"diff": a["benchmarks"][bench]["accuracy"] - b["benchmarks"][bench]["accuracy"], "ci95": None,
            "method": "Wilson interval overlap", "distinguishable": ca[0] > cb[1] or cb[0] > ca[1]}


def compare(run: Run, table: dict[str, Any]) -> list[dict[str, Any]]:
    """InfiFPO minus SFT-DPO and minus SFT-WRPO, in accuracy points, on Avg and on each benchmark present in both."""
    rows = {r["key"]: r for r in table["rows"]}
    out = []
    for base in ("dpo", "wrpo"):
        if "infifpo" not in rows or base not in rows:
            continue
        a, b = rows["infifpo"], rows[base]
        cmp: dict[str, Any] = {"method": "InfiFPO", "baseline": b["name"], "benchmarks": {}, "avg": None}
        shared = [k for k in table["benchmarks"] if a["benchmarks"][k] and b["benchmarks"][k]]
        if shared:
            ia, ib = _items(run, a), _items(run, b)
            cmp["benchmarks"] = {k: _diff(a, b, ia, ib, k) for k in shared}
        if a["avg"] is not None and b["avg"] is not None:
            diffs = [c.pop("_d", None) for c in cmp["benchmarks"].values()]
            avg = {"diff": a["avg"] - b["avg"], "ci95": None, "method": "difference of means", "distinguishable": None}
            if all(diffs):
                lo, hi = mean_of_groups_bootstrap_ci(diffs)
                avg.update(ci95=[100 * lo, 100 * hi], method="paired bootstrap (items resampled per benchmark)",
                           distinguishable=lo > 0 or hi < 0)
            cmp["avg"] = avg
        for c in cmp["benchmarks"].values():
            c.pop("_d", None)
        out.append(cmp)
    return out


# -- cost accounting ------------------------------------------------------------------------------------------------
def _read_rows(path: Path, stage: str) -> list[dict[str, Any]]:
    try:
        return read_output(path)
    except InfiFPOError as e:
        raise type(e)(f"{e} (written by pipeline stage {stage}; re-run it)") from None


def tokens_sampled(run: Run) -> dict[str, dict[str, int] | None]:
    """Per sampling model: number of samples and generated tokens (sum of the samples' ``num_tokens``)."""
    out: dict[str, dict[str, int] | None] = {}
    for model, d in run.out["samples"].items():
        if not (run.path(d) / SUCCESS).exists():
            run.notes.append(f"samples of {model} missing or incomplete ({d}): re-run pipeline stage sample/{model}.")
            out[model] = None
            continue
        rows = _read_rows(run.path(d), f"sample/{model}")
        out[model] = {"samples": len(rows), "tokens": sum(int(r.get("num_tokens") or 0) for r in rows)}
    return out


def scoring_costs(run: Run) -> list[dict[str, Any]] | None:
    """score_stats.json's per-model entries plus ``s_per_1k_tokens`` (seconds per 1000 prompt+response tokens)."""
    d, stage = run.out.get("scored"), "`infifpo score` (pipeline stage score)"
    file = run.path(d) / "score_stats.json" if d else None
    stats = read_json(file, stage) if file else None
    if stats is None:
        run.notes.append(f"no score_stats.json{f' in {d}' if d else ''}: re-run {stage} for scoring costs.")
        return None
    models = stats.get("models")
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("seconds"), int | float)
                                               and isinstance(m.get("tokens"), int) for m in models):
        raise DataFormatError(f"{file}: 'models' must be a list of objects with numeric 'seconds' and 'tokens' "
                              f"(CONTRACTS §2). Re-run {stage}.")
    out = []
    for m in models:
        processed = m["tokens"] + int(m.get("prompt_tokens") or 0)
        out.append({**m, "s_per_1k_tokens": 1000 * m["seconds"] / processed if processed else None})
    return out


def train_logs(run: Run) -> dict[str, dict[str, Any]]:
    """method -> its infifpo_train_log.json (CONTRACTS §1), for each configured method whose log exists."""
    logs = {}
    for method, ckpt in ((m, run.out["checkpoints"][m]) for m in METHODS if m in run.out["checkpoints"]):
        file, stage = run.path(ckpt) / TRAIN_LOG, f"pipeline stage train/{method}"
        log = read_json(file, stage)
        if log is None:
            run.notes.append(f"no {TRAIN_LOG} in {ckpt}: re-run {stage} for its costs and curves.")
        elif not isinstance(log.get("log_history"), list) or not isinstance(log.get("train_runtime_s"), int | float):
            raise DataFormatError(f"{file}: needs 'log_history' (list) and 'train_runtime_s' (seconds). Re-run {stage}.")
        else:
            logs[method] = log
    return logs


def fusion_overhead(scoring: list[dict[str, Any]] | None, logs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """InfiFPO's whole cost (scoring pivot + sources, then training) over SFT-DPO's training with a live reference.

    ``ratio`` counts compute only (scoring ``seconds`` + ``train_runtime_s``); ``ratio_with_setup`` adds model loading
    (``load_seconds``) and trainer setup (``setup_s``) on both sides. Seconds are wall seconds as logged.
    """
    fpo, dpo = logs.get("infifpo"), logs.get("dpo")
    if not (scoring and fpo and dpo):
        return None
    scoring_s = sum(m["seconds"] for m in scoring)
    fpo_s, dpo_s = scoring_s + fpo["train_runtime_s"], dpo["train_runtime_s"]
    fpo_all = fpo_s + sum(m.get("load_seconds") or 0.0 for m in scoring) + (fpo.get("setup_s") or 0.0)
    dpo_all = dpo_s + (dpo.get("setup_s") or 0.0)
    where = [{"part": f"scoring {short_name(m['model'])} ({m.get('role', '?')})", "seconds": m["seconds"],
              "share": m["seconds"] / fpo_s, "s_per_1k_tokens": m["s_per_1k_tokens"]} for m in scoring]
    where.append({"part": "InfiFPO training", "seconds": fpo["train_runtime_s"],
                  "share": fpo["train_runtime_s"] / fpo_s, "s_per_1k_tokens": None})
    precision = {"infifpo_training": fpo.get("precision"), "dpo_training": dpo.get("precision"),
                 "scoring": sorted({PRECISION.get(str(m.get("dtype")), str(m.get("dtype"))) for m in scoring})}
    equal = len({precision["infifpo_training"], precision["dpo_training"], *precision["scoring"]}) == 1
    return {"scoring_s": scoring_s, "infifpo_train_s": fpo["train_runtime_s"], "infifpo_total_s": fpo_s,
            "dpo_train_s": dpo_s, "ratio": fpo_s / dpo_s if dpo_s else None, "infifpo_total_with_setup_s": fpo_all,
            "dpo_total_with_setup_s": dpo_all, "ratio_with_setup": fpo_all / dpo_all if dpo_all else None,
            "target": OVERHEAD_TARGET, "precision": precision, "equal_precision": equal, "where": where}


def make_plots(run: Run, logs: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """loss.png, reward_margin.png, fusion_shares.png under <run_dir>/plots; None (and a note) for a missing one."""
    out_dir = run.run_dir / "plots"
    hist = {METHODS[m]: log["log_history"] for m, log in logs.items()}
    made = {
        "loss": plots.plot_metric(hist, "loss", out_dir / "loss.png", title="Training loss", ylabel="loss"),
        "reward_margin": plots.plot_metric({k: v for k, v in hist.items() if k != "SFT"}, "rewards/margins",
                                           out_dir / "reward_margin.png", title="Reward margin (rewards/margins)",
                                           ylabel="β·(margin of log-ratios), nats"),
        "fusion_shares": plots.plot_fusion_shares(logs["infifpo"]["log_history"], out_dir / "fusion_shares.png")
        if "infifpo" in logs else None,
    }
    keys = {"loss": "'loss'", "reward_margin": "'rewards/margins'", "fusion_shares": "'fusion/*_share/<model>'"}
    for name, path in made.items():
        if path is None:
            run.notes.append(f"plot {name} omitted: no {keys[name]} entries in the train logs.")
    return {k: (p.relative_to(run.run_dir).as_posix() if p else None) for k, p in made.items()}


# -- output ---------------------------------------------------------------------------------------------------------
def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Everything report.json holds: the table, the comparisons, the costs, the plot paths and the notes."""
    run = Run(run_dir)
    table = build_table(run)
    logs = train_logs(run)
    scoring = scoring_costs(run)
    timings = [{"label": k, "stage": v.get("stage"), "model": v.get("model"), "seconds": float(v["seconds"])}
               for k, v in run.out["timings"].items()]
    cost = {"timings": timings, "total_s": sum(t["seconds"] for t in timings),
            "tokens_sampled": tokens_sampled(run), "scoring": scoring,
            "training": {m: {k: log.get(k) for k in ("train_runtime_s", "setup_s", "precision", "world_size",
                                                    "num_train_rows", "max_steps")} for m, log in logs.items()},
            "fusion_overhead": fusion_overhead(scoring, logs)}
    return {"name": run.out.get("name"), "run_dir": str(run.run_dir), "table": table,
            "comparisons": compare(run, table), "cost": cost, "plots": make_plots(run, logs), "notes": run.notes}


def write_report(run_dir: str | Path) -> Path:
    """Write report.json, report.md and plots/ in ``run_dir``; return the report.md path."""
    report = build_report(run_dir)
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    md = run_dir / "report.md"
    md.write_text(render_markdown(report))
    return md


def main(argv: list[str] | None = None) -> int:
    """`infifpo report --run-dir runs/<name>`: prints the report.md path; a bad input exits 1 with its message."""
    ap = argparse.ArgumentParser(prog="infifpo report", description="Paper-style table, costs and plots of a run.")
    ap.add_argument("--run-dir", required=True, help="the run directory holding pipeline_outputs.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = write_report(args.run_dir)
    except InfiFPOError as e:
        print(f"infifpo report: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
