"""report.md of `infifpo report`: the results table, the InfiFPO-vs-baselines paragraph, cost accounting, plots and
notes, rendered from the report dict that ``infifpo.report.build_report`` returns (report.json). Owns the wording and
Markdown layout only; every number comes from the report dict.
"""

from __future__ import annotations

from typing import Any

DASH = "—"


def _verdict(c: dict[str, Any]) -> str:
    ci = f" (95 % CI [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}], {c['method']})" if c["ci95"] else f" ({c['method']})"
    if c["distinguishable"] is None:
        tail = "no per-item rows to put a CI on it"
    elif c["distinguishable"]:
        tail = "larger than the confidence interval"
    else:
        tail = "not distinguishable at this sample size"
    return f"{c['diff']:+.1f} points{ci}: {tail}"


def comparison_text(comparisons: list[dict[str, Any]]) -> str:
    """The paragraph under the table: is InfiFPO ahead of each baseline on Avg, and beyond the CIs per benchmark."""
    if not comparisons:
        return "InfiFPO could not be compared with SFT-DPO / SFT-WRPO: a method or its eval is missing."
    lines = []
    for c in comparisons:
        if c["avg"] is None:
            lines.append(f"- InfiFPO vs {c['baseline']}: Avg not comparable (an eval or a benchmark is missing).")
        else:
            ahead = "ahead of" if c["avg"]["diff"] > 0 else "behind" if c["avg"]["diff"] < 0 else "level with"
            lines.append(f"- InfiFPO is {ahead} {c['baseline']} on Avg: {_verdict(c['avg'])} (InfiFPO − baseline).")
        lines += [f"  - {k}: {_verdict(v)}." for k, v in c["benchmarks"].items()]
    return "\n".join(lines)


def _num(x: float | None, fmt: str = ".1f") -> str:
    return DASH if x is None else format(x, fmt)


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(DASH if c is None else str(c) for c in r) + " |" for r in rows)]


def _table_md(table: dict[str, Any]) -> list[str]:
    cell = "{0[accuracy]:.1f} [{0[ci95][0]:.1f}, {0[ci95][1]:.1f}]".format
    return _md_table(["Model", *table["columns"]], [
        [r["name"], *(v and cell(v) for v in r["benchmarks"].values()), _num(r["avg"]), r["size"],
         _num(r["compute_hours"], ".3g")] for r in table["rows"]])


def _cost_md(cost: dict[str, Any]) -> list[str]:
    lines = ["## Cost accounting", "", "### Fusion overhead: InfiFPO's whole cost vs SFT-DPO with a live reference", ""]
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
                  f"scoring {', '.join(p['scoring'])}" + ("" if fo["equal_precision"] else " (NOT equal precision)") + "."]
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


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the results table, the comparison paragraph, cost accounting, linked plots and notes."""
    lines = [f"# InfiFPO run report: {report['name']}", "", "## Results (InfiFPO paper Table 2 layout)", "",
             *_table_md(report["table"]), "",
             "Accuracy in % with the Wilson 95 % interval; Avg = mean over benchmarks; Size = parameters; compute "
             "hours = training-side wall hours (SFT = train/sft; SFT-DPO = + train/dpo; SFT-WRPO = + train/wrpo; "
             "InfiFPO = + score + train/infifpo). " + DASH + " = not available.", "",
             comparison_text(report["comparisons"]), "", *_cost_md(report["cost"]), "", "## Training curves", ""]
    titles = {"loss": "Training loss per method", "reward_margin": "Reward margin per method",
              "fusion_shares": "Share of each model in the fused reference (InfiFPO)"}
    for key, path in report["plots"].items():
        lines += [f"![{titles[key]}]({path})", ""] if path else [f"{titles[key]}: omitted (see Notes).", ""]
    lines += ["## Notes", "", *([f"- {n}" for n in report["notes"]] or ["- every input was present."])]
    return "\n".join(lines) + "\n"
