"""report.md of `infifpo report`: the results table, the survey metrics, the ablation table, the comparison paragraph
with its power statement, the fusion diagnostics, cost accounting, plots and notes, rendered from the report dict that
``infifpo.report.build_report`` returns (report.json). Owns the wording and Markdown layout only; every number comes
from the report dict. An ordering is claimed only where the comparison's 95 % interval excludes zero.
"""

from __future__ import annotations

from typing import Any

DASH = "—"
AVERAGE_NAMES = {"avg": "Avg", "math_avg": "Math avg", "code_avg": "Code avg"}


def _ci(c: dict[str, Any]) -> str:
    return f" (95 % CI [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}], {c['method']})" if c["ci95"] else \
        f" ({c['method']})"


def _verdict(c: dict[str, Any]) -> str:
    """One difference (A - B, points) with its interval and what it allows to say."""
    if c["distinguishable"] is None:
        tail = "no per-item rows to put a CI on it, so no ordering is claimed"
    elif c["distinguishable"]:
        tail = "the interval excludes zero"
    else:
        tail = "not distinguishable at this sample size"
    return f"{c['diff']:+.1f} points{_ci(c)}: {tail}"


def _headline(c: dict[str, Any], avg: str) -> str:
    a, b, d = c["method"], c["baseline"], c[avg]
    where = AVERAGE_NAMES[avg]
    if d["distinguishable"]:
        order = "ahead of" if d["diff"] > 0 else "behind"
        return f"{a} is {order} {b} on {where}: {_verdict(d)} ({a} − {b})."
    if d["distinguishable"] is None:
        return f"{a} vs {b} on {where}: {_verdict(d)} ({a} − {b})."
    return f"{a} and {b} are not distinguishable on {where}: {d['diff']:+.1f} points{_ci(d)} ({a} − {b})."


def comparison_text(comparisons: list[dict[str, Any]]) -> str:
    """The paragraph under the table: each stated comparison on Avg (then Math / Code avg and each benchmark), with an
    ordering only where the 95 % interval of the difference excludes zero."""
    if not comparisons:
        return "No comparison could be made: a method or its eval is missing."
    lines = []
    for c in comparisons:
        if c["avg"] is None:
            lines.append(f"- {c['method']} vs {c['baseline']}: Avg not comparable (an eval or a benchmark is "
                         "missing).")
        else:
            lines.append(f"- {_headline(c, 'avg')}")
        lines += [f"  - {AVERAGE_NAMES[k]}: {_verdict(c[k])}." for k in ("math_avg", "code_avg") if c.get(k)]
        lines += [f"  - {k}: {_verdict(v)}." for k, v in c["benchmarks"].items()]
    return "\n".join(lines)


def _num(x: float | None, fmt: str = ".1f") -> str:
    return DASH if x is None else format(x, fmt)


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(DASH if c is None else str(c) for c in r) + " |" for r in rows)]


def _cell(v: dict[str, Any] | None) -> str | None:
    if not v:
        return None
    return f"{v['accuracy']:.1f} [{v['ci95'][0]:.1f}, {v['ci95'][1]:.1f}]" if v.get("ci95") else f"{v['accuracy']:.1f}"


def _avg_cell(r: dict[str, Any], avg: str) -> str:
    ci = r.get(f"{avg}_ci95")
    return DASH if r[avg] is None else f"{r[avg]:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{r[avg]:.1f}"


def _seeds(r: dict[str, Any]) -> int | None:
    return len(r.get("per_seed") or []) or None


def _table_md(table: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> list[str]:
    return _md_table(["Model", *table["columns"]], [
        [r["name"], *(_cell(v) for v in r["benchmarks"].values()), *(_avg_cell(r, a) for a in AVERAGE_NAMES),
         _seeds(r), r["size"], _num(r["compute_hours"], ".3g")] for r in (rows or table["rows"])])


def _domains_text(table: dict[str, Any]) -> str:
    by = {d: [b for b, v in table["domains"].items() if v["domain"] == d] for d in ("math", "code", "general")}
    unknown = [b for b, v in table["domains"].items() if v["domain"] is None]
    math, code, general = (", ".join(by[d]) or DASH for d in ("math", "code", "general"))
    text = f"Math avg = mean over {math}; Code avg = mean over {code}; general: {general}"
    return text + (f"; domain unknown: {', '.join(unknown)}." if unknown else ".")


def _survey_md(table: dict[str, Any], arms: list[dict[str, Any]]) -> list[str]:
    def frac(s: dict[str, Any], key: str) -> str:
        extra = f" (+{s['degraded_undetermined']} without interval)" if key == "ci" and s["degraded_undetermined"] \
            else ""
        return f"{s[f'degraded_{key}']}/{s['compared']}{extra}" if s["compared"] else DASH

    rows = []
    for r in [*table["rows"], *arms]:
        s = r["survey"]
        worst = f"{s['worst_drop']:+.1f} ({s['worst_drop_benchmark']})" if s["worst_drop"] is not None else None
        rows.append([r["name"], _num(s["retention_avg"]), worst, frac(s, "ci"), frac(s, "raw")])
    best = ", ".join(f"{b}: {k.removeprefix('source:') if k else DASH}" for b, k in table["best_source"].items())
    return ["### Fusion survey metrics", "", *_md_table(
        ["Model", "Retention, % of best source (avg)", "Worst drop vs pivot, points (benchmark)",
         "Degraded vs pivot beyond the 95 % CI", "Degraded vs pivot (raw)"], rows), "",
            "Retention = 100 × accuracy / best source's accuracy per benchmark, averaged over benchmarks (best "
            f"source: {best or DASH}); worst drop = min over benchmarks of (row − pivot); degraded = benchmarks where "
            "the row is below the pivot, beyond the paired 95 % interval / raw, out of the benchmarks compared."]


def _changes(r: dict[str, Any]) -> str:
    ch = r.get("changes")
    if ch is None:
        return DASH if not r.get("overrides") else ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
    return ", ".join(f"{k}={v[1]}" for k, v in ch.items()) or "(no option differs)"


def _ablation_md(report: dict[str, Any]) -> list[str]:
    abl = report.get("ablation")
    if not abl:
        return []
    table = report["table"]
    default = next((r for r in table["rows"] if r["key"] == abl["default"]), None)
    cmp = {c["a"]: c for c in abl["comparisons"]}
    rows = []
    for r in [*([default] if default else []), *abl["rows"]]:
        c = cmp.get(r["key"])
        d = c and c["avg"]
        delta = (f"{d['diff']:+.1f}" + (f" [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d["ci95"] else "")) \
            if d else None
        verdict = None if not d else "excludes 0" if d["distinguishable"] else \
            "not distinguishable" if d["distinguishable"] is False else "no interval"
        rows.append([r["name"], "default" if r is default else _changes(r),
                     *(_cell(v) for v in r["benchmarks"].values()), *(_avg_cell(r, a) for a in AVERAGE_NAMES),
                     _seeds(r), delta, verdict])
    return ["## Ablation: InfiFPO arms vs the default InfiFPO", "", *_md_table(
        ["Arm", "Changes", *table["benchmarks"], *AVERAGE_NAMES.values(), "Seeds", "Δ Avg vs default [95 % CI]",
         "Verdict"], rows), "", comparison_text(abl["comparisons"]) if abl["comparisons"] else
        "No default InfiFPO run to compare the arms with.", ""]


def _grid_md(grid: dict[str, Any] | None) -> list[str]:
    """The hyper-parameters each method trained with, chosen on the dev split (pipeline ``train.grid``)."""
    if not grid:
        return []
    dev = ", ".join(f"{d['source']}:{d['split']} rows {d['offset']}-{d['offset'] + d['n'] - 1}" for d in grid["dev"])
    rows = [[m, ", ".join(f"{k}={v}" for k, v in p["overrides"].items()),
             f"{p['dev_accuracy']:.1f} ({p['dev_correct']}/{p['dev_n']})", "chosen" if p["label"] ==
             g["chosen_label"] else ""] for m, g in grid["methods"].items() for p in g["points"]]
    return ["## Hyper-parameters chosen on the dev split", "",
            f"Each method's grid, trained with the first seed and evaluated greedily on a dev split held out from the "
            f"training prompts ({dev} of the prompts' seeded order; never the test items). The chosen values train "
            "every seed of the method (the ablation arms start from InfiFPO's); ties go to the first point.", "",
            *_md_table(["Method", "Values", "Dev accuracy, % (correct/n)", ""], rows), ""]


def _power_md(power: dict[str, Any]) -> list[str]:
    rows = [[AVERAGE_NAMES.get(k, k), v["n_items"], _num(v["floor"]), len(v["half_width"]) or None,
             None if v["min"] is None else f"{v['min']:.1f}–{v['max']:.1f}",
             len(v["degenerate"]) or None] for k, v in power["rows"].items()]
    return ["### Power", "", *_md_table(["Benchmark", "Items", "Floor, points (one seed)",
                                         "Comparisons with an interval", "Half-width, points (min–max)",
                                         "Degenerate (rows agree on every item)"], rows), "",
            "Resolvable difference = " + power["definition"] + "."]


def _share(v: dict[str, Any] | None) -> str:
    return DASH if v is None else f"{v['final']:.2f} / {v['mean']:.2f}"


def _fusion_md(fusion: list[dict[str, Any]]) -> list[str]:
    if not fusion:
        return []
    rows = []
    for f in fusion:
        names = list(dict.fromkeys([*f["shares"]["chosen"], *f["shares"]["rejected"]]))
        chosen, rejected = f["shares"]["chosen"], f["shares"]["rejected"]
        shares = "; ".join(f"{n}: y_w {_share(chosen.get(n))}, y_l {_share(rejected.get(n))}" for n in names)
        rows.append([f["label"], f["seed"], shares or None, _share(f["clip_rate"])])
    return ["## Fusion diagnostics (every InfiFPO run)", "", *_md_table(
        ["Run", "Seed", "Share of the fused reference per model (final / mean)", "Clip rate (final / mean)"], rows),
            "",
            "Share = fraction of pairs whose fused reference of y_w (chosen) or y_l (rejected) came from that model; "
            "clip rate = fraction of source values the clipping changed; final = last logged value, mean = mean over "
            "the logged entries.", ""]


def _cost_md(cost: dict[str, Any]) -> list[str]:
    lines = ["## Cost accounting", "", "### Fusion overhead: InfiFPO's whole cost vs SFT-DPO with a live reference",
             ""]
    fo = cost["fusion_overhead"]
    if fo is None:
        lines.append(f"{DASH} (needs score_stats.json and the InfiFPO and DPO train logs; see Notes)")
    else:
        p = fo["precision"]
        lines += _md_table(["part", "wall seconds", "share of InfiFPO", "s per 1k tokens scored"], [
            *([w["part"], f"{w['seconds']:.1f}", f"{100 * w['share']:.0f} %", _num(w["s_per_1k_tokens"], ".3g")]
              for w in fo["where"]),
            ["**InfiFPO total** (scoring + training)", f"{fo['infifpo_total_s']:.1f}", "100 %", ""],
            ["**SFT-DPO training** (live reference)", f"{fo['dpo_train_s']:.1f}", "", ""]])
        lines += ["",
                  f"**Ratio {_num(fo['ratio'], '.2f')}x** (target <= {fo['target']}x: "
                  f"{'met' if fo['ratio'] is not None and fo['ratio'] <= fo['target'] else 'NOT met'}). "
                  f"Including model loading and trainer setup: {fo['infifpo_total_with_setup_s']:.1f} s vs "
                  f"{fo['dpo_total_with_setup_s']:.1f} s = {_num(fo['ratio_with_setup'], '.2f')}x.",
                  f"Precision as logged: InfiFPO training {p['infifpo_training']}, DPO training {p['dpo_training']}, "
                  f"scoring {', '.join(p['scoring'])}"
                  + ("" if fo["equal_precision"] else " (NOT equal precision)") + "."]
    lines += _arm_costs_md(cost.get("arms") or [])
    lines += ["", "### Wall time per stage", "", *_md_table(["stage", "model", "seconds"], [
        *([t["label"], t["model"] or "", f"{t['seconds']:.1f}"] for t in cost["timings"]),
        ["**total**", "", f"{cost['total_s']:.1f}"]])]
    lines += ["", "### Tokens sampled per model", "", *_md_table(["model", "samples", "tokens generated"], [
        [m, v and v["samples"], v and v["tokens"]] for m, v in cost["tokens_sampled"].items()])]
    lines += ["", "### Tokens scored per model", ""]
    if cost["scoring"] is None:
        return [*lines, DASH]
    return lines + _md_table(
        ["model", "role", "responses", "response tokens", "prompt tokens", "seconds", "load seconds",
         "s per 1k tokens", "backend / dtype"],
        [[m["model"], m.get("role"), m.get("responses"), m["tokens"], m.get("prompt_tokens"), f"{m['seconds']:.1f}",
          _num(m.get("load_seconds")), _num(m["s_per_1k_tokens"], ".3g"), f"{m.get('backend')} / {m.get('dtype')}"]
         for m in cost["scoring"]])


def _arm_costs_md(arms: list[dict[str, Any]]) -> list[str]:
    """The cost of each ablation arm (report.arm_costs)."""
    if not arms:
        return []
    rows = [[a["name"], len(a["training_runs"]), ", ".join(f"{r}{' (shared)' if r in a['shared'] else ''}"
                                                           for r in a["training_runs"]),
             a["merge"] or "none", f"{a['extra_scoring_s']:.0f}", _num(a["own_seconds"]),
             _num(a["compute_seconds"] and a["compute_seconds"] / 3600, ".3g")] for a in arms]
    return ["", "### Ablation arms: what each costs", "", *_md_table(
        ["Arm", "Training runs per seed", "Runs (first seed)", "Merge", "Extra scoring, s",
         "Own wall seconds (runs + merge, mean over seeds)", "Compute hours (with SFT and scoring)"], rows), "",
            "Every arm trains on the default InfiFPO's scored pairs (no extra scoring). A pairwise arm trains one "
            "InfiFPO run per source and merges them; a run shared with another arm (trained once) counts in each "
            "arm's cost, as if each ran alone."]


def _profile_md(profile: list[dict[str, Any]]) -> list[str]:
    """The output profile (report.output_profile): how each row's greedy answers look, per benchmark."""
    if not profile:
        return []
    rows = [[p["row"], p["benchmark"], p["n"], _num(p["median_tokens"], ".0f"), _num(p["mean_tokens"], ".0f"),
             _num(p["truncated_pct"]), _num(p["answer_line_pct"]), _num(p["working_pct"])] for p in profile]
    return ["## How each model answers", "",
            *_md_table(["Model", "Benchmark", "Items", "Median tokens", "Mean tokens", "% cut at the cap",
                        "% with 'The answer is'", "% showing working (math)"], rows), "",
            "Greedy completions of the first seed. Working = at least 20 characters besides the answer line.", ""]


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the results table, survey metrics, ablation, comparisons with power, fusion diagnostics, cost
    accounting, linked plots and notes."""
    table = report["table"]
    lines = [f"# InfiFPO run report: {report['name']}", "", "## Results (InfiFPO paper Table 2 layout)", "",
             *_table_md(table), "",
             "Accuracy in %: one seed with the Wilson 95 % interval; several seeds as the mean over seeds with the "
             "95 % interval of a bootstrap over items and seeds (per-seed values in report.json, rows[].per_seed). "
             "Avg = mean over benchmarks; " + _domains_text(table) + " Averages carry the bootstrap interval over "
             "items (and seeds) when per-item rows exist. Size = parameters; compute hours = training-side wall hours "
             "(SFT = train/sft; SFT-DPO = + train/dpo; SFT-WRPO = + train/wrpo, from WRPO's own SFT and second "
             "sampling pass when the run has them; InfiFPO = + score + train/infifpo; a pairwise arm = + score + its "
             "per-source runs + its merge), mean over seeds. " + DASH +
             " = not available.", "", *_survey_md(table, (report.get("ablation") or {}).get("rows") or []), "",
             "## Comparisons", "", comparison_text(report["comparisons"]), "", *_power_md(report["power"]), "",
             *_grid_md(report.get("grid")), *_ablation_md(report), *_fusion_md(report.get("fusion") or []),
             *_profile_md(report.get("output_profile") or []), *_cost_md(report["cost"]), "",
             "## Training curves", ""]
    titles = {"loss": "Training loss per method", "reward_margin": "Reward margin per method",
              "fusion_shares": "Share of each model in the fused reference (InfiFPO)"}
    for key, path in report["plots"].items():
        lines += [f"![{titles[key]}]({path})", ""] if path else [f"{titles[key]}: omitted (see Notes).", ""]
    lines += ["## Notes", "", *([f"- {n}" for n in report["notes"]] or ["- every input was present."])]
    return "\n".join(lines) + "\n"
