"""`infifpo report` on a synthetic run directory that follows docs/formats.md exactly.

Eval rows and samples are real ``store.StageOutput`` directories; logs are real JSON files. Every number checked in
report.json is computed by hand in this file.
"""

import json
import math
from pathlib import Path

import pytest

from infifpo import cli
from infifpo.report import markdown as report_markdown
from infifpo.report import stage as report
from infifpo.schema import ConfigError, DataFormatError
from infifpo.store import StageOutput, StoreError
from tests.config_convention import (
    dashed_flags_parse_alike,
    help_lists_every_option,
    imports_light,
    misspelt_key_is_named,
    parse_with_yaml,
)

PIVOT, SOURCES = "org/Pivot-135M", ["org/SrcA-500M", "org/SrcB-270M"]
# correct counts per row: gsm8k out of 10, arithmetic out of 20
CORRECT = {"pivot": (3, 6), "source:org/SrcA-500M": (6, 12), "source:org/SrcB-270M": (2, 4), "sft": (4, 8),
           "dpo": (4, 6), "wrpo": (5, 7), "infifpo": (5, 18)}
PARAMS = {"pivot": 134_515_008, "source:org/SrcA-500M": 494_032_768, "source:org/SrcB-270M": 268_098_176}
TIMINGS = {"prompts": 2.5, f"sample/{PIVOT}": 100.0, "judge": 10.0, "train/sft": 360.0, "score": 180.0,
           "train/dpo": 720.0, "train/wrpo": 900.0, "train/infifpo": 540.0, "eval/pivot": 30.0}
SCORE_MODELS = [("sft-ckpt", "pivot", 30.0, 5.0), ("org/SrcA-500M", "source", 100.0, 10.0),
                ("org/SrcB-270M", "source", 50.0, 4.0)]  # (model, role, seconds, load_seconds)
SAMPLE_TOKENS = {PIVOT: [10, 20, 5], "org/SrcA-500M": [7, 0], "org/SrcB-270M": [40]}


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    p = k / n
    mid, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [100 * (mid - half) / (1 + z * z / n), 100 * (mid + half) / (1 + z * z / n)]


def write_eval_rows(data: Path, label: str, verdicts: dict[str, list[bool]], params: int | None = None,
                    extra: dict[str, dict] | None = None, domains: dict[str, str] | None = None) -> str:
    """An eval output of ``label``: per-item rows ("<bench>/<i:03d>") with these verdicts and a scores.json whose
    entries (accuracy, Wilson ci95) are computed by hand from them, with a "domain" where ``domains`` gives one;
    ``extra``: further scores.json entries without rows (as lm-eval's)."""
    rows, bench = [], {}
    for name, correct in verdicts.items():
        rows += [{"id": f"{name}/{i:03d}", "benchmark": name, "prompt_id": f"{i:03d}", "completion": "x",
                  "finish_reason": "stop", "correct": bool(c), "reason": ""} for i, c in enumerate(correct)]
        k, n = sum(map(bool, correct)), len(correct)
        bench[name] = {"n": n, "correct": k, "accuracy": 100 * k / n, "ci95": wilson(k, n), "ci_method": "wilson",
                       **({"domain": domains[name]} if name in (domains or {}) else {})}
    out = StageOutput(data, f"eval-{label.replace(':', '-')}", {"label": label})
    out.write_all(rows)
    scores = {"model": label, "label": label, "params": params or PARAMS.get(label, 134_515_008),
              "benchmarks": {**bench, **(extra or {})},
              "generation": {"backend": "transformers", "temperature": 0.0, "max_tokens": 64},
              "tokens_generated": 123, "seconds": 12.0}
    (out.path / "scores.json").write_text(json.dumps(scores))
    return str(out.path)


def first_k(k: int, n: int) -> list[bool]:
    """Items 0..k-1 correct of n."""
    return [i < k for i in range(n)]


def train_log(method: str, runtime: float, setup: float, shares: bool = True, clip: bool = False) -> dict:
    hist = []
    for step in (1, 2, 3, 4):
        e = {"loss": 0.7 - 0.05 * step * (1 + list(report.METHODS).index(method)), "step": step, "epoch": step / 4}
        if method != "sft":
            e["rewards/margins"] = 0.1 * step
        if method == "infifpo" and shares:
            e |= {"fusion/chosen_share/SrcA-500M": 0.25 * (step % 3), "fusion/chosen_share/pivot": 0.5,
                  "fusion/rejected_share/SrcA-500M": 0.5, "fusion/rejected_share/SrcB-270M": 0.1 * step}
        if method == "infifpo" and clip:
            e["fusion/clip_rate"] = 0.1 * step
        hist.append(e)
    hist.append({"train_runtime": runtime, "train_loss": 0.6, "step": 4})
    return {"method": method, "log_history": hist, "train_runtime_s": runtime, "setup_s": setup, "world_size": 1,
            "num_train_rows": 16, "global_batch_size": 4, "max_steps": 4, "precision": "fp32"}


def build_run(tmp_path: Path, monkeypatch, *, verdicts: dict[str, dict[str, list[bool]]],
              trained: dict[str, tuple[str, float, float]], timings: dict[str, float], runs: dict | None = None,
              extra: dict[str, dict[str, dict]] | None = None, config: dict | None = None,
              domains: dict[str, str] | None = None) -> Path:
    """runs/t under tmp_path, with paths recorded relative to tmp_path (as the pipeline writes them), then the cwd
    moved elsewhere. ``verdicts``: eval label -> benchmark -> per-item verdicts (``write_eval_rows``; ``extra``: label
    -> scores.json entries without rows); ``trained``: checkpoint label -> (method, train_runtime_s, setup_s), each
    with a train log (InfiFPO logs with shares and clip rates); ``runs``: pipeline_outputs' ``runs`` (omitted when
    None, as in old outputs)."""
    monkeypatch.chdir(tmp_path)
    rd, data = Path("runs/t"), Path("runs/t/data")
    samples = {}
    for model, toks in SAMPLE_TOKENS.items():
        out = StageOutput(data, f"samples-{model.split('/')[-1]}", {"model": model})
        out.write_all({"id": f"p{i}|{model}|0", "prompt_id": f"p{i}", "model": model, "sample_index": 0,
                       "completion_ids": list(range(t)), "text": "y", "finish_reason": "stop", "gen_logp": -1.0,
                       "num_tokens": t, "seed": 0} for i, t in enumerate(toks))
        samples[model] = str(out.path)
    scored = data / "scored-x"
    scored.mkdir(parents=True)
    (scored / "score_stats.json").write_text(json.dumps({"rows": 16, "models": [
        {"model": m, "role": role, "responses": 32, "tokens": 1000, "prompt_tokens": 500, "seconds": s,
         "load_seconds": load, "backend": "transformers", "dtype": "float32", "output": str(data / m)}
        for m, role, s, load in SCORE_MODELS]}))
    checkpoints = {}
    for label, (method, runtime, setup) in trained.items():
        ckpt = rd / "checkpoints" / f"{label}-abc"
        ckpt.mkdir(parents=True)
        log = train_log(method, runtime, setup, clip=True)
        (ckpt / report.TRAIN_LOG).write_text(json.dumps(log))
        checkpoints[label] = str(ckpt)
    evals = {label: write_eval_rows(data, label, v, extra=(extra or {}).get(label), domains=domains)
             for label, v in verdicts.items()}
    outputs = {"name": "t", "run_dir": str(rd), "config": config or {"name": "t"}, "pivot": PIVOT,
               "sources": SOURCES, "prompts": str(data / "prompts-x"), "samples": samples, "judged": [],
               "pairs": {}, "scored": str(scored), "checkpoints": checkpoints, "evals": evals,
               "timings": {k: {"stage": k.split("/")[0], "model": None, "seconds": v} for k, v in timings.items()}}
    if runs is not None:
        outputs["runs"] = runs
    (rd / "pipeline_outputs.json").write_text(json.dumps(outputs))
    elsewhere = tmp_path / "elsewhere"  # the report must find cwd-relative paths from another directory
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path / rd


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """An old (single-seed, no ``runs``) output: CORRECT's counts on gsm8k and arithmetic."""
    return build_run(tmp_path, monkeypatch,
                     verdicts={label: {"gsm8k": first_k(c[0], 10), "arithmetic": first_k(c[1], 20)}
                               for label, c in CORRECT.items()},
                     trained={m: (m, rt, setup) for m, rt, setup in (("sft", 300.0, 10.0), ("dpo", 600.0, 30.0),
                                                                     ("wrpo", 800.0, 30.0), ("infifpo", 540.0, 20.0))},
                     timings=TIMINGS)


def _outputs(run_dir: Path) -> dict:
    return json.loads((run_dir / "pipeline_outputs.json").read_text())


def test_report_numbers_match_hand_computation(run_dir, capsys):
    assert cli.main(["report", "--run-dir", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(run_dir / "report.md"))
    rep = json.loads((run_dir / "report.json").read_text())
    rows = {r["key"]: r for r in rep["table"]["rows"]}
    assert rep["table"]["columns"] == ["gsm8k", "arithmetic", "Avg", "Math avg", "Code avg", "Seeds", "Size",
                                       "Compute hours"]
    # both benchmarks are math by their prompt loaders (no domain recorded in the eval output)
    assert rep["table"]["domains"] == {b: {"domain": "math", "from": "prompt loader"} for b in ("gsm8k", "arithmetic")}
    assert rows["infifpo"]["avg"] == pytest.approx((50.0 + 90.0) / 2) == rows["infifpo"]["math_avg"]
    assert rows["infifpo"]["code_avg"] is None and rows["infifpo"]["code_avg_ci95"] is None
    # an old output (no runs, no @seed labels): one seed per row, its value as the row's
    assert rows["dpo"]["labels"] == ["dpo"] and rows["dpo"]["seeds"] == [None]
    assert rows["dpo"]["per_seed"] == [{"label": "dpo", "seed": None, "eval_dir": _outputs(run_dir)["evals"]["dpo"],
                                        "benchmarks": {"gsm8k": 40.0, "arithmetic": 30.0}, "avg": 35.0,
                                        "math_avg": 35.0, "code_avg": None}]
    assert rows["dpo"]["benchmarks"]["arithmetic"]["ci_method"] == "wilson" and rep["ablation"] is None
    assert rows["dpo"]["avg"] == pytest.approx((40.0 + 30.0) / 2)
    assert rows["pivot"]["benchmarks"]["gsm8k"]["ci95"] == pytest.approx(wilson(3, 10))
    assert rows["sft"]["compute_hours"] == pytest.approx(360 / 3600)
    assert rows["dpo"]["compute_hours"] == pytest.approx((360 + 720) / 3600)
    assert rows["wrpo"]["compute_hours"] == pytest.approx((360 + 900) / 3600)
    assert rows["infifpo"]["compute_hours"] == pytest.approx((360 + 180 + 540) / 3600)
    assert rows["pivot"]["compute_hours"] is None and rows["pivot"]["size"] == "135M"
    assert rows["source:org/SrcA-500M"]["size"] == "494M"
    cost = rep["cost"]
    assert cost["tokens_sampled"] == {PIVOT: {"samples": 3, "tokens": 35},
                                      "org/SrcA-500M": {"samples": 2, "tokens": 7},
                                      "org/SrcB-270M": {"samples": 1, "tokens": 40}}
    assert cost["total_s"] == pytest.approx(sum(TIMINGS.values()))
    fo = cost["fusion_overhead"]
    assert fo["scoring_s"] == pytest.approx(180.0) and fo["infifpo_total_s"] == pytest.approx(720.0)
    assert fo["ratio"] == pytest.approx(720.0 / 600.0)  # (30 + 100 + 50 scoring + 540 training) / 600 DPO
    assert fo["ratio_with_setup"] == pytest.approx((720.0 + 19.0 + 20.0) / (600.0 + 30.0))
    assert fo["equal_precision"] is True and fo["target"] == 1.5
    assert [w["seconds"] for w in fo["where"]] == [30.0, 100.0, 50.0, 540.0]
    assert cost["scoring"][1]["s_per_1k_tokens"] == pytest.approx(1000 * 100.0 / 1500)
    md = (run_dir / "report.md").read_text()
    assert "**Ratio 1.20x** (target <= 1.5x: met)" in md
    assert "| InfiFPO | 50.0 [23.7, 76.3] | 90.0 [69.9, 97.2] | 70.0 [" in md  # gsm8k, arithmetic (Wilson), Avg


def test_markdown_rows_in_paper_order_and_plots_linked_valid_pngs(run_dir):
    md = report.write_report(run_dir).read_text()
    names = ["Pivot-135M (pivot)", "SrcA-500M (source)", "SrcB-270M (source)", "| SFT |", "| SFT-DPO |",
             "| SFT-WRPO |", "| InfiFPO |"]
    positions = [md.index(n) for n in names]
    assert positions == sorted(positions)
    for name in ("loss", "reward_margin", "fusion_shares"):
        png = run_dir / "plots" / f"{name}.png"
        assert f"](plots/{name}.png)" in md
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_comparison_uses_paired_bootstrap_and_says_when_not_distinguishable(run_dir):
    rep = report.build_report(run_dir)
    vs_dpo = next(c for c in rep["comparisons"] if c["baseline"] == "SFT-DPO")
    # arithmetic: InfiFPO 18/20 vs DPO 6/20 on the same items: +60 points, every resample positive
    arith = vs_dpo["benchmarks"]["arithmetic"]
    assert arith["diff"] == pytest.approx(60.0) and arith["method"] == "paired bootstrap over items"
    assert arith["distinguishable"] is True and arith["ci95"][0] > 0
    gsm = vs_dpo["benchmarks"]["gsm8k"]  # 5/10 vs 4/10: one discordant item
    assert gsm["diff"] == pytest.approx(10.0) and gsm["distinguishable"] is False
    assert vs_dpo["avg"]["diff"] == pytest.approx(70.0 - 35.0) and vs_dpo["avg"]["distinguishable"] is True
    text = report_markdown.comparison_text(rep["comparisons"])
    assert "InfiFPO is ahead of SFT-DPO on Avg: +35.0 points" in text
    assert "gsm8k: +10.0 points" in text and "not distinguishable at this sample size" in text


def test_without_item_rows_the_comparison_falls_back_to_wilson_overlap(run_dir):
    for key in ("infifpo", "dpo"):
        (run_dir.parents[1] / _outputs(run_dir)["evals"][key] / "_SUCCESS").unlink()
    vs_dpo = report.build_report(run_dir)["comparisons"][0]
    assert vs_dpo["benchmarks"]["arithmetic"]["method"] == "Wilson interval overlap"
    assert vs_dpo["benchmarks"]["arithmetic"]["distinguishable"] is True  # [69.9, 97.2] vs [14.5, 51.9]
    assert vs_dpo["benchmarks"]["gsm8k"]["distinguishable"] is False  # [23.7, 76.3] vs [16.8, 68.7]
    assert vs_dpo["avg"] == {"diff": pytest.approx(35.0), "ci95": None, "half_width": None, "n": None,
                             "seeds": [1, 1], "method": "difference of means", "distinguishable": None}
    assert "no per-item rows to put a CI on it" in report_markdown.comparison_text([vs_dpo])


def test_missing_eval_renders_dash_and_note(run_dir):
    out = _outputs(run_dir)
    del out["evals"]["wrpo"]
    (run_dir / "pipeline_outputs.json").write_text(json.dumps(out))
    rep = report.build_report(run_dir)
    wrpo = next(r for r in rep["table"]["rows"] if r["key"] == "wrpo")
    assert wrpo["avg"] is None and wrpo["benchmarks"] == {"gsm8k": None, "arithmetic": None}
    assert next(c for c in rep["comparisons"] if c["baseline"] == "SFT-WRPO")["avg"] is None
    md = report_markdown.render_markdown(rep)
    assert "| SFT-WRPO | — | — | — | — | — | — | — | 0.35 |" in md
    assert any("eval/wrpo" in n for n in rep["notes"])


def test_missing_fusion_keys_omit_the_plot_with_a_note(run_dir):
    ckpt = run_dir.parents[1] / _outputs(run_dir)["checkpoints"]["infifpo"]
    (ckpt / report.TRAIN_LOG).write_text(json.dumps(train_log("infifpo", 540.0, 20.0, shares=False)))
    rep = report.build_report(run_dir)
    assert rep["plots"]["fusion_shares"] is None and rep["plots"]["loss"] == "plots/loss.png"
    assert any("fusion_shares omitted" in n for n in rep["notes"])


def test_corrupt_pipeline_outputs_is_a_named_error(run_dir, capsys):
    (run_dir / "pipeline_outputs.json").write_text('{"name": "t", "pivot": ')
    with pytest.raises(StoreError, match=r"pipeline_outputs\.json: corrupt JSON.*infifpo pipeline"):
        report.build_report(run_dir)
    assert report.main(["--run-dir", str(run_dir)]) == 1
    assert "pipeline_outputs.json" in capsys.readouterr().err
    (run_dir / "pipeline_outputs.json").write_text(json.dumps({"name": "t", "sources": []}))
    with pytest.raises(DataFormatError, match="'pivot'"):
        report.build_report(run_dir)


def test_missing_run_dir_and_corrupt_score_stats_name_the_stage(run_dir, tmp_path):
    with pytest.raises(StoreError, match="pipeline_outputs.json: missing"):
        report.build_report(tmp_path / "nope")
    stats = run_dir.parents[1] / _outputs(run_dir)["scored"] / "score_stats.json"
    stats.write_text(json.dumps({"models": [{"model": "x", "seconds": "slow"}]}))
    with pytest.raises(DataFormatError, match=r"score_stats\.json.*pipeline stage score"):
        report.build_report(run_dir)


def test_an_lm_eval_entry_without_a_standard_error_renders_without_an_interval(run_dir):
    # lm-eval tasks that report no stderr (bootstrap_iters=0) give ci95 null and ci_method "none" (lm_eval_adapter)
    for key in ("pivot", "infifpo"):
        path = run_dir.parents[1] / _outputs(run_dir)["evals"][key] / "scores.json"
        scores = json.loads(path.read_text())
        scores["benchmarks"]["gsm8k"].update(ci95=None, ci_method="none")
        path.write_text(json.dumps(scores))
    rep = report.build_report(run_dir)
    rows = {r["key"]: r for r in rep["table"]["rows"]}
    assert rows["infifpo"]["benchmarks"]["gsm8k"]["ci95"] is None
    assert rows["infifpo"]["benchmarks"]["gsm8k"]["accuracy"] == pytest.approx(50.0)
    md = report_markdown.render_markdown(rep)
    assert "| InfiFPO | 50.0 |" in md


def test_options_follow_the_config_convention(tmp_path, capsys):
    help_lists_every_option(report.main, report.ReportOptions, capsys)
    misspelt_key_is_named(report.main, tmp_path, "run_dri", "run_dir")
    opts = parse_with_yaml(report.ReportOptions, tmp_path, {"run_dir": "runs/a"}, ["--run_dir", "runs/b"])
    assert opts == report.ReportOptions(run_dir="runs/b")
    assert dashed_flags_parse_alike(report.ReportOptions, ["--run_dir", "runs/a"]).run_dir == "runs/a"
    with pytest.raises(ConfigError, match=r"infifpo report: missing required option\(s\) run_dir"):
        report.main([])
    imports_light("infifpo.report.stage", "ReportOptions")


def test_report_from_explicit_eval_outputs_without_a_pipeline_run(run_dir, tmp_path, capsys):
    """`infifpo report --eval LABEL=DIR ... --checkpoint LABEL=DIR`: the same table rows and numbers as the pipeline
    run those outputs came from, written to a fresh directory; bad labels are named errors."""
    outputs = _outputs(run_dir)
    base = run_dir.parents[1]  # the pipeline recorded paths relative to where it ran
    evals = [f"{label}={base / path}" for label, path in outputs["evals"].items()]
    ckpts = [f"{label}={base / path}" for label, path in outputs["checkpoints"].items()]
    target = tmp_path / "adhoc"
    assert cli.main(["report", "--run_dir", str(target), "--eval", *evals, "--checkpoint", *ckpts]) == 0
    assert Path(capsys.readouterr().out.strip()) == target / "report.md"
    ours = json.loads((target / "report.json").read_text())
    assert cli.main(["report", "--run_dir", str(run_dir)]) == 0
    theirs = json.loads((run_dir / "report.json").read_text())
    # Equal but for paths (absolute here), the pivot's name (read from its scores.json) and compute time (no timings).
    local = {"name", "model", "eval_dir", "per_seed", "compute_seconds", "compute_hours"}
    assert ([{k: v for k, v in r.items() if k not in local} for r in ours["table"]["rows"]]
            == [{k: v for k, v in r.items() if k not in local} for r in theirs["table"]["rows"]])
    named = {"name", "baseline"}  # they carry the pivot's name
    assert ([{k: v for k, v in c.items() if k not in named} for c in ours["comparisons"]]
            == [{k: v for k, v in c.items() if k not in named} for c in theirs["comparisons"]])
    assert [f["shares"] for f in ours["fusion"]] == [f["shares"] for f in theirs["fusion"]] and ours["fusion"]
    for argv, match in ((["--eval", evals[1]], "needs pivot=DIR"), (["--eval", "pivot"], "expected LABEL=DIR"),
                        (["--eval", *evals, "--checkpoint", "nope=" + str(tmp_path)], r"\['nope'\]")):
        with pytest.raises(ConfigError, match=match):
            report.main(["--run_dir", str(tmp_path / "x"), *argv])


def test_a_run_directory_that_moved_still_reports(run_dir, tmp_path):
    """Paths the pipeline records relative to the run directory (pipeline.relative_outputs) are found after the
    directory moves; the report is the same."""
    import shutil

    from infifpo import pipeline

    assert report.main(["--run_dir", str(run_dir)]) == 0
    before = json.loads((run_dir / "report.json").read_text())["table"]
    out = _outputs(run_dir)
    absolute = {k: pipeline._map_paths(out[k], lambda p: str((run_dir.parents[1] / p).resolve()))
                for k in pipeline.PATH_KEYS if k in out}
    (run_dir / "pipeline_outputs.json").write_text(json.dumps(pipeline.relative_outputs({**out, **absolute},
                                                                                         run_dir)))
    assert not Path(_outputs(run_dir)["evals"]["pivot"]).is_absolute()
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(run_dir, moved)
    assert report.main(["--run_dir", str(moved)]) == 0
    after = json.loads((moved / "report.json").read_text())["table"]
    local = {"eval_dir", "per_seed", "model"}  # paths, as recorded
    assert ([{k: v for k, v in r.items() if k not in local} for r in after["rows"]]
            == [{k: v for k, v in r.items() if k not in local} for r in before["rows"]])
