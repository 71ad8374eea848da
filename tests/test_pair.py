"""`infifpo pair`: recipes on hand-built judged rows, drops with reasons, seeded split, order independence, stats."""

from __future__ import annotations

import dataclasses
import json
import random
import typing
from pathlib import Path

import pytest

from infifpo import pair
from infifpo.pair import PairOptions, build_pairs, split_of
from infifpo.provenance import output_digest
from infifpo.schema import PAIR_COLUMNS, ConfigError, DataFormatError, EmptyOutputError, sample_id
from infifpo.store import StageOutput, read_output
from tests.config_convention import (
    dashed_flags_parse_alike,
    help_lists_every_option,
    imports_light,
    misspelt_key_is_named,
    parse_with_yaml,
)

PIVOT, A, B = "pivot", "srcA", "srcB"


def P(pid, domain="math"):  # noqa: N802 - a row constructor, read like a literal
    return {"id": pid, "prompt": [{"role": "user", "content": f"question {pid}"}], "domain": domain,
            "answer": "1" if domain == "math" else None, "tests": None, "entry_point": None,
            "source": "t"}


def J(pid, model, idx, text=None, correct=None, reward=None, finish="stop"):  # noqa: N802
    return {"id": sample_id(pid, model, idx), "prompt_id": pid, "model": model, "sample_index": idx,
            "completion_ids": [1, 2], "text": f"{model} answer {idx} to {pid}" if text is None else text,
            "finish_reason": finish, "gen_logp": -1.0, "num_tokens": 2, "seed": 0, "correct": correct,
            "reward": reward, "judge_reason": "test"}


def _one(judged, prompts, **kw):
    rows, stats = build_pairs(judged, prompts, **kw)
    assert len(rows) == 1, stats
    return rows[0], stats


# -- infifpo ----------------------------------------------------------------------------------------------------
def test_infifpo_correctness_first_then_reward_over_all_samples():
    # D5: five responses from three models; all are kept and ranked, not just two.
    judged = [J("p1", PIVOT, 0, correct=True, reward=0.1), J("p1", PIVOT, 1, correct=False, reward=0.9),
              J("p1", A, 0, correct=True, reward=0.5), J("p1", B, 0, correct=False, reward=0.2),
              J("p1", B, 1, correct=None, reward=0.95)]
    row, stats = _one(judged, [P("p1")], recipe="infifpo", pivot=PIVOT)
    assert set(PAIR_COLUMNS) <= set(row)
    assert row["chosen"] == [{"role": "assistant", "content": "srcA answer 0 to p1"}]
    assert row["rejected"] == [{"role": "assistant", "content": "srcB answer 0 to p1"}]
    assert row["prompt"] == [{"role": "user", "content": "question p1"}]
    assert (row["chosen_model"], row["rejected_model"]) == (A, B)
    assert (row["chosen_reward"], row["rejected_reward"]) == (0.5, 0.2)
    assert (row["chosen_correct"], row["rejected_correct"]) == (True, False)
    assert row["chosen_sample_id"] == "p1|srcA|0" and row["domain"] == "math" and "source_chosen" not in row
    assert stats["sources"] == [A, B]


def test_infifpo_reward_decides_without_a_verifier_and_none_reward_ranks_lowest():
    judged = [J("g", PIVOT, 0, reward=0.3), J("g", A, 0, reward=0.7), J("g", B, 0, reward=None)]
    row, _ = _one(judged, [P("g", "general")], recipe="infifpo", pivot=PIVOT)
    assert (row["chosen_model"], row["rejected_model"]) == (A, B)


def test_truncated_and_errored_responses_are_not_chosen_by_default():
    judged = [J("p", A, 0, correct=True, reward=0.9, finish="length"),
              J("p", B, 0, correct=True, reward=0.8, finish="error"),
              J("p", PIVOT, 0, correct=True, reward=0.2), J("p", PIVOT, 1, correct=False)]
    row, _ = _one(judged, [P("p")], recipe="infifpo", pivot=PIVOT)
    assert row["chosen_sample_id"] == "p|pivot|0" and row["rejected_sample_id"] == "p|pivot|1"
    row, _ = _one(judged, [P("p")], recipe="infifpo", pivot=PIVOT, allow_truncated_chosen=True)
    assert row["chosen_sample_id"] == "p|srcA|0"  # "length" allowed now; "error" never


def test_drops_are_counted_with_their_reasons():
    judged = [
        J("tie", PIVOT, 0, correct=True, reward=0.5), J("tie", A, 0, correct=True, reward=0.5),
        J("empty", PIVOT, 0, text="  \n"), J("empty", A, 0, text="", reward=1.0), J("empty", B, 0, reward=0.1),
        J("same", PIVOT, 0, text="42", correct=True), J("same", A, 0, text=" 42\n", correct=False),
        J("trunc", PIVOT, 0, correct=False, reward=0.1), J("trunc", A, 0, correct=True, finish="length"),
        J("ok", PIVOT, 0, correct=True), J("ok", A, 0, correct=False),
        J("allcut", PIVOT, 0, finish="length", reward=1.0), J("allcut", A, 0, finish="error"),
    ]
    prompts = [P(p) for p in ("tie", "empty", "same", "trunc", "ok", "allcut", "nosamples")]
    rows, stats = build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT)
    assert [r["id"] for r in rows] == ["ok"]
    assert stats["dropped"] == {"best_ineligible": 1, "identical": 1, "no_eligible_chosen": 1, "no_samples": 1,
                                "tie": 1, "too_few_responses": 1}
    assert stats["samples_excluded"] == {"empty_response": 2}
    assert stats["prompts_in"] == 7 == stats["prompts_out"] + sum(stats["dropped"].values())


# -- wrpo -------------------------------------------------------------------------------------------------------
def test_wrpo_quadruple():
    judged = [J("w", A, 0, correct=True, reward=0.4), J("w", A, 1, correct=False, reward=0.9),
              J("w", B, 0, correct=True, reward=0.8), J("w", PIVOT, 0, correct=True, reward=0.1),
              J("w", PIVOT, 1, correct=False, reward=0.3), J("w", PIVOT, 2, correct=False, reward=0.2)]
    row, stats = _one(judged, [P("w")], recipe="wrpo", pivot=PIVOT)
    assert row["source_chosen"] == [{"role": "assistant", "content": "srcB answer 0 to w"}]
    assert row["source_chosen_model"] == B and row["source_chosen_reward"] == 0.8
    assert row["chosen_sample_id"] == "w|pivot|0" and row["rejected_sample_id"] == "w|pivot|2"
    assert row["chosen_model"] == row["rejected_model"] == PIVOT
    assert stats["source_chosen_share"] == {B: 1.0} and stats["sft_fraction"] == pytest.approx(1 / 3)


def test_wrpo_drops():
    judged = [
        J("t", A, 0, correct=True), J("t", PIVOT, 0, correct=True, reward=0.2),
        J("t", PIVOT, 1, correct=True, reward=0.2),  # target tie
        J("s", A, 0, correct=False, reward=0.0), J("s", PIVOT, 0, correct=True),
        J("s", PIVOT, 1, correct=False, reward=0.5),  # y_l outranks the best source response
        J("n", A, 0, correct=True, finish="length"), J("n", PIVOT, 0, correct=True), J("n", PIVOT, 1, correct=False),
    ]
    rows, stats = build_pairs(judged, [P("t"), P("s"), P("n")], recipe="wrpo", pivot=PIVOT)
    assert rows == []
    assert stats["dropped"] == {"no_source_chosen": 1, "source_not_better": 1, "target_tie": 1}
    with pytest.raises(ConfigError, match="cannot also be a source"):
        build_pairs(judged, [P("t"), P("s"), P("n")], recipe="wrpo", pivot=PIVOT, sources=[A, PIVOT])


# -- fusechat ---------------------------------------------------------------------------------------------------
def test_fusechat_same_source_pair_inside_the_reward_window():
    judged = [J("f", B, 0, reward=0.9), J("f", B, 1, reward=0.1),  # best model, but gap 0.8 > 0.1
              J("f", A, 0, reward=0.50), J("f", A, 1, reward=0.45), J("f", A, 2, reward=0.47),
              J("f", PIVOT, 0, reward=5.0), J("f", PIVOT, 1, reward=-5.0)]
    row, stats = _one(judged, [P("f", "general")], recipe="fusechat", pivot=PIVOT)
    assert (row["chosen_sample_id"], row["rejected_sample_id"]) == ("f|srcA|0", "f|srcA|1")
    assert stats["sft_fraction"] == 0.0 and row["split"] == "po" and stats["sources"] == [A, B]


def test_fusechat_uses_the_verifier_for_math_and_the_window_otherwise():
    judged = [
        J("m", A, 0, correct=True, reward=0.1), J("m", A, 1, correct=False, reward=0.9),  # verifier separates
        J("both", A, 0, correct=True, reward=0.5), J("both", A, 1, correct=True, reward=0.45),
        J("low", A, 0, reward=0.500), J("low", A, 1, reward=0.495),
        J("high", A, 0, reward=0.9), J("high", A, 1, reward=0.1),
        J("norew", A, 0, reward=None, text="x"), J("norew", A, 1, reward=0.2),
        J("one", A, 0, reward=0.3), J("one", B, 0, reward=0.25),  # different models never pair
        J("one", PIVOT, 0, reward=0.29), J("one", PIVOT, 1, reward=0.3),  # the pivot is not a FuseChat source
    ]
    prompts = [P("m"), P("both"), P("low", "general"), P("high", "general"), P("norew", "general"),
               P("one", "general")]
    rows, stats = build_pairs(judged, prompts, recipe="fusechat", pivot=PIVOT, sources=[A, B])
    assert [(r["id"], r["chosen_sample_id"]) for r in rows] == [("m", "m|srcA|0")]
    assert stats["dropped"] == {"gap_above_window": 1, "gap_below_window": 1, "no_reward": 1, "same_correctness": 1,
                                "too_few_responses": 1}
    rows, _ = build_pairs(judged, prompts, recipe="fusechat", pivot=PIVOT, sources=[A, B], max_gap=1.0)
    assert [r["id"] for r in rows] == ["high", "m"]


# -- determinism, split, stats ----------------------------------------------------------------------------------
def _many(n=300):
    rng = random.Random(0)
    prompts, judged = [P(f"q{i:03d}", rng.choice(["math", "general"])) for i in range(n)], []
    for p in prompts:
        for m in (PIVOT, A, B):
            for k in range(2):  # coarse rewards so that many best/worst ties need the tie-break
                judged.append(J(p["id"], m, k, correct=rng.choice([True, False, None]), reward=rng.choice([0.0, 1.0])))
    return judged, prompts


@pytest.mark.parametrize("recipe", ["infifpo", "wrpo", "fusechat"])
def test_same_seed_same_pairs_and_shuffled_input_gives_identical_output(recipe):
    judged, prompts = _many()
    kw = {"recipe": recipe, "pivot": PIVOT, "max_gap": 1.0, "sft_fraction": 0.5}
    first = build_pairs(judged, prompts, seed=5, **kw)
    shuffled_j, shuffled_p = judged[:], prompts[:]
    random.Random(1).shuffle(shuffled_j)
    random.Random(2).shuffle(shuffled_p)
    assert build_pairs(shuffled_j, shuffled_p, seed=5, **kw) == first  # D13
    assert len(first[0]) > 30
    other = build_pairs(judged, prompts, seed=6, **kw)[0]
    assert [r["split"] for r in other] != [r["split"] for r in first[0]]


def test_split_fraction_per_recipe_and_independent_of_other_rows():
    judged, prompts = _many(600)
    rows, stats = build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT)
    share = stats["rows_by_split"]["sft"] / len(rows)
    assert 0.44 < share < 0.56 and stats["sft_fraction"] == 0.5
    assert all(r["split"] == split_of(r["id"], 0, 0.5) for r in rows)
    wrpo_rows, _ = build_pairs(judged, prompts, recipe="wrpo", pivot=PIVOT)
    assert 0.27 < sum(r["split"] == "sft" for r in wrpo_rows) / len(wrpo_rows) < 0.40
    sub, _ = build_pairs([j for j in judged if j["prompt_id"] < "q100"], prompts[:100], recipe="infifpo", pivot=PIVOT)
    assert {r["id"]: r["split"] for r in sub}.items() <= {r["id"]: r["split"] for r in rows}.items()
    for f, split in ((0.0, "po"), (1.0, "sft")):
        assert {r["split"] for r in build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, sft_fraction=f)[0]} \
            == {split}
    with pytest.raises(ConfigError, match="sft_fraction"):
        build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, sft_fraction=1.5)


def test_stats_numbers():
    judged = [J("a", PIVOT, 0, correct=True), J("a", A, 0, correct=False),
              J("b", A, 0, correct=True), J("b", B, 0, correct=False),
              J("c", A, 0, correct=True), J("c", PIVOT, 0, correct=False),
              J("d", A, 0, correct=True), J("d", B, 0, correct=True),
              J("e", PIVOT, 0, correct=True), J("e", A, 0, correct=False),
              J("e", "outsider", 0, correct=True)]
    prompts = [P("a"), P("b", "code"), P("c"), P("d"), P("e", "general")]
    rows, stats = build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, sources=[A, B], sft_fraction=0.5)
    splits = {r["id"]: r["split"] for r in rows}
    assert sorted(splits) == ["a", "b", "c", "e"]
    assert stats["prompts_in"] == 5 and stats["prompts_out"] == 4 and stats["samples_in"] == 11
    assert stats["dropped"] == {"tie": 1} and stats["samples_excluded"] == {"not_in_pool": 1}
    assert stats["chosen_count"] == {A: 2, PIVOT: 2} and stats["chosen_share"] == {A: 0.5, PIVOT: 0.5}
    assert stats["rejected_count"] == {A: 2, B: 1, PIVOT: 1}
    assert stats["rejected_share"] == {A: 0.5, B: 0.25, PIVOT: 0.25}
    expect = {"math": {"sft": 0, "po": 0}, "code": {"sft": 0, "po": 0}, "general": {"sft": 0, "po": 0}}
    for pid, dom in (("a", "math"), ("b", "code"), ("c", "math"), ("e", "general")):
        expect[dom][splits[pid]] += 1
    assert stats["rows_by_domain"] == {d: {**c, "total": sum(c.values())} for d, c in sorted(expect.items())}
    assert stats["rows_by_split"] == {sp: list(splits.values()).count(sp) for sp in ("sft", "po")}
    assert stats["rows_by_split"]["sft"] not in (0, 4), "fixture should exercise both splits"


# -- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.pop("reward"), r"row 1 \(id='p\|srcA\|0'\): missing column\(s\) \['reward'\]"),
        (lambda r: r.update(prompt_id="zzz", id="zzz|srcA|0"), r"row 1 .*prompt_id 'zzz' is not in the prompts"),
        (lambda r: r.update(id="p|srcA|7"), r"row 1 .*id should be 'p\|srcA\|0'"),
        (lambda r: r.update(reward=float("nan")), r"row 1 .*field 'reward'"),
        (lambda r: r.update(correct="yes"), r"row 1 .*field 'correct'"),
        (lambda r: r.update(correct=1), r"row 1 .*field 'correct'"),
        (lambda r: r.update(finish_reason="eos"), r"row 1 .*field 'finish_reason'"),
        (lambda r: r.update(text={"answer": "1", "score": 2}), r"row 1 .*field 'text'"),
    ],
)
def test_bad_judged_rows_name_the_row(mutate, match):
    judged = [J("p", PIVOT, 0, correct=True), J("p", A, 0, correct=False)]
    mutate(judged[1])
    with pytest.raises(DataFormatError, match=match):
        build_pairs(judged, [P("p")], recipe="infifpo", pivot=PIVOT)


def test_duplicate_samples_bad_prompts_and_unknown_models_are_named():
    judged = [J("p", PIVOT, 0, correct=True), J("p", A, 0, correct=False)]
    with pytest.raises(DataFormatError, match=r"row 2 .*appears twice"):
        build_pairs(judged + [dict(judged[0])], [P("p")], recipe="infifpo", pivot=PIVOT)
    with pytest.raises(DataFormatError, match=r"row 0 .*missing column\(s\) \['domain'\]"):
        build_pairs(judged, [{k: v for k, v in P("p").items() if k != "domain"}], recipe="infifpo", pivot=PIVOT)
    with pytest.raises(ConfigError, match=r"pivot 'smol' has no judged samples; models found: \['pivot', 'srcA'\]"):
        build_pairs(judged, [P("p")], recipe="infifpo", pivot="smol")
    with pytest.raises(ConfigError, match=r"source model\(s\) \['srcZ'\]"):
        build_pairs(judged, [P("p")], recipe="infifpo", pivot=PIVOT, sources=["srcZ"])
    with pytest.raises(ConfigError, match="unknown recipe"):
        build_pairs(judged, [P("p")], recipe="dpo", pivot=PIVOT)


# -- CLI --------------------------------------------------------------------------------------------------------
def test_main_writes_pairs_and_stats_keyed_by_inputs(tmp_path, capsys):
    judged, prompts = _many(40)
    root = tmp_path / "runs"
    p_dir = StageOutput(root, "prompts", {"t": 1}).write_all(prompts)
    judged_against = {"prompts": output_digest(p_dir)}  # recorded as `infifpo judge` records it
    j_dirs = [str(StageOutput(root, f"judged-{m}", {"m": m, **judged_against}).write_all(
        [j for j in judged if j["model"] == m])) for m in (PIVOT, A, B)]
    argv = ["--prompts", str(p_dir), "--recipe", "wrpo", "--pivot", PIVOT, "--seed", "3", "--out", str(root)]
    assert pair.main(["--judged", *j_dirs, *argv]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 and "pairs=" in captured.err  # stdout: the path only; summary: stderr
    out_dir = captured.out.splitlines()[0]
    rows = read_output(out_dir)
    stats = json.loads((Path(out_dir) / "stats.json").read_text())
    expect_rows, expect_stats = build_pairs(judged, prompts, recipe="wrpo", pivot=PIVOT, seed=3)
    assert rows == expect_rows and stats == expect_stats
    assert all(r["split"] in ("sft", "po") and r["id"] for r in rows)
    assert pair.main(["--judged", *reversed(j_dirs), *argv]) == 0  # input order does not change the key
    assert capsys.readouterr().out.splitlines()[0] == out_dir
    assert pair.main(["--judged", *j_dirs, *argv[:-3], "4", "--out", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[0] != out_dir
    config = tmp_path / "pair.yaml"  # the same options from --config, the seed overridden by its flag
    config.write_text(json.dumps({"judged": j_dirs, "prompts": str(p_dir), "recipe": "wrpo", "pivot": PIVOT,
                                  "seed": 4, "out": str(root)}))
    assert pair.main(["--config", str(config), "--seed", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == out_dir


def test_options_follow_the_config_convention(tmp_path, capsys):
    help_lists_every_option(pair.main, PairOptions, capsys)
    misspelt_key_is_named(pair.main, tmp_path, "rnak_by", "rank_by")
    base = {"judged": ["j1", "j2"], "prompts": "p", "recipe": "infifpo", "pivot": PIVOT}
    opts = parse_with_yaml(PairOptions, tmp_path, {**base, "rank_by": "reward", "sft_fraction": 1, "sources": [A]},
                           ["--rank_by", "verifier_first", "--sources", A, B])
    assert opts == PairOptions(**base, rank_by="verifier_first", sft_fraction=1.0, sources=[A, B])
    # the pipeline's spelling: dashed flags built from its YAML, a bare switch for a true bool
    opts = dashed_flags_parse_alike(PairOptions, [
        "--judged", "j1", "--prompts", "p", "--recipe", "wrpo", "--pivot", PIVOT, "--sft_fraction", "0.5",
        "--allow_truncated_chosen", "--min_gap", "0.2", "--max_gap", "0.3", "--rank_by", "reward", "--tie_break",
        "hash", "--sft_chosen", "pivot", "--po_pool", "pivot"])
    assert opts == PairOptions(judged=["j1"], prompts="p", recipe="wrpo", pivot=PIVOT, sft_fraction=0.5,
                               allow_truncated_chosen=True, min_gap=0.2, max_gap=0.3, rank_by="reward",
                               tie_break="hash", sft_chosen="pivot", po_pool="pivot")
    assert set(opts.recipe_options()) | {"judged", "prompts", "out"} == {f.name for f in dataclasses.fields(opts)}
    imports_light("infifpo.pair", "PairOptions")


@pytest.mark.parametrize(("argv", "match"), [
    (["--recipe", "dpo"], r"argument --recipe: invalid choice: 'dpo' \(choose from 'fusechat', 'infifpo', 'wrpo'\)"),
    (["--recipe", "infifpo", "--sft_fraction", "1.5"], r"sft_fraction must be in \[0, 1\], got 1.5"),
    (["--recipe", "infifpo", "--rank-by", "best"], r"--rank_by/--rank-by: invalid choice: 'best'"),
    (["--recipe", "infifpo", "--rank_bi", "reward"], r"unknown flag\(s\) --rank_bi \(did you mean --rank_by\?\)"),
])
def test_bad_options_are_config_errors_before_any_input_is_read(argv, match):
    with pytest.raises(ConfigError, match=match):
        pair.main(["--judged", "nope", "--prompts", "nope", "--pivot", PIVOT, *argv])


def test_recipe_choices_are_the_recipes():
    assert set(typing.get_args(pair.Recipe)) == set(pair.RECIPES) == set(pair.DEFAULT_SFT_FRACTION)


# -- ranking options --------------------------------------------------------------------------------------------
def _tied_pool(pid: str) -> list[dict]:
    """Verifier ties with no rewards: two correct and two incorrect answers, one of each from the pivot."""
    return [J(pid, PIVOT, 0, correct=True), J(pid, PIVOT, 1, correct=False),
            J(pid, A, 0, correct=True), J(pid, A, 1, correct=False)]


def test_pivot_first_takes_the_pivots_own_sample_among_equally_ranked_ones():
    # On every seed, the chosen is the pivot's correct answer and the rejected its incorrect one.
    for seed in range(8):
        row, stats = _one(_tied_pool("p"), [P("p")], recipe="infifpo", pivot=PIVOT, seed=seed)
        assert (row["chosen_sample_id"], row["rejected_sample_id"]) == ("p|pivot|0", "p|pivot|1"), seed
        assert stats["tie_break"] == "pivot_first"


def test_hash_tie_break_picks_other_models_on_some_seeds_and_never_breaks_the_ranking():
    picks = set()
    for seed in range(16):
        row, _ = _one(_tied_pool("p"), [P("p")], recipe="infifpo", pivot=PIVOT, seed=seed, tie_break="hash")
        assert (row["chosen_correct"], row["rejected_correct"]) == (True, False)
        picks.add((row["chosen_model"], row["rejected_model"]))
    assert len(picks) > 1, picks  # with pivot_first it is always (pivot, pivot)


def test_pivot_first_does_not_override_quality():
    # The source's answer is better (correct, the pivot's are not): it is still the chosen one.
    judged = [J("p", PIVOT, 0, correct=False), J("p", PIVOT, 1, correct=False), J("p", A, 0, correct=True)]
    row, _ = _one(judged, [P("p")], recipe="infifpo", pivot=PIVOT)
    assert (row["chosen_model"], row["rejected_model"]) == (A, PIVOT)


def test_rank_by_reward_ignores_the_verifier_and_refuses_a_missing_reward():
    judged = [J("p", PIVOT, 0, correct=True, reward=0.1), J("p", A, 0, correct=False, reward=0.9)]
    row, _ = _one(judged, [P("p")], recipe="infifpo", pivot=PIVOT, rank_by="reward")
    assert (row["chosen_model"], row["chosen_correct"]) == (A, False)  # verifier_first would choose the pivot's
    row, _ = _one(judged, [P("p")], recipe="infifpo", pivot=PIVOT)
    assert row["chosen_model"] == PIVOT
    with pytest.raises(DataFormatError, match=r"field 'reward'.*rank_by"):
        build_pairs([*judged, J("p", B, 0, correct=True)], [P("p")], recipe="infifpo", pivot=PIVOT, rank_by="reward")
    with pytest.raises(ConfigError, match="tie_break"):
        build_pairs(judged, [P("p")], recipe="infifpo", pivot=PIVOT, tie_break="random")


def test_sft_chosen_pivot_drops_sft_rows_whose_best_response_is_a_sources():
    # p1: the pivot has a correct answer (kept either way); p2: only the source is right (dropped from SFT only).
    judged = [*_tied_pool("p1"), J("p2", PIVOT, 0, correct=False), J("p2", A, 0, correct=True)]
    prompts = [P("p1"), P("p2")]
    rows, _ = build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, sft_fraction=1.0)
    assert [r["chosen_model"] for r in rows] == [PIVOT, A]
    rows, stats = build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, sft_fraction=1.0, sft_chosen="pivot")
    assert [(r["id"], r["chosen_model"]) for r in rows] == [("p1", PIVOT)]
    assert stats["dropped"] == {"sft_chosen_not_pivot": 1} and stats["sft_chosen"] == "pivot"
    rows, _ = build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, sft_fraction=0.0, sft_chosen="pivot")
    assert [r["chosen_model"] for r in rows] == [PIVOT, A]  # PO rows keep the pool's best
    with pytest.raises(ConfigError, match="sft_chosen"):
        build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, sft_chosen="source")


def test_po_pool_pivot_draws_po_pairs_from_the_pivots_own_samples():
    # p1: the source's correct answer would be the pool's chosen, but the pivot has a correct one too;
    # p2: only the source is right, so the pivot's own samples tie (all wrong) and the prompt has no on-policy pair.
    judged = [J("p1", PIVOT, 0, correct=False), J("p1", PIVOT, 1, correct=True, reward=0.1),
              J("p1", A, 0, correct=True, reward=0.9), J("p1", A, 1, correct=False),
              J("p2", PIVOT, 0, correct=False), J("p2", PIVOT, 1, correct=False), J("p2", A, 0, correct=True)]
    prompts = [P("p1"), P("p2")]
    rows, _ = build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, sft_fraction=0.0)
    assert [(r["chosen_model"], r["rejected_model"]) for r in rows] == [(A, PIVOT), (A, PIVOT)]
    rows, stats = build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, sft_fraction=0.0, po_pool="pivot")
    assert [(r["id"], r["chosen"][-1]["content"], r["rejected_model"]) for r in rows] == [
        ("p1", f"{PIVOT} answer 1 to p1", PIVOT)]
    assert stats["dropped"] == {"tie": 1} and stats["po_pool"] == "pivot"
    sft, _ = build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, sft_fraction=1.0, po_pool="pivot")
    assert [r["chosen_model"] for r in sft] == [A, A]  # SFT rows keep the pool's best (that is sft_chosen's job)
    with pytest.raises(ConfigError, match="po_pool"):
        build_pairs(judged, prompts, recipe="infifpo", pivot=PIVOT, po_pool="sources")


def test_a_recipe_that_keeps_no_prompt_is_a_named_error_and_writes_nothing(tmp_path):
    """Every prompt's samples tie (all wrong, no reward): no pair at all is an EmptyOutputError naming the drop
    reasons, not an empty output that exits 0."""
    root = tmp_path / "runs"
    p_dir = StageOutput(root, "prompts", {"t": 1}).write_all([P("p"), P("q")])
    rows = [J(p, m, 0, correct=False) for p in ("p", "q") for m in (PIVOT, A)]
    j_dir = StageOutput(root, "judged", {"prompts": output_digest(p_dir)}).write_all(rows)
    with pytest.raises(EmptyOutputError, match=r"no preference rows: all 2 prompts were dropped \(\{'"):
        pair.main(["--judged", str(j_dir), "--prompts", str(p_dir), "--recipe", "infifpo", "--pivot", PIVOT, "--out",
                   str(root)])
    assert not list(root.glob("pairs-*/_SUCCESS"))
