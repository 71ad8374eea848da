"""`infifpo report --run_dir runs/<name>`: the paper-style results table, cost accounting and training plots of a run
(or of eval outputs made without the pipeline: `--eval pivot=DIR --eval infifpo=DIR ...`).

Reads ``<run_dir>/pipeline_outputs.json`` and the files it points to (docs/formats.md: train logs, score_stats.json,
eval scores.json and per-item rows, sample rows); writes ``report.md``, ``report.json`` and ``plots/*.png`` in the
run directory. Owns: the table layout (InfiFPO paper Table 2: rows pivot, sources, SFT, SFT-DPO, SFT-WRPO, InfiFPO;
columns benchmarks, Avg, Math avg, Code avg, seeds, size, compute hours), the ablation table of InfiFPO's arms, the
stated comparisons with their paired intervals, the power statement, the survey metrics, the fusion diagnostics of
every InfiFPO run, and the fusion-overhead ratio. Does not own: computing any score (`eval`) or timing (`pipeline`),
the statistics (`eval.stats`), or plotting (`plots`). A missing input renders as "—" with a note naming the stage to
re-run; a corrupt one is a named error.

Runs, seeds and arms. ``checkpoints`` and ``evals`` map run labels to paths: "pivot", "source:<model>", "sft",
"sft_wrpo" (WRPO's own SFT, optional), "dpo", "wrpo", "infifpo", "<method>@seed<k>" for a later training seed, and
"infifpo[<arm>]" / "infifpo[<arm>]@seed<k>" for the ablation arms; the optional ``runs`` maps each label to
{"method", "seed", "arm", "overrides"}. A row of a table is a label without its "@seed<k>" (its *group*): one row per
method, over all its seeds. An output without ``runs`` or "@seed" labels is one seed per row. A pairwise arm
(``runs`` entry with ``merge``: {"method", "components"}; `infifpo pipeline`) is a row like any arm, its checkpoint
the merge of its per-source InfiFPO runs; a run marked ``component_of`` is one of those intermediates: no row of its
own, its train log counted in the arm's fusion diagnostics and costs.

Definitions (percent and percentage points throughout):

- Accuracy of a row on a benchmark: the mean over the row's evaluated seeds of each seed's accuracy. Its interval is
  the eval's Wilson 95 % interval for one seed (or for several seeds that agree on every item), and otherwise the
  percentile interval of a bootstrap over items and seeds (``eval.stats.seed_item_bootstrap``: each replicate
  resamples the items, and the seeds, with replacement). Avg / Math avg / Code avg carry the same bootstrap's
  interval over all their benchmarks (items resampled within each; the interval of the one benchmark when there is
  one). Avg = mean over all benchmarks; Math avg / Code avg = mean over the benchmarks whose domain is
  "math" / "code" (the paper's Math and Code averages). A benchmark's domain comes from its scores.json entry or
  per-item rows ("domain") when the eval records it, else from the prompt loader that builds it (``data_prep.prompts``:
  the run's eval spec, or the benchmark's own name), else, for lm-eval tasks, from ``LM_EVAL_DOMAINS``; an unknown
  domain is left out of Math/Code avg with a note.
- Comparisons (A - B, points): paired by item id; the interval is the percentile interval of the same bootstrap over
  items and seeds of the difference (A's and B's seeds resampled independently, the items once for both), on one
  benchmark or averaged over benchmarks (items resampled within each). The report states InfiFPO vs SFT-DPO and vs
  SFT-WRPO, each preference method vs the SFT it starts from, SFT vs the pivot, and each ablation arm vs the default
  InfiFPO; it claims an ordering only where the 95 % interval of the difference excludes zero and otherwise says
  "not distinguishable". Without per-item rows (lm-eval tasks) a one-seed comparison falls back to Wilson interval
  overlap, and anything else gets no interval and no ordering.
- Power: the smallest difference a comparison can resolve is reported as the *half-width of its paired 95 %
  interval* ((hi - lo) / 2, points), per benchmark and per average, for every stated comparison; a difference
  smaller than about that is "not distinguishable" at this number of items and seeds. Beside it, per benchmark, the
  *floor* at n items (``eval.stats.min_detectable_difference``): the smallest difference any one-seed paired
  comparison can resolve, reached when every discordant item favours one model (40 points at n = 10, 20 at n = 20,
  4 at n = 100); it does not depend on the results.
- Survey metrics of a row (``eval.stats.survey_metrics``; pivot p, best source b(t) = the source row with the highest
  accuracy on benchmark t): retention(t) = 100 x acc(t) / acc_b(t)(t), averaged over the benchmarks where the best
  source is above 0 ("normalised performance"); worst drop = min_t (acc(t) - acc_p(t)) in points; share degraded
  (raw) = fraction of benchmarks with acc(t) < acc_p(t); share degraded (beyond the interval) = fraction whose 95 %
  interval of acc - acc_p lies entirely below zero.
- Cost of an ablation arm (``arm_costs``): the training runs it needs per seed (a pairwise arm: one per source, some
  possibly shared with another arm and then counted in each arm's cost, as if each ran alone), its merge, its extra
  scoring (none: every arm trains on the default InfiFPO's scored pairs), and the wall seconds of its own runs and
  merge (mean over seeds); its compute hours also count SFT and scoring, as every InfiFPO row's do.
- Fusion diagnostics of each InfiFPO run (every seed and arm), from its train log: for every candidate model, the
  share of pairs whose fused reference came from it (``fusion/chosen_share/<model>``, ``fusion/rejected_share/
  <model>``) and the clip rate (``fusion/clip_rate``: the fraction of source values the clipping changed), each as
  the final logged value and the mean over the logged entries (each entry already a mean over its logging window).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.prompts import build_prompts, parse_spec
from infifpo.config import parse_config
from infifpo.eval.stats import min_detectable_difference, seed_item_bootstrap, survey_metrics
from infifpo.report import plots
from infifpo.report.markdown import DASH, render_markdown
from infifpo.schema import ConfigError, DataFormatError, InfiFPOError
from infifpo.store import SUCCESS, StoreError, atomic_write, read_output

logger = logging.getLogger("infifpo.report.stage")
TRAIN_LOG = "infifpo_train_log.json"
METHODS = {"sft": "SFT", "sft_wrpo": "SFT (WRPO data)", "dpo": "SFT-DPO", "wrpo": "SFT-WRPO", "infifpo": "InfiFPO"}
# Training-side wall time a trained row paid (timings labels); InfiFPO also pays scoring every response once.
COMPUTE_LABELS = {"sft": ["train/sft"], "sft_wrpo": ["train/sft_wrpo"], "dpo": ["train/sft", "train/dpo"],
                  "wrpo": ["train/sft", "train/wrpo"], "infifpo": ["train/sft", "score", "train/infifpo"]}
WRPO_DATA_LABELS = ("sample/sft_wrpo", "judge/sft_wrpo")  # WRPO's second sampling pass, from its own SFT
OVERHEAD_TARGET = 1.5  # issue 7: InfiFPO's whole cost at most 1.5x SFT-DPO's training with a live reference
PRECISION = {"bfloat16": "bf16", "bf16": "bf16", "float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16"}
# "<method>[<arm>]@seed<k>": the group (row) is the label without "@seed<k>"
LABEL = re.compile(r"^(?P<group>(?P<method>[^\[\]@]+)(?:\[(?P<arm>[^\[\]]+)\])?)(?:@seed(?P<seed>\d+))?$")
# Domains of lm-eval tasks (no eval output records one): the paper's Math (GSM8K, MATH, TheoremQA) and Code (MBPP,
# HumanEval) benchmarks under lm-eval's task names; a task matches its name or "<name>_<subtask>"; others are general.
LM_EVAL_DOMAINS = {"gsm8k": "math", "minerva_math": "math", "hendrycks_math": "math", "theoremqa": "math",
                   "mbpp": "code", "humaneval": "code"}
AVERAGES = {"avg": None, "math_avg": "math", "code_avg": "code"}  # report key -> domain averaged (None: all)
AVERAGE_NAMES = {"avg": "Avg", "math_avg": "Math avg", "code_avg": "Code avg"}
RESAMPLES = 10_000  # bootstrap replicates of every interval the report computes (seed 0: reproducible)


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
        for key in ("checkpoints", "evals", "timings", "samples", "runs"):
            if not isinstance(self.out.setdefault(key, {}), dict):
                raise DataFormatError(f"{self.file}: key {key!r} must be an object. Re-run the pipeline.")
        self.runs: dict[str, Any] = self.out["runs"]
        if any(not isinstance(v, dict) for v in self.runs.values()):
            raise DataFormatError(f"{self.file}: every 'runs' entry must be an object {{method, seed, arm, "
                                  "overrides}}. Re-run the pipeline.")
        bad = [k for k, v in self.out["timings"].items() if not isinstance((v or {}).get("seconds"), int | float)]
        if bad:
            raise DataFormatError(f"{self.file}: timings {bad[:3]} lack numeric 'seconds'. Re-run the pipeline.")
        # pipeline paths are relative to the directory it ran in: the recorded run_dir's parent, seen from here
        recorded, here = Path(self.out.get("run_dir") or self.run_dir), self.run_dir.resolve()
        up = len(recorded.parts)
        self.base = here.parents[up - 1] if not recorded.is_absolute() and 0 < up <= len(here.parents) else Path.cwd()
        self.notes: list[str] = []

    def path(self, p: str) -> Path:
        """A path as recorded by the pipeline, found from wherever the report runs: relative to the run directory (the
        pipeline's rule), else (outputs files written before it) relative to where that pipeline ran."""
        p = Path(p)
        if p.is_absolute():
            return p
        return self.run_dir / p if (self.run_dir / p).exists() else p if p.exists() else self.base / p


def short_name(model: str) -> str:
    """The last path component of a model name or path ("HuggingFaceTB/SmolLM2-135M" -> "SmolLM2-135M")."""
    return Path(str(model).rstrip("/")).name or str(model)


def format_params(n: int | None) -> str:
    """A parameter count as the paper writes it: 134515008 -> "135M", 14.7e9 -> "14.7B"."""
    if not n:
        return DASH
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def label_info(label: str, runs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run label names: {label, group (its row: the label without "@seed<k>"), base (the method part of the
    label, arm removed), method, arm, seed, overrides}; ``runs[label]`` (pipeline_outputs' ``runs``) overrides
    method, seed, arm and overrides when present. Without it the first seed's ``seed`` is None."""
    m = LABEL.match(label)
    info = {"label": label, "group": m["group"] if m else label, "base": m["method"] if m else label,
            "method": m["method"] if m else label, "arm": m["arm"] if m else None,
            "seed": int(m["seed"]) if m and m["seed"] else None, "overrides": None}
    entry = (runs or {}).get(label)
    if isinstance(entry, dict):
        info.update({k: entry[k] for k in ("method", "seed", "arm", "overrides") if k in entry})
    return info


class Evals:
    """Each run label's scores.json and per-item verdicts, read once (notes on missing ones go to ``run.notes``)."""

    def __init__(self, run: Run):
        self.run = run
        self._scores: dict[str, dict[str, Any] | None] = {}
        self._items: dict[str, dict[str, dict[str, bool]] | None] = {}
        self._rows: dict[str, list[dict[str, Any]] | None] = {}
        self.item_domains: dict[str, set[str]] = {}

    def scores(self, label: str) -> dict[str, Any] | None:
        """scores.json of ``label``'s eval; None (and a note) when the eval is missing."""
        if label not in self._scores:
            self._scores[label] = self._load(label)
        return self._scores[label]

    def _load(self, key: str) -> dict[str, Any] | None:
        run = self.run
        stage = f"`infifpo eval` (pipeline stage eval/{key})"
        d = run.out["evals"].get(key)
        scores = read_json(run.path(d) / "scores.json", stage) if d else None
        if scores is None:
            run.notes.append(f"no eval for row {key!r}" + (f" ({d}/scores.json missing)" if d else "")
                             + f": re-run {stage}.")
            return None
        bench = scores.get("benchmarks")
        # ci95 is null where there is no interval (an lm-eval task that reports no standard error)
        if not isinstance(bench, dict) or any(not isinstance(b, dict) or "accuracy" not in b or "ci95" not in b
                                              or (b["ci95"] is not None and len(b["ci95"]) != 2)
                                              for b in bench.values()):
            raise DataFormatError(f"{run.path(d) / 'scores.json'}: 'benchmarks' must map each benchmark to an object "
                                  f"with 'accuracy' and 'ci95' (a pair, or null) (docs/formats.md, 'Eval outputs'). "
                                  f"Re-run {stage}.")
        return scores

    def rows(self, label: str) -> list[dict[str, Any]] | None:
        """``label``'s per-item eval rows (read once); None when they are not there."""
        if label not in self._rows:
            d = self.run.out["evals"].get(label)
            ok = d and (self.run.path(d) / SUCCESS).exists()
            self._rows[label] = _read_rows(self.run.path(d), f"eval/{label}") if ok else None
        return self._rows[label]

    def items(self, label: str) -> dict[str, dict[str, bool]] | None:
        """benchmark -> {item id: correct} from ``label``'s per-item eval rows; None when they are not there."""
        if label not in self._items:
            rows = self.rows(label)
            out: dict[str, dict[str, bool]] | None = None
            if rows is not None:
                out = {}
                for r in rows:
                    out.setdefault(r["benchmark"], {})[r["id"]] = bool(r["correct"])
                    if r.get("domain"):
                        self.item_domains.setdefault(r["benchmark"], set()).add(str(r["domain"]))
            self._items[label] = out
        return self._items[label]


# -- rows -----------------------------------------------------------------------------------------------------------
def _group_name(group: str, info: dict[str, Any]) -> tuple[str, str]:
    """(display name, kind) of a row."""
    if info["arm"] is not None and info["base"] == "infifpo":
        return f"InfiFPO [{info['arm']}]", "arm"
    return METHODS.get(group, group), "trained"


def _seed_rank(label: str) -> tuple[int, int]:
    """Sort key of a label among its row's seeds: the unsuffixed first seed, then "@seed<k>" by k."""
    m = LABEL.match(label)
    return (1, int(m["seed"])) if m and m["seed"] else (0, 0)


def _row_specs(run: Run) -> list[dict[str, Any]]:
    """Every row (pivot, sources, trained methods in paper order, other trained groups, ablation arms) with its run
    labels in seed order (the unsuffixed first seed, then "@seed<k>" by k)."""
    pivot, sources, ckpts = run.out["pivot"], run.out["sources"], run.out["checkpoints"]
    fixed = ["pivot", *(f"source:{m}" for m in sources)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for label in dict.fromkeys([*fixed, *ckpts, *run.out["evals"]]):
        if "component_of" in run.runs.get(label, {}):  # a pairwise arm's per-source run: part of the arm's row
            continue
        info = label_info(label, run.runs)
        groups.setdefault(info["group"], []).append(info)
    for infos in groups.values():
        infos.sort(key=lambda i: _seed_rank(i["label"]))
    rows = [{"key": "pivot", "name": f"{short_name(pivot)} (pivot)", "kind": "pivot", "model": pivot}]
    rows += [{"key": f"source:{m}", "name": f"{short_name(m)} (source)", "kind": "source", "model": m}
             for m in sources]
    trained = [g for g in METHODS if g in groups] + [g for g in groups if g not in METHODS and g not in fixed]
    for g in trained:
        name, kind = _group_name(g, groups[g][0])
        rows.append({"key": g, "name": name, "kind": kind, "model": ckpts.get(groups[g][0]["label"])})
    rows.sort(key=lambda r: r["kind"] == "arm")  # stable: arms after every main row
    for row in rows:
        infos = groups.get(row["key"], [])
        row["labels"] = [i["label"] for i in infos]
        row["seeds"] = [i["seed"] for i in infos]
        row["arm"] = infos[0]["arm"] if infos else None
        row["overrides"] = infos[0]["overrides"] if infos else None
        row["_infos"] = infos
    return rows


def benchmark_domains(run: Run, data: Evals, benchmarks: list[str], labels: list[str]) -> dict[str, dict[str, Any]]:
    """{benchmark: {"domain": math | code | general | None, "from": where it was found}} (see the module docstring:
    scores.json entry, per-item rows, the run's eval spec or the benchmark's name through the prompt loader, the
    lm-eval task table); None with a note when none applies."""
    entries: dict[str, list[dict[str, Any]]] = {}
    for label in labels:
        data.items(label)  # collects the rows' domains, if recorded
        for b, e in ((data.scores(label) or {}).get("benchmarks") or {}).items():
            entries.setdefault(b, []).append(e)
    specs = ((run.out.get("config") or {}).get("eval") or {}).get("benchmarks") or []
    out = {}
    for b in benchmarks:
        found = {str(e["domain"]) for e in entries.get(b, []) if e.get("domain")}
        if len(found) == 1:
            out[b] = {"domain": found.pop(), "from": "scores.json"}
        elif len(data.item_domains.get(b, ())) == 1:
            out[b] = {"domain": next(iter(data.item_domains[b])), "from": "eval rows"}
        elif any(e.get("ci_method") == "normal" for e in entries.get(b, [])) or b.startswith("lm-eval:"):
            task = b.removeprefix("lm-eval:")
            out[b] = {"domain": next((d for t, d in LM_EVAL_DOMAINS.items() if task == t or task.startswith(t + "_")),
                                     "general"), "from": "lm-eval task table"}
        else:
            spec = next((s for s in specs if _key_of(s) == b), b)
            out[b] = {"domain": _loader_domain(spec), "from": "prompt loader"}
        if out[b]["domain"] is None:
            out[b]["from"] = None
            run.notes.append(f"domain of benchmark {b!r} unknown (not recorded by its eval, no loader gives one): "
                             "left out of Math avg and Code avg.")
    return out


def _key_of(spec: Any) -> str | None:
    """The benchmark key the eval stage gives ``spec`` (None when it is not a valid spec)."""
    from infifpo.eval.stage import benchmark_key  # here: the eval stage imports torch, the report needs it only now

    try:
        return benchmark_key(parse_spec(spec))
    except (InfiFPOError, ValueError, TypeError, KeyError):
        return None


def _loader_domain(spec: Any) -> str | None:
    """The one domain of the rows ``data_prep.prompts`` builds from ``spec`` (whole split; hub sources are not loaded,
    a hub spec's explicit ``domain`` is used); None when it mixes domains or cannot be built here."""
    try:
        s = parse_spec(spec)
    except (InfiFPOError, ValueError, TypeError):
        return None
    if s.get("domain"):
        return str(s["domain"])
    if s["source"] == "hf" and not Path(str(s["name"])).expanduser().exists():
        return None  # a hub id: not fetched for a domain; local hf data loads offline
    try:
        domains = {r["domain"] for r in build_prompts([{**s, "n": None}])}
    except (InfiFPOError, ImportError, OSError, ValueError):
        return None
    return domains.pop() if len(domains) == 1 else None


def _evaluated(data: Evals, row: dict[str, Any]) -> list[str]:
    """The row's labels whose eval exists."""
    return [label for label in row["labels"] if data.scores(label) is not None]


def _verdicts(data: Evals, rows: list[dict[str, Any]], benches: list[str]
              ) -> tuple[list[list[list[list[bool]]]], list[int]] | None:
    """Per row, per benchmark, the [seeds, items] verdict matrix over the item ids that every seed of every row has
    (sorted), and the item count per benchmark; None when a seed lacks per-item rows or the rows share no item."""
    maps = [[data.items(label) for label in r["_evaluated"]] for r in rows]
    if any(not ms or any(m is None for m in ms) for ms in maps):
        return None
    out: list[list[list[list[bool]]]] = [[] for _ in rows]
    ns = []
    for bench in benches:
        ids = sorted(set.intersection(*(set(m.get(bench, {})) for ms in maps for m in ms)))
        if not ids:
            return None
        ns.append(len(ids))
        for k, ms in enumerate(maps):
            out[k].append([[m[bench][i] for i in ids] for m in ms])
    return out, ns


def _cell(data: Evals, row: dict[str, Any], bench: str) -> dict[str, Any] | None:
    """A row's entry for one benchmark: accuracy (mean over seeds), ci95, n, correct, ci_method, seed_accuracies."""
    entries = [data.scores(label)["benchmarks"].get(bench) for label in row["_evaluated"]]
    if not entries or any(e is None for e in entries):
        if entries and any(e is not None for e in entries):
            data.run.notes.append(f"{row['name']}: {bench} missing from some seeds' evals; not averaged.")
        return None
    accs = [float(e["accuracy"]) for e in entries]
    if len(entries) == 1:
        e = entries[0]
        return {"accuracy": e["accuracy"], "ci95": e["ci95"], "n": e.get("n"), "correct": e.get("correct"),
                "ci_method": e.get("ci_method", "wilson"), "seeds": 1, "seed_accuracies": accs}
    cell = {"accuracy": sum(accs) / len(accs), "ci95": None, "n": entries[0].get("n"), "correct": None,
            "ci_method": None, "seeds": len(accs), "seed_accuracies": accs}
    v = _verdicts(data, [row], [bench])
    matrix = v[0][0][0] if v else None  # [seeds][items] of this row on this benchmark
    if matrix and all(seed == matrix[0] for seed in matrix) and entries[0].get("ci95"):
        # every seed gives the same verdict on every item: one model's verdicts, so the eval's (Wilson) interval,
        # not the bootstrap's, which is a point at 0 % and 100 %
        cell.update(ci95=entries[0]["ci95"], n=v[1][0], ci_method="wilson (every seed agrees on every item)")
    elif matrix:
        _, lo, hi = seed_item_bootstrap([matrix], resamples=RESAMPLES)
        cell.update(ci95=[lo, hi], n=v[1][0], ci_method="bootstrap over items and seeds")
    return cell


def _subset(table: dict[str, Any], avg: str) -> list[str]:
    d = AVERAGES[avg]
    return [b for b in table["benchmarks"] if d is None or table["domains"][b]["domain"] == d]


def _mean(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def own_timings(run: Run, label: str) -> list[str]:
    """The timings a trained label paid itself: "train/<label>", or for a pairwise arm's merged label its runs'
    "train/<component>" and its "merge/<label>"."""
    merge = run.runs.get(label, {}).get("merge")
    if isinstance(merge, dict):
        return [*(f"train/{c}" for c in merge.get("components") or []), f"merge/{label}"]
    return [f"train/{label}"]


def _compute(run: Run, row: dict[str, Any], groups: set[str]) -> float | None:
    """Training-side wall seconds of the row: mean over its seeds of COMPUTE_LABELS with the seed's own timings
    (``own_timings``: "train/<label>", or a pairwise arm's runs and merge; a dependency is taken with the seed's
    "@seed<k>" suffix when timings have one; WRPO with its own SFT pays "train/sft_wrpo" and its second sampling pass,
    WRPO_DATA_LABELS, instead of "train/sft"); None (and a note) when some are missing."""
    base = row["_infos"][0]["base"] if row["_infos"] else row["key"]
    if row["kind"] not in ("trained", "arm") or base not in COMPUTE_LABELS:
        return None
    timings, per_seed = run.out["timings"], []
    for info in row["_infos"]:
        suffix = info["label"][len(info["group"]):]
        deps = COMPUTE_LABELS[base][:-1]
        if base == "wrpo" and "sft_wrpo" in groups:
            deps = ["train/sft_wrpo", *(t for t in WRPO_DATA_LABELS if t in timings)]
        labels = [t + suffix if t + suffix in timings else t for t in deps] + own_timings(run, info["label"])
        missing = [t for t in labels if t not in timings]
        if missing:
            run.notes.append(f"compute hours of {row['name']}: timings lack {missing}.")
            return None
        per_seed.append(sum(float(timings[t]["seconds"]) for t in labels))
    return sum(per_seed) / len(per_seed) if per_seed else None


def build_table(run: Run, data: Evals | None = None) -> dict[str, Any]:
    """Rows in paper order with per-benchmark accuracy (%) and interval, Avg / Math avg / Code avg (with a bootstrap
    interval when per-item rows exist), the per-seed values, parameter count and compute hours; ablation arms are
    rows of kind "arm" (after the main rows)."""
    data = data or Evals(run)
    rows = _row_specs(run)
    benchmarks: list[str] = []
    for row in rows:
        row["_evaluated"] = _evaluated(data, row)
        first = data.scores(row["_evaluated"][0]) if row["_evaluated"] else {}
        row["eval_dir"] = run.out["evals"].get(row["_evaluated"][0]) if row["_evaluated"] else None
        row["params"] = first.get("params")
        row["size"] = format_params(row["params"])
        for label in row["_evaluated"]:
            benchmarks += [b for b in data.scores(label)["benchmarks"] if b not in benchmarks]
    all_labels = [label for r in rows for label in r["_evaluated"]]
    table = {"benchmarks": benchmarks, "domains": benchmark_domains(run, data, benchmarks, all_labels),
             "columns": [*benchmarks, *AVERAGE_NAMES.values(), "Seeds", "Size", "Compute hours"], "rows": rows}
    groups = {r["key"] for r in rows}
    for row in rows:
        row["benchmarks"] = {b: _cell(data, row, b) for b in benchmarks}
        for avg in AVERAGES:
            subset = _subset(table, avg)
            row[avg] = _mean([row["benchmarks"][b] and row["benchmarks"][b]["accuracy"] for b in subset])
            if row[avg] is not None and len(subset) == 1:  # an average of one benchmark: that benchmark's interval
                row[f"{avg}_ci95"] = row["benchmarks"][subset[0]]["ci95"]
                continue
            v = _verdicts(data, [row], subset) if row[avg] is not None else None
            row[f"{avg}_ci95"] = list(seed_item_bootstrap(v[0][0], resamples=RESAMPLES)[1:]) if v else None
        row["per_seed"] = []
        for label in row["_evaluated"]:
            bench = data.scores(label)["benchmarks"]
            accs = {b: (bench[b]["accuracy"] if b in bench else None) for b in benchmarks}
            row["per_seed"].append({"label": label, "seed": label_info(label, run.runs)["seed"],
                                    "eval_dir": run.out["evals"].get(label), "benchmarks": accs,
                                    **{avg: _mean([accs[b] for b in _subset(table, avg)]) for avg in AVERAGES}})
        row["compute_seconds"] = _compute(run, row, groups)
        row["compute_hours"] = row["compute_seconds"] / 3600 if row["compute_seconds"] is not None else None
    return table


# -- comparisons ----------------------------------------------------------------------------------------------------
def _diff(data: Evals, a: dict[str, Any], b: dict[str, Any], benches: list[str]) -> dict[str, Any]:
    """A - B in points on one benchmark or averaged over ``benches``, with the paired interval (module docstring)."""
    diff = sum(a["benchmarks"][k]["accuracy"] - b["benchmarks"][k]["accuracy"] for k in benches) / len(benches)
    seeds = [len(a["_evaluated"]), len(b["_evaluated"])]
    v = _verdicts(data, [a, b], benches)
    if v:
        (ma, mb), ns = v
        _, lo, hi = seed_item_bootstrap(ma, mb, resamples=RESAMPLES)
        method = "paired bootstrap over items" + (" and seeds" if max(seeds) > 1 else "")
        if len(benches) > 1:
            method += ", stratified by benchmark"
        return {"diff": diff, "ci95": [lo, hi], "half_width": (hi - lo) / 2, "n": sum(ns), "seeds": seeds,
                "method": method, "distinguishable": lo > 0 or hi < 0}
    ca, cb = a["benchmarks"][benches[0]], b["benchmarks"][benches[0]]
    if len(benches) == 1 and seeds == [1, 1] and ca["ci95"] and cb["ci95"]:
        return {"diff": diff, "ci95": None, "half_width": None, "n": ca.get("n"), "seeds": seeds,
                "method": "Wilson interval overlap",
                "distinguishable": ca["ci95"][0] > cb["ci95"][1] or cb["ci95"][0] > ca["ci95"][1]}
    return {"diff": diff, "ci95": None, "half_width": None, "n": None, "seeds": seeds,
            "method": "difference of means" if len(benches) > 1 else "difference of seed means",
            "distinguishable": None}


def compare_rows(data: Evals, table: dict[str, Any], a: dict[str, Any], b: dict[str, Any], kind: str, *,
                 averages: bool = True) -> dict[str, Any]:
    """A minus B in accuracy points on each benchmark both have, and on Avg, Math avg and Code avg where both have
    every benchmark averaged (None otherwise)."""
    shared = [k for k in table["benchmarks"] if a["benchmarks"][k] and b["benchmarks"][k]]
    cmp: dict[str, Any] = {"a": a["key"], "b": b["key"], "name": f"{a['name']} vs {b['name']}", "kind": kind,
                           "method": a["name"], "baseline": b["name"],
                           "benchmarks": {k: _diff(data, a, b, [k]) for k in shared}}
    for avg in AVERAGES:
        subset = _subset(table, avg)
        cmp[avg] = (_diff(data, a, b, subset) if averages and a[avg] is not None and b[avg] is not None and subset
                    else None)
    return cmp


def stated_pairs(rows: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(A, B, kind) of every comparison the report states, for the rows present: InfiFPO vs SFT-DPO and SFT-WRPO,
    each preference method vs the SFT it starts from (WRPO: its own SFT when the run has one), SFT vs the pivot."""
    wrpo_sft = "sft_wrpo" if "sft_wrpo" in rows else "sft"
    pairs = [("infifpo", "dpo", "main"), ("infifpo", "wrpo", "main"), ("dpo", "sft", "vs_sft"),
             ("wrpo", wrpo_sft, "vs_sft"), ("infifpo", "sft", "vs_sft"), ("sft", "pivot", "vs_pivot"),
             ("sft_wrpo", "pivot", "vs_pivot")]
    return [p for p in pairs if p[0] in rows and p[1] in rows]


def compare(data: Evals, table: dict[str, Any]) -> list[dict[str, Any]]:
    """The stated comparisons (``stated_pairs``), InfiFPO vs the baselines first."""
    rows = {r["key"]: r for r in table["rows"] if r["kind"] != "arm"}
    return [compare_rows(data, table, rows[a], rows[b], kind) for a, b, kind in stated_pairs(rows)]


def _override_diff(default: Any, arm: Any) -> dict[str, list[Any]] | None:
    """{option: [default value, arm value]} for every option the arm's overrides set differently; None when unknown."""
    if not isinstance(default, dict) or not isinstance(arm, dict):
        return None
    return {k: [default.get(k), arm.get(k)] for k in sorted({*default, *arm}) if default.get(k) != arm.get(k)}


def ablation(data: Evals, table: dict[str, Any]) -> dict[str, Any] | None:
    """InfiFPO's arms against the default InfiFPO run: the arm rows, what each changes, and arm - default."""
    arms = [r for r in table["rows"] if r["kind"] == "arm"]
    default = next((r for r in table["rows"] if r["key"] == "infifpo"), None)
    if not arms:
        return None
    for arm in arms:
        arm["changes"] = _override_diff(default and default["overrides"], arm["overrides"])
    return {"default": "infifpo" if default else None, "arms": [a["key"] for a in arms],
            "comparisons": [compare_rows(data, table, a, default, "ablation") for a in arms] if default else []}


# -- survey metrics, power, fusion diagnostics ----------------------------------------------------------------------
def add_survey(data: Evals, table: dict[str, Any]) -> None:
    """``row["survey"]`` of every row (``eval.stats.survey_metrics``) against the pivot and the best source."""
    rows = table["rows"]
    pivot = next(r for r in rows if r["kind"] == "pivot")
    acc = {r["key"]: {b: c and c["accuracy"] for b, c in r["benchmarks"].items()} for r in rows}
    best = {b: max((acc[r["key"]][b] for r in rows if r["kind"] == "source" and acc[r["key"]][b] is not None),
                   default=None) for b in table["benchmarks"]}
    table["best_source"] = {b: (None if best[b] is None else next(
        r["key"] for r in rows if r["kind"] == "source" and acc[r["key"]][b] == best[b])) for b in best}
    for row in rows:
        if row is pivot:
            below = {b: False for b in table["benchmarks"]}
        else:
            vs = compare_rows(data, table, row, pivot, "vs_pivot", averages=False)["benchmarks"]
            below = {b: None if c["distinguishable"] is None else bool(c["distinguishable"] and c["diff"] < 0)
                     for b, c in vs.items()}
        row["survey"] = survey_metrics(acc[row["key"]], acc["pivot"], best, below)


def power(table: dict[str, Any], comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """Per benchmark and per average: the items compared, the half-width (points) of every stated comparison's paired
    95 % interval (the resolution of that comparison, module docstring) with the min and max over the non-degenerate
    ones (a zero width means the two rows agree on every item and seed: the interval is a point and says nothing about
    resolution; those comparisons are listed under "degenerate"), and, per benchmark, the floor: the smallest
    difference any one-seed paired comparison can resolve at that many items (``min_detectable_difference``)."""
    out = {}
    for key in [*table["benchmarks"], *AVERAGES]:
        entries = {c["name"]: (c["benchmarks"].get(key) if key in table["benchmarks"] else c[key])
                   for c in comparisons}
        hw = {name: e["half_width"] for name, e in entries.items() if e and e["half_width"] is not None}
        ns = [e["n"] for e in entries.values() if e and e["n"] is not None]
        wide = [v for v in hw.values() if v > 0]
        n = max(ns) if ns else None
        out[key] = {"n_items": n, "floor": min_detectable_difference(n) if n and key in table["benchmarks"] else None,
                    "half_width": hw, "min": min(wide, default=None), "max": max(wide, default=None),
                    "degenerate": [name for name, v in hw.items() if v == 0]}
    return {"definition": "half-width (hi - lo) / 2 of the paired 95 % bootstrap interval of each stated comparison, "
                          "in points: differences smaller than about this are not distinguishable; floor = the "
                          "smallest difference a one-seed paired comparison can resolve at that many items (every "
                          "discordant item in one direction)", "rows": out}


def _final_mean(log_history: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    steps, values = plots.series(log_history, key)
    return {"final": values[-1], "mean": sum(values) / len(values), "logged": len(values), "last_step": steps[-1]} \
        if values else None


def fusion_diagnostics(run: Run, table: dict[str, Any], logs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per InfiFPO run (every seed of InfiFPO and of each arm; a pairwise arm: its per-source runs that are no row of
    their own, under the arm's row) with a train log: final and mean share of each candidate in the fused reference
    of y_w and y_l, and the clip rate (module docstring); a note when not logged."""
    out = []
    for row in table["rows"]:
        for info in row["_infos"]:
            merge = run.runs.get(info["label"], {}).get("merge")
            labels = [c for c in (merge or {}).get("components") or [] if "component_of" in run.runs.get(c, {})] \
                if merge else [info["label"]]  # a pairwise arm: its intermediate runs (the others have a row)
            for label in labels:
                if info["base"] == "infifpo" and label in logs:
                    out.append(_fusion_entry(run, row, {**info, "label": label}, logs[label]["log_history"]))
    return out


def _fusion_entry(run: Run, row: dict[str, Any], info: dict[str, Any], hist: list[dict[str, Any]]) -> dict[str, Any]:
    """One InfiFPO run's fusion diagnostics (``fusion_diagnostics``): ``info`` names the run, ``row`` its row."""
    names = plots.share_names(hist)
    shares = {side: {n: _final_mean(hist, prefix + n) for n in names} for side, prefix in plots.SHARE_PREFIX.items()}
    clip = _final_mean(hist, "fusion/clip_rate")
    if not names and clip is None:
        run.notes.append(f"{info['label']}: no fusion/* share or clip-rate entries in its train log.")
    return {"label": info["label"], "row": row["key"], "name": row["name"], "arm": info["arm"], "seed": info["seed"],
            "shares": shares, "clip_rate": clip}


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
                              f"(docs/formats.md, 'Score outputs'). Re-run {stage}.")
    out = []
    for m in models:
        processed = m["tokens"] + int(m.get("prompt_tokens") or 0)
        out.append({**m, "s_per_1k_tokens": 1000 * m["seconds"] / processed if processed else None})
    return out


def train_logs(run: Run) -> dict[str, dict[str, Any]]:
    """run label -> its infifpo_train_log.json (docs/formats.md "Train log"), for each trained label (every seed and
    arm, a pairwise arm's per-source runs; not its merge) whose log exists."""
    logs = {}
    fixed = {"pivot", *(f"source:{m}" for m in run.out["sources"])}
    for label, ckpt in run.out["checkpoints"].items():
        if label in fixed or "merge" in run.runs.get(label, {}):  # a merged checkpoint was not trained
            continue
        file, stage = run.path(ckpt) / TRAIN_LOG, f"pipeline stage train/{label}"
        log = read_json(file, stage)
        if log is None:
            run.notes.append(f"no {TRAIN_LOG} in {ckpt}: re-run {stage} for its costs and curves.")
        elif not isinstance(log.get("log_history"), list) or not isinstance(log.get("train_runtime_s"), int | float):
            raise DataFormatError(f"{file}: needs 'log_history' (list) and 'train_runtime_s' (seconds). "
                                  f"Re-run {stage}.")
        else:
            logs[label] = log
    return logs


def arm_costs(run: Run, table: dict[str, Any]) -> list[dict[str, Any]]:
    """Per ablation arm (module docstring, cost): its training runs per seed (first seed's labels; ``shared``: those
    another row also uses), its merge method (None: a trained arm), extra scoring seconds (0: the default InfiFPO's
    scored pairs), the wall seconds of its own runs and merge (mean over seeds; None and a note when a timing is
    missing) and its compute seconds (the row's, with SFT and scoring)."""
    timings, out = run.out["timings"], []
    users: dict[str, set[str]] = {}  # training label -> the row labels that use it
    for label, entry in run.runs.items():
        for c in (entry.get("merge") or {}).get("components") or ([] if "component_of" in entry else [label]):
            users.setdefault(c, set()).add(label)
    for row in (r for r in table["rows"] if r["kind"] == "arm"):
        per_seed, first = [], own_timings(run, row["labels"][0]) if row["labels"] else []
        for label in row["labels"]:
            own = own_timings(run, label)
            missing = [t for t in own if t not in timings]
            if missing:
                run.notes.append(f"cost of {row['name']}: timings lack {missing}.")
                per_seed = []
                break
            per_seed.append(sum(float(timings[t]["seconds"]) for t in own))
        runs = [t.removeprefix("train/") for t in first if t.startswith("train/")]
        merge = run.runs.get(row["labels"][0], {}).get("merge") if row["labels"] else None
        out.append({"arm": row["key"], "name": row["name"], "training_runs": runs,
                    "shared": [r for r in runs if len(users.get(r, ())) > 1], "merge": (merge or {}).get("method"),
                    "extra_scoring_s": 0.0, "own_seconds": sum(per_seed) / len(per_seed) if per_seed else None,
                    "compute_seconds": row["compute_seconds"]})
    return out


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
    """loss.png, reward_margin.png, fusion_shares.png under <run_dir>/plots (the first seed of each main method);
    None (and a note) for a missing one."""
    out_dir = run.run_dir / "plots"
    hist = {name: logs[m]["log_history"] for m, name in METHODS.items() if m in logs}
    sft_names = {METHODS["sft"], METHODS["sft_wrpo"]}
    made = {
        "loss": plots.plot_metric(hist, "loss", out_dir / "loss.png", title="Training loss", ylabel="loss"),
        "reward_margin": plots.plot_metric({k: v for k, v in hist.items() if k not in sft_names},
                                           "rewards/margins", out_dir / "reward_margin.png",
                                           title="Reward margin (rewards/margins)",
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
# The instructed answer line of math prompts (prompts.MATH_INSTRUCTION): 'The answer is N.'
ANSWER_LINE = re.compile(r"the answer is\s*[^\n]*", re.IGNORECASE)
WORKING_CHARS = 20  # a math completion "shows working" when this many characters remain without its answer line


def output_profile(data: Evals, table: dict[str, Any]) -> list[dict[str, Any]]:
    """How each main row answers, per benchmark, from its first seed's greedy completions: items, median and mean
    completion tokens, % cut at the token cap (finish_reason "length"), % with the instructed answer line ("The
    answer is N.") and, for math, % that show working (at least ``WORKING_CHARS`` characters besides the answer
    line). Shows what training did to the answer's form: a model taught to answer without working, or to ramble to
    the cap, shows it here before it shows in accuracy."""
    out = []
    for row in table["rows"]:
        rows = next((r for r in map(data.rows, row.get("labels", [row["key"]])) if r is not None), None)
        if rows is None:
            continue
        by_bench: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_bench.setdefault(r["benchmark"], []).append(r)
        for bench, items in by_bench.items():
            tokens = sorted(int(r.get("num_tokens") or 0) for r in items)
            texts = [str(r.get("completion") or "") for r in items]
            math = (table.get("domains", {}).get(bench) or {}).get("domain") == "math"
            working = [len(ANSWER_LINE.sub("", t).strip()) >= WORKING_CHARS for t in texts]
            out.append({"row": row["name"], "key": row["key"], "benchmark": bench, "n": len(items),
                        "median_tokens": statistics.median(tokens), "mean_tokens": sum(tokens) / len(tokens),
                        "truncated_pct": 100 * sum(r.get("finish_reason") == "length" for r in items) / len(items),
                        "answer_line_pct": 100 * sum(bool(ANSWER_LINE.search(t)) for t in texts) / len(texts),
                        "working_pct": 100 * sum(working) / len(working) if math else None})
    return out


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Everything report.json holds: the table, the ablation, the comparisons, the power, the fusion diagnostics, the
    costs, the plot paths and the notes."""
    run = Run(run_dir)
    data = Evals(run)
    table = build_table(run, data)
    add_survey(data, table)
    comparisons = compare(data, table)
    abl = ablation(data, table)
    logs = train_logs(run)
    scoring = scoring_costs(run)
    timings = [{"label": k, "stage": v.get("stage"), "model": v.get("model"), "seconds": float(v["seconds"])}
               for k, v in run.out["timings"].items()]
    cost = {"timings": timings, "total_s": sum(t["seconds"] for t in timings),
            "tokens_sampled": tokens_sampled(run), "scoring": scoring,
            "training": {m: {k: log.get(k) for k in ("train_runtime_s", "setup_s", "precision", "world_size",
                                                    "num_train_rows", "max_steps")} for m, log in logs.items()},
            "fusion_overhead": fusion_overhead(scoring, logs), "arms": arm_costs(run, table)}
    fusion = fusion_diagnostics(run, table, logs)
    profile = output_profile(data, table)
    arms = [_public(r) for r in table["rows"] if r["kind"] == "arm"]
    table = {**table, "rows": [_public(r) for r in table["rows"] if r["kind"] != "arm"]}
    if abl is not None:
        abl["rows"] = arms
    return {"name": run.out.get("name"), "run_dir": str(run.run_dir), "table": table, "ablation": abl,
            "comparisons": comparisons, "power": power(table, comparisons + (abl["comparisons"] if abl else [])),
            "fusion": fusion, "output_profile": profile, "cost": cost, "plots": make_plots(run, logs),
            "grid": run.out.get("grid"), "notes": run.notes}


def write_report(run_dir: str | Path) -> Path:
    """Write report.json, report.md and plots/ in ``run_dir``; return the report.md path."""
    report = build_report(run_dir)
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    md = run_dir / "report.md"
    md.write_text(render_markdown(report))
    return md


@dataclass
class ReportOptions:
    """The options of `infifpo report` (``--config FILE`` and flags, ``infifpo.config``)."""

    run_dir: str = field(metadata={"help": "the run directory holding pipeline_outputs.json; with --eval, the "
                                           "directory the report (and the outputs file assembled from --eval and "
                                           "--checkpoint) is written to"})
    eval: list[str] = field(default_factory=list, metadata={
        "help": "LABEL=DIR: report these eval outputs without a pipeline run. Labels as the pipeline's: pivot "
                "(required), source:<model>, sft, dpo, wrpo, infifpo, infifpo[<arm>], <method>@seed<k>"})
    checkpoint: list[str] = field(default_factory=list, metadata={
        "help": "LABEL=DIR: the training output of a labelled row (its infifpo_train_log.json gives the fusion "
                "diagnostics and training cost); with --eval"})


def _labelled(items: list[str], flag: str) -> dict[str, str]:
    """["infifpo=DIR", ...] -> {"infifpo": absolute DIR}; ConfigError for an item without LABEL= or a missing DIR."""
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ConfigError(f"--{flag} {item!r}: expected LABEL=DIR, e.g. infifpo=runs/data/eval-infifpo-<fp>.")
        if not Path(path).is_dir():
            raise ConfigError(f"--{flag} {item!r}: {path} is not a directory.")
        out[label] = str(Path(path).resolve())
    return out


def assemble_outputs(run_dir: str | Path, evals: list[str], checkpoints: list[str] = ()) -> Path:
    """Write ``<run_dir>/pipeline_outputs.json`` for eval (and training) outputs made outside `infifpo pipeline`:
    the pivot and source models come from the eval outputs' scores.json; no timings or samples. Returns its path."""
    by_label, ckpts = _labelled(evals, "eval"), _labelled(list(checkpoints), "checkpoint")
    if "pivot" not in by_label:
        raise ConfigError("--eval needs pivot=DIR: every row of the table is compared with the pivot.")
    unknown = sorted(set(ckpts) - set(by_label))
    if unknown:
        raise ConfigError(f"--checkpoint {unknown}: no --eval output has that label.")
    pivot = read_json(Path(by_label["pivot"]) / "scores.json", "`infifpo eval`", required=True).get("model")
    outputs = {"name": Path(run_dir).resolve().name, "run_dir": str(Path(run_dir).resolve()),
               "pivot": str(pivot or "pivot"), "sources": [k.removeprefix("source:") for k in by_label
                                                           if k.startswith("source:")],
               "evals": by_label, "checkpoints": ckpts, "timings": {}, "samples": {}, "runs": {},
               "assembled_by": "infifpo report --eval"}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path = Path(run_dir) / "pipeline_outputs.json"
    atomic_write(path, json.dumps(outputs, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    """`infifpo report --run_dir runs/<name>`: prints the report.md path; a bad input exits 1 with its message (a bad
    option is a ConfigError, as in every stage)."""
    opts = parse_config(ReportOptions, argv, prog="infifpo report",
                        description="Paper-style table, costs and plots of a run.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if opts.checkpoint and not opts.eval:
        raise ConfigError("--checkpoint goes with --eval (a pipeline run's checkpoints are in its outputs file).")
    if opts.eval:
        assemble_outputs(opts.run_dir, opts.eval, opts.checkpoint)
    try:
        path = write_report(opts.run_dir)
    except InfiFPOError as e:
        print(f"infifpo report: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
