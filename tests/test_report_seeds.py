"""`infifpo report` on a synthetic run with training seeds and InfiFPO ablation arms (pipeline_outputs' ``runs`` and
"@seed<k>" / "infifpo[<arm>]" labels), and on benchmarks whose domain comes from different places.

Eval outputs are real ``store.StageOutput`` directories with known per-item verdicts (``tests.test_report`` helpers);
every expected number is worked out by hand in the comments.
"""

from __future__ import annotations

import json

import pytest

from infifpo.eval.stats import seed_item_bootstrap
from infifpo.report import markdown as report_markdown
from infifpo.report import stage as report
from tests.test_report import SOURCES, build_run, first_k, wilson

A, B = (f"source:{m}" for m in SOURCES)  # source:org/SrcA-500M, source:org/SrcB-270M
GSM_FPO = [i in (0, 1, 2, 3, 4, 6) for i in range(10)]  # 6/10; against GSM_WRPO: item 6 for InfiFPO, 5 for WRPO
GSM_WRPO = first_k(6, 10)


def _v(gsm: list[bool], arith: int, he: int) -> dict[str, list[bool]]:
    """gsm8k verdicts (10 items), and the first ``arith`` of 20 arithmetic and ``he`` of 10 humaneval items right."""
    return {"gsm8k": gsm, "arithmetic": first_k(arith, 20), "humaneval": first_k(he, 10)}


VERDICTS = {
    "pivot": _v(first_k(5, 10), 10, 2), A: _v(first_k(4, 10), 16, 8), B: _v(first_k(8, 10), 4, 0),
    "sft": _v(first_k(0, 10), 9, 4),
    "dpo": _v(first_k(5, 10), 6, 4), "dpo@seed1": _v(first_k(7, 10), 10, 4),
    "wrpo": _v(GSM_WRPO, 12, 4),
    "infifpo": _v(GSM_FPO, 16, 10), "infifpo@seed1": _v(GSM_FPO, 18, 10), "infifpo@seed2": _v(GSM_FPO, 20, 10),
    "infifpo[mean]": _v(GSM_FPO, 10, 10), "infifpo[mean]@seed1": _v(GSM_FPO, 12, 10),
    "infifpo[noclip]": _v(GSM_FPO, 16, 10),
}
TRAIN_S = {"sft": 360.0, "dpo": 720.0, "dpo@seed1": 780.0, "wrpo": 900.0, "infifpo": 540.0, "infifpo@seed1": 600.0,
           "infifpo@seed2": 660.0, "infifpo[mean]": 500.0, "infifpo[mean]@seed1": 520.0, "infifpo[noclip]": 530.0}
SEEDS = {"": 42, "@seed1": 1, "@seed2": 2}  # the first seed is 42 and keeps the unsuffixed labels
ARMS = {"mean": {"fusion_method": "mean"}, "noclip": {"clip": False}}


def _runs() -> dict:
    runs = {}
    for label in TRAIN_S:
        group, _, k = label.partition("@")
        method, _, arm = group.partition("[")
        arm = arm.rstrip("]") or None
        runs[label] = {"method": method, "seed": SEEDS["@" + k if k else ""], "arm": arm,
                       "overrides": ARMS.get(arm, {})}
    return runs


@pytest.fixture
def seeds_run(tmp_path, monkeypatch):
    timings = {"score": 180.0, **{f"train/{k}": v for k, v in TRAIN_S.items()}}
    trained = {label: (label.split("@")[0].split("[")[0], s, 10.0) for label, s in TRAIN_S.items()}
    return build_run(tmp_path, monkeypatch, verdicts=VERDICTS, trained=trained, timings=timings, runs=_runs())


def _rows(rep: dict) -> dict:
    return {r["key"]: r for r in [*rep["table"]["rows"], *(rep["ablation"] or {}).get("rows", [])]}


def _cmp(comparisons: list[dict], a: str, b: str) -> dict:
    return next(c for c in comparisons if c["a"] == a and c["b"] == b)


def test_one_row_per_method_with_seed_means_and_per_seed_values(seeds_run):
    rep = report.build_report(seeds_run)
    assert [r["key"] for r in rep["table"]["rows"]] == ["pivot", A, B, "sft", "dpo", "wrpo", "infifpo"]
    rows = _rows(rep)
    fpo, dpo = rows["infifpo"], rows["dpo"]
    assert fpo["labels"] == ["infifpo", "infifpo@seed1", "infifpo@seed2"] and fpo["seeds"] == [42, 1, 2]
    # arithmetic 16, 18, 20 of 20 -> 80, 90, 100 -> mean 90; gsm8k 6/10 on every seed; humaneval 10/10
    assert fpo["benchmarks"]["arithmetic"]["seed_accuracies"] == [80.0, 90.0, 100.0]
    assert fpo["benchmarks"]["arithmetic"]["accuracy"] == pytest.approx(90.0)
    assert fpo["avg"] == pytest.approx((60 + 90 + 100) / 3) and fpo["math_avg"] == pytest.approx((60 + 90) / 2)
    assert fpo["code_avg"] == pytest.approx(100.0)
    assert [s["avg"] for s in fpo["per_seed"]] == pytest.approx([(60 + 80 + 100) / 3, (60 + 90 + 100) / 3,
                                                                 (60 + 100 + 100) / 3])
    assert [s["seed"] for s in fpo["per_seed"]] == [42, 1, 2]
    # DPO: gsm8k 5 and 7 of 10 -> 60, arithmetic 6 and 10 of 20 -> 40, humaneval 4/10 on both -> 40
    assert [dpo["benchmarks"][b]["accuracy"] for b in ("gsm8k", "arithmetic", "humaneval")] == \
        pytest.approx([60.0, 40.0, 40.0])
    assert (dpo["avg"], dpo["math_avg"], dpo["code_avg"]) == pytest.approx((140 / 3, 50.0, 40.0))
    # one-seed rows keep the eval's Wilson interval
    assert rows["wrpo"]["benchmarks"]["arithmetic"]["ci95"] == pytest.approx(wilson(12, 20))
    assert rows["wrpo"]["benchmarks"]["arithmetic"]["ci_method"] == "wilson"
    # compute hours: mean over seeds of train/sft + train/<label> (+ score for InfiFPO)
    assert dpo["compute_seconds"] == pytest.approx(((360 + 720) + (360 + 780)) / 2)
    assert fpo["compute_seconds"] == pytest.approx(360 + 180 + (540 + 600 + 660) / 3)
    assert rows["infifpo[mean]"]["compute_seconds"] == pytest.approx(360 + 180 + (500 + 520) / 2)
    assert rep["table"]["domains"]["humaneval"] == {"domain": "code", "from": "prompt loader"}


def test_multi_seed_intervals_resample_items_and_seeds(seeds_run):
    rows = _rows(report.build_report(seeds_run))
    fpo = rows["infifpo"]["benchmarks"]
    # every seed gives the same verdicts on humaneval (all right) and gsm8k: one model's verdicts, the Wilson interval
    # (the bootstrap's would be the point [100, 100] on humaneval)
    assert fpo["humaneval"]["ci95"] == pytest.approx(wilson(10, 10)) and fpo["gsm8k"]["ci95"] == \
        pytest.approx(wilson(6, 10))
    assert fpo["humaneval"]["ci_method"] == "wilson (every seed agrees on every item)"
    assert rows["infifpo"]["code_avg_ci95"] == fpo["humaneval"]["ci95"]  # Code avg = humaneval alone
    assert fpo["arithmetic"]["ci_method"] == "bootstrap over items and seeds" and fpo["arithmetic"]["n"] == 20
    # the report hands the bootstrap the seeds x items matrix written above (item ids sorted)
    matrix = [first_k(k, 20) for k in (16, 18, 20)]
    assert fpo["arithmetic"]["ci95"] == pytest.approx(list(seed_item_bootstrap([matrix], resamples=10_000)[1:]))
    assert fpo["arithmetic"]["ci95"][0] < 90.0 < fpo["arithmetic"]["ci95"][1]


def test_stated_comparisons_claim_an_order_only_beyond_the_interval(seeds_run):
    rep = report.build_report(seeds_run)
    cmps = rep["comparisons"]
    assert [(c["a"], c["b"]) for c in cmps] == [("infifpo", "dpo"), ("infifpo", "wrpo"), ("dpo", "sft"),
                                                 ("wrpo", "sft"), ("infifpo", "sft"), ("sft", "pivot")]
    vs_wrpo = _cmp(cmps, "infifpo", "wrpo")
    # gsm8k: item 6 for InfiFPO (every seed), item 5 for WRPO: difference 0, the interval straddles 0
    gsm = vs_wrpo["benchmarks"]["gsm8k"]
    assert gsm["diff"] == 0.0 and gsm["ci95"][0] < 0 < gsm["ci95"][1] and gsm["distinguishable"] is False
    assert gsm["seeds"] == [3, 1] and gsm["method"] == "paired bootstrap over items and seeds"
    # humaneval vs DPO: InfiFPO right everywhere, DPO (both seeds) on items 0-3 only: +60, every replicate > 0
    # unless no item 4-9 is drawn (0.4^10 = 1e-4)
    he = _cmp(cmps, "infifpo", "dpo")["benchmarks"]["humaneval"]
    assert he["diff"] == pytest.approx(60.0) and he["ci95"][0] > 0 and he["distinguishable"] is True
    text = report_markdown.comparison_text(cmps)
    assert "  - gsm8k: +0.0 points (95 % CI [" in text
    line = next(x for x in text.splitlines() if x.startswith("  - gsm8k: +0.0"))
    assert line.endswith("not distinguishable at this sample size.")
    # SFT - pivot: arithmetic 9 vs 10 of 20 (one discordant item: a replicate is 0 with probability 0.95^20 = 0.36,
    # so the upper bound is 0): raw drop, not beyond the interval; gsm8k 0 vs 5 of 10 is
    sft = _cmp(cmps, "sft", "pivot")["benchmarks"]
    assert sft["arithmetic"]["ci95"][1] == 0.0 and sft["arithmetic"]["distinguishable"] is False
    assert sft["gsm8k"]["ci95"][1] < 0 and sft["gsm8k"]["distinguishable"] is True
    # Avg: SFT (0 + 45 + 40) / 3 vs pivot (50 + 50 + 20) / 3; the headline orders them only if the interval allows
    avg = _cmp(cmps, "sft", "pivot")["avg"]
    assert avg["diff"] == pytest.approx(-35 / 3)
    ordered = "SFT is behind Pivot-135M (pivot) on Avg: -11.7 points"
    assert (ordered in text) is avg["distinguishable"] and (avg["ci95"][1] < 0) is avg["distinguishable"]
    if not avg["distinguishable"]:
        assert "SFT and Pivot-135M (pivot) are not distinguishable on Avg: -11.7 points" in text


def test_ablation_arms_against_the_default_with_seed_resampling(seeds_run):
    rep = report.build_report(seeds_run)
    abl = rep["ablation"]
    assert abl["default"] == "infifpo" and abl["arms"] == ["infifpo[mean]", "infifpo[noclip]"]
    arms = {r["key"]: r for r in abl["rows"]}
    assert arms["infifpo[mean]"]["changes"] == {"fusion_method": [None, "mean"]}
    assert arms["infifpo[noclip]"]["changes"] == {"clip": [None, False]} and arms["infifpo[noclip]"]["seeds"] == [42]
    assert arms["infifpo[mean]"]["benchmarks"]["arithmetic"]["accuracy"] == pytest.approx(55.0)  # 10, 12 of 20
    mean_arm, noclip = _cmp(abl["comparisons"], "infifpo[mean]", "infifpo"), \
        _cmp(abl["comparisons"], "infifpo[noclip]", "infifpo")
    # [mean]: arithmetic 55 - 90 = -35, the other two equal: Avg -35/3; every arm seed is below every default seed
    assert mean_arm["avg"]["diff"] == pytest.approx(-35 / 3) and mean_arm["avg"]["distinguishable"] is True
    assert mean_arm["benchmarks"]["gsm8k"] == {**mean_arm["benchmarks"]["gsm8k"], "diff": 0.0, "ci95": [0.0, 0.0]}
    # [noclip] (one seed = the default's first seed) vs the default's seeds 16, 18, 20 of 20: a replicate is <= 0, and
    # exactly 0 whenever the three default seeds drawn are all the first one (1/27 = 3.7 % > 2.5 %), on every
    # benchmark at once (one seed draw per replicate): the upper bound is 0, no ordering. Items alone would have
    # separated them (no item 16-19 drawn: 0.8^20 = 1.2 % < 2.5 %).
    assert noclip["avg"]["diff"] == pytest.approx(-10 / 3)
    assert noclip["avg"]["ci95"][1] == 0.0 and noclip["avg"]["distinguishable"] is False
    assert noclip["benchmarks"]["arithmetic"]["ci95"][1] == 0.0
    md = report_markdown.render_markdown(rep)
    assert "InfiFPO [mean] is behind InfiFPO on Avg: -11.7 points" in md
    assert "InfiFPO [noclip] and InfiFPO are not distinguishable on Avg: -3.3 points" in md
    ablation_md = md[md.index("## Ablation"):]
    assert "| InfiFPO [noclip] | clip=False |" in ablation_md and "| InfiFPO | default |" in ablation_md
    assert "| InfiFPO [mean] |" not in md[:md.index("### Fusion survey")]  # arms stay out of the main table


def test_survey_metrics_by_hand(seeds_run):
    rep = report.build_report(seeds_run)
    rows = _rows(rep)
    # best source: gsm8k SrcB 80, arithmetic SrcA 80, humaneval SrcA 80; pivot 50, 50, 20
    assert rep["table"]["best_source"] == {"gsm8k": B, "arithmetic": A, "humaneval": A}
    sft = rows["sft"]["survey"]  # SFT 0, 45, 40
    assert sft["retention"] == pytest.approx({"gsm8k": 0.0, "arithmetic": 56.25, "humaneval": 50.0})
    assert sft["retention_avg"] == pytest.approx((0 + 56.25 + 50) / 3)
    assert (sft["worst_drop"], sft["worst_drop_benchmark"]) == (pytest.approx(-50.0), "gsm8k")
    # raw: gsm8k and arithmetic below the pivot; beyond the interval only gsm8k (see the comparison test)
    assert (sft["degraded_raw"], sft["degraded_ci"], sft["compared"]) == (2, 1, 3)
    fpo = rows["infifpo"]["survey"]  # 60, 90, 100
    assert fpo["retention_avg"] == pytest.approx((60 / 80 + 90 / 80 + 100 / 80) * 100 / 3)
    assert (fpo["worst_drop"], fpo["worst_drop_benchmark"]) == (pytest.approx(10.0), "gsm8k")
    assert fpo["share_degraded_raw"] == 0.0 and fpo["share_degraded_ci"] == 0.0
    md = report_markdown.render_markdown(rep)
    assert "| SFT | 35.4 | -50.0 (gsm8k) | 1/3 | 2/3 |" in md


def test_power_and_fusion_diagnostics(seeds_run):
    rep = report.build_report(seeds_run)
    pw = rep["power"]["rows"]
    # floors: 10 items -> 4 of 10 = 40 points, 20 items -> 4 of 20 = 20 points; none for averages
    assert (pw["gsm8k"]["floor"], pw["arithmetic"]["floor"], pw["humaneval"]["floor"]) == (40.0, 20.0, 40.0)
    assert pw["avg"]["floor"] is None and pw["avg"]["n_items"] == 40
    hw = pw["gsm8k"]["half_width"]
    c = _cmp(rep["comparisons"], "infifpo", "wrpo")["benchmarks"]["gsm8k"]
    assert hw["InfiFPO vs SFT-WRPO"] == pytest.approx((c["ci95"][1] - c["ci95"][0]) / 2)
    assert "InfiFPO [mean] vs InfiFPO" in pw["gsm8k"]["degenerate"]  # same verdicts: a point interval
    assert pw["gsm8k"]["min"] == min(v for v in hw.values() if v > 0)
    fusion = {f["label"]: f for f in rep["fusion"]}
    assert list(fusion) == ["infifpo", "infifpo@seed1", "infifpo@seed2", "infifpo[mean]", "infifpo[mean]@seed1",
                            "infifpo[noclip]"]
    f = fusion["infifpo@seed1"]
    # clip rate 0.1 * step over steps 1-4: final 0.4, mean 0.25; chosen SrcA 0.25 * (step % 3): 0.25, 0.5, 0, 0.25
    assert (f["seed"], f["arm"], f["row"]) == (1, None, "infifpo")
    assert (f["clip_rate"]["final"], f["clip_rate"]["mean"]) == pytest.approx((0.4, 0.25))
    assert (f["shares"]["chosen"]["SrcA-500M"]["final"], f["shares"]["chosen"]["SrcA-500M"]["mean"]) == \
        pytest.approx((0.25, 0.25))
    assert f["shares"]["rejected"]["SrcB-270M"]["final"] == pytest.approx(0.4)
    assert f["shares"]["rejected"]["pivot"] is None  # never logged for y_l
    assert fusion["infifpo[mean]"]["arm"] == "mean"
    md = report.write_report(seeds_run).read_text()
    assert "| infifpo@seed1 | 1 | SrcA-500M: y_w 0.25 / 0.25, y_l 0.50 / 0.50; pivot: y_w 0.50 / 0.50, y_l —; " \
           "SrcB-270M: y_w —, y_l 0.40 / 0.25 | 0.40 / 0.25 |" in md
    assert "| gsm8k | 10 | 40.0 |" in md
    saved = json.loads((seeds_run / "report.json").read_text())
    assert saved["table"]["rows"][-1]["per_seed"][2]["label"] == "infifpo@seed2"


def test_seed_labels_without_runs_still_group(seeds_run):
    out = json.loads((seeds_run / "pipeline_outputs.json").read_text())
    del out["runs"]
    (seeds_run / "pipeline_outputs.json").write_text(json.dumps(out))
    rows = _rows(report.build_report(seeds_run))
    assert rows["infifpo"]["seeds"] == [None, 1, 2] and rows["infifpo[mean]"]["seeds"] == [None, 1]
    assert rows["infifpo[mean]"]["changes"] is None and rows["infifpo"]["avg"] == pytest.approx(250 / 3)


def test_domains_from_scores_lm_eval_names_and_unknown(tmp_path, monkeypatch):
    """arithmetic: its prompt loader (math); "jsonl:chat": the domain in scores.json (code); lm-eval entries (no
    rows, ci_method "normal"): "minerva_math_algebra" is math, "ifeval" general; "hf:org/x": unknown."""
    def lm(acc: float) -> dict:
        return {"n": 100, "correct": round(acc), "accuracy": acc, "ci95": [acc - 9.0, acc + 9.0],
                "ci_method": "normal"}

    accs = {"pivot": (10, 2, 30.0, 40.0), A: (16, 8, 60.0, 50.0), B: (4, 0, 20.0, 45.0), "sft": (9, 4, 30.0, 40.0),
            "dpo": (6, 4, 32.0, 41.0), "infifpo": (18, 9, 70.0, 42.0)}
    verdicts = {k: {"arithmetic": first_k(a, 20), "jsonl:chat": first_k(c, 10), "hf:org/x": first_k(5, 10)}
                for k, (a, c, _, _) in accs.items()}
    extra = {k: {"minerva_math_algebra": lm(m), "ifeval": lm(i)} for k, (_, _, m, i) in accs.items()}
    run_dir = build_run(tmp_path, monkeypatch, verdicts=verdicts, extra=extra, domains={"jsonl:chat": "code"},
                        trained={m: (m, 100.0, 1.0) for m in ("sft", "dpo", "infifpo")},
                        timings={"train/sft": 1.0, "score": 1.0, "train/dpo": 1.0, "train/infifpo": 1.0})
    rep = report.build_report(run_dir)
    assert rep["table"]["domains"] == {
        "arithmetic": {"domain": "math", "from": "prompt loader"},
        "jsonl:chat": {"domain": "code", "from": "scores.json"},
        "hf:org/x": {"domain": None, "from": None},
        "minerva_math_algebra": {"domain": "math", "from": "lm-eval task table"},
        "ifeval": {"domain": "general", "from": "lm-eval task table"}}
    assert any("'hf:org/x' unknown" in n for n in rep["notes"])
    fpo = _rows(rep)["infifpo"]
    assert fpo["math_avg"] == pytest.approx((90 + 70) / 2) and fpo["code_avg"] == pytest.approx(90.0)
    assert fpo["avg"] == pytest.approx((90 + 90 + 50 + 70 + 42) / 5)  # the unknown-domain benchmark is in Avg
    vs_dpo = _cmp(rep["comparisons"], "infifpo", "dpo")
    assert vs_dpo["benchmarks"]["ifeval"]["method"] == "Wilson interval overlap"  # no rows: one seed each
    assert vs_dpo["avg"]["ci95"] is None and vs_dpo["avg"]["distinguishable"] is None  # ifeval has no items
    assert vs_dpo["code_avg"]["ci95"] is not None  # jsonl:chat has rows
    text = report_markdown.comparison_text(rep["comparisons"])
    assert "InfiFPO vs SFT-DPO on Avg: +" in text and "no ordering is claimed" in text


def test_wrpo_with_its_own_sft(tmp_path, monkeypatch):
    """WRPO's own SFT ("sft_wrpo") is a row after SFT, WRPO is compared with it (not with the InfiFPO SFT), and WRPO's
    compute is its SFT, its second sampling pass and its training: 300 + 40 + 5 + 900 s."""
    labels = ["pivot", A, B, "sft", "sft_wrpo", "dpo", "wrpo", "infifpo"]
    verdicts = {k: {"arithmetic": first_k(i + 4, 20)} for i, k in enumerate(labels)}
    timings = {"train/sft": 360.0, "train/sft_wrpo": 300.0, "sample/sft_wrpo": 40.0, "judge/sft_wrpo": 5.0,
               "score": 180.0, "train/dpo": 720.0, "train/wrpo": 900.0, "train/infifpo": 540.0}
    run_dir = build_run(tmp_path, monkeypatch, verdicts=verdicts, timings=timings,
                        trained={k: (k if k != "sft_wrpo" else "sft", 1.0, 1.0) for k in labels[3:]})
    rep = report.build_report(run_dir)
    rows = _rows(rep)
    assert [r["name"] for r in rep["table"]["rows"]][3:] == ["SFT", "SFT (WRPO data)", "SFT-DPO", "SFT-WRPO",
                                                             "InfiFPO"]
    assert [(c["a"], c["b"]) for c in rep["comparisons"]] == [
        ("infifpo", "dpo"), ("infifpo", "wrpo"), ("dpo", "sft"), ("wrpo", "sft_wrpo"), ("infifpo", "sft"),
        ("sft", "pivot"), ("sft_wrpo", "pivot")]
    assert rows["wrpo"]["compute_seconds"] == pytest.approx(300 + 40 + 5 + 900)
    assert rows["sft_wrpo"]["compute_seconds"] == pytest.approx(300.0)
    assert rows["dpo"]["compute_seconds"] == pytest.approx(360 + 720)


def test_reward_margin_plot_gets_every_preference_method(seeds_run, monkeypatch):
    calls = {}

    def record(histories, key, path, **kw):
        calls[key] = list(histories)
        return None

    monkeypatch.setattr(report.plots, "plot_metric", record)
    report.build_report(seeds_run)
    assert calls == {"loss": ["SFT", "SFT-DPO", "SFT-WRPO", "InfiFPO"],
                     "rewards/margins": ["SFT-DPO", "SFT-WRPO", "InfiFPO"]}


def test_output_profile_counts_length_truncation_answer_line_and_working():
    """Hand-made completions: the pivot shows its working, the SFT row answers bare, one cut at the token cap."""
    rows = {"pivot": [("3 + 4 = 7 apples in all. The answer is 7.", "stop", 20),
                      ("Tom has 3, gets 4 more so 3 + 4 is 7, hmm and then", "length", 40)],
            "sft": [("The answer is 7.", "stop", 6), ("The answer is 9.", "stop", 8)]}

    class FakeEvals:  # what output_profile reads: each label's per-item eval rows
        @staticmethod
        def rows(label):
            return [{"benchmark": "arithmetic", "completion": t, "finish_reason": f, "num_tokens": n}
                    for t, f, n in rows[label]] if label in rows else None

    table = {"rows": [{"key": k, "name": k, "labels": [k]} for k in [*rows, "missing"]],
             "domains": {"arithmetic": {"domain": "math"}}}
    prof = {p["key"]: p for p in report.output_profile(FakeEvals(), table)}
    assert set(prof) == {"pivot", "sft"}  # a row without eval rows is left out
    assert prof["pivot"]["median_tokens"] == 30 and prof["pivot"]["truncated_pct"] == 50
    assert prof["pivot"]["answer_line_pct"] == 50 and prof["pivot"]["working_pct"] == 100
    assert prof["sft"]["median_tokens"] == 7 and prof["sft"]["truncated_pct"] == 0
    assert prof["sft"]["answer_line_pct"] == 100 and prof["sft"]["working_pct"] == 0
    md = report_markdown._profile_md(list(prof.values()))
    assert "How each model answers" in md[0] and any("| sft | arithmetic | 2 | 7 |" in line for line in md)


def test_a_pairwise_arm_is_one_row_costing_its_runs_and_its_merge(seeds_run):
    """infifpo[pw] (pipeline: ``pairwise: rsaf``) merges infifpo[noclip] (reused: the same one-seed run) and its own
    infifpo[pw/b] (an intermediate: no row, not evaluated). Its compute = SFT 360 + score 180 + noclip 530 +
    pw/b 400 + merge 20 = 1490 s; its own cost = 530 + 400 + 20 = 950 s; no extra scoring."""
    from tests.test_report import train_log, write_eval_rows

    file = seeds_run / "pipeline_outputs.json"
    out = json.loads(file.read_text())
    component = seeds_run / "checkpoints" / "infifpo_pw_b-abc"
    component.mkdir(parents=True)
    (component / report.TRAIN_LOG).write_text(json.dumps(train_log("infifpo", 400.0, 10.0, clip=True)))
    merged = seeds_run / "checkpoints" / "infifpo_pw-abc"  # a merge: no train log
    merged.mkdir(parents=True)
    out["checkpoints"] |= {"infifpo[pw/b]": str(component), "infifpo[pw]": str(merged)}
    out["evals"]["infifpo[pw]"] = write_eval_rows(seeds_run / "data", "infifpo[pw]", _v(GSM_FPO, 14, 10))
    out["runs"] |= {
        "infifpo[pw/b]": {"method": "infifpo", "seed": 42, "arm": "pw/b", "overrides": {"fusion_sources": ["b"]},
                          "component_of": ["infifpo[pw]"]},
        "infifpo[pw]": {"method": "infifpo", "seed": 42, "arm": "pw", "overrides": {"pairwise": "rsaf"},
                        "merge": {"method": "rsaf", "components": ["infifpo[noclip]", "infifpo[pw/b]"]}}}
    out["timings"] |= {"train/infifpo[pw/b]": {"stage": "train", "model": None, "seconds": 400.0},
                       "merge/infifpo[pw]": {"stage": "merge", "model": None, "seconds": 20.0}}
    file.write_text(json.dumps(out))
    rep = report.build_report(seeds_run)
    assert rep["ablation"]["arms"] == ["infifpo[mean]", "infifpo[noclip]", "infifpo[pw]"]
    assert "infifpo[pw/b]" not in _rows(rep) and not [n for n in rep["notes"] if "pw" in n]
    row = _rows(rep)["infifpo[pw]"]
    assert row["changes"] == {"pairwise": [None, "rsaf"]} and row["compute_seconds"] == pytest.approx(1490.0)
    assert row["benchmarks"]["arithmetic"]["accuracy"] == pytest.approx(70.0)  # 14 of 20
    assert _cmp(rep["ablation"]["comparisons"], "infifpo[pw]", "infifpo")["avg"]["ci95"]
    costs = {a["arm"]: a for a in rep["cost"]["arms"]}
    assert costs["infifpo[pw]"] == {"arm": "infifpo[pw]", "name": "InfiFPO [pw]",
                                    "training_runs": ["infifpo[noclip]", "infifpo[pw/b]"],
                                    "shared": ["infifpo[noclip]"], "merge": "rsaf", "extra_scoring_s": 0.0,
                                    "own_seconds": pytest.approx(950.0), "compute_seconds": pytest.approx(1490.0)}
    assert costs["infifpo[mean]"]["own_seconds"] == pytest.approx((500 + 520) / 2)  # its two seeds
    assert costs["infifpo[noclip]"]["shared"] == ["infifpo[noclip]"] and costs["infifpo[mean]"]["shared"] == []
    assert [f["label"] for f in rep["fusion"] if f["row"] == "infifpo[pw]"] == ["infifpo[pw/b]"]  # noclip: own row
    assert "infifpo[pw/b]" in rep["cost"]["training"] and "infifpo[pw]" not in rep["cost"]["training"]
    md = report_markdown.render_markdown(rep)
    assert "| InfiFPO [pw] | pairwise=rsaf |" in md[md.index("## Ablation"):]
    assert ("| InfiFPO [pw] | 2 | infifpo[noclip] (shared), infifpo[pw/b] | rsaf | 0 | 950.0 | 0.414 |"
            in md[md.index("### Ablation arms: what each costs"):])
