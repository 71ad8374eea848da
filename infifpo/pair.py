"""Stage `pair`: judged samples -> preference rows by a recipe, with a seeded SFT / PO split and a stats summary.

Owns: the recipes of docs/methods.md "Data recipes" (InfiFPO best/worst, WRPO quadruple, FuseChat same-source reward
gap), which samples may be chosen, why a prompt is dropped, the split, and the stats. Does not own: judging
(`infifpo.judge`), the column names (`schema`) or the on-disk format (`store`). The CLI (``PairOptions``, from flags
or ``--config FILE``) refuses judged outputs judged against other prompts than its ``--prompts``
(``provenance.InputMismatchError``): rows join by prompt id.

Samples are ranked by correctness first (True > None > False), then reward (higher is better, None lowest)
(``rank_by="verifier_first"``, the default), or by the reward alone (``rank_by="reward"``, the paper's recipe, which
needs a reward for every sample). Equal-ranked samples are ordered by ``tie_break``: ``"pivot_first"`` (default) makes
the pivot's own sample the chosen among equally good ones and the rejected among equally bad ones, so a pair differs
in quality rather than in which model wrote it (with a verifier most samples tie: every correct answer ranks the
same); ``"hash"`` leaves it to the hash alone. Last comes a hash of (seed, sample id), so the result never depends on
row order. A response with
finish_reason "length" or "error" may be rejected but not chosen unless ``allow_truncated_chosen``
(docs/bad-inputs.md S3); empty or whitespace-only responses are excluded (docs/bad-inputs.md D7). A prompt whose best
and worst rank the same, or whose chosen and rejected texts are identical (docs/bad-inputs.md D6), is dropped and
counted with its reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from infifpo.config import parse_config
from infifpo.provenance import output_digest, require_built_from
from infifpo.schema import (
    SPLITS,
    ConfigError,
    DataFormatError,
    EmptyOutputError,
    row_label,
    validate_prompts,
    validate_samples,
)
from infifpo.store import StageOutput, announce, read_output

logger = logging.getLogger(__name__)

PAIR_VERSION = 2  # bump when a recipe changes what it picks, so old outputs are not reused (2: rank_by, tie_break)
CORRECT_RANK = {True: 2, None: 1, False: 0}
Recipe = Literal["fusechat", "infifpo", "wrpo"]  # the keys of RECIPES
RankBy = Literal["verifier_first", "reward"]
TieBreak = Literal["pivot_first", "hash"]
# Whose response an SFT-split row may be trained on: "any" (the paper: the best response of the pool) or "pivot" (only
# the pivot's own; a prompt whose best response is a source's is dropped from SFT as "sft_chosen_not_pivot"). At the
# embedded default's scale the best source answers "The answer is N." without working, and SFT on those rows cost the
# 135M pivot arithmetic accuracy, while SFT on its own correct answers raised it (README, "What `make fpo` runs").
SftChosen = Literal["any", "pivot"]
# Which samples an InfiFPO PO-split pair is drawn from: "all" (the paper: best vs worst over pivot and sources) or
# "pivot" (the pivot's own samples only, an on-policy pair; the sources still enter through the fused reference, which
# scores both responses under every source). At the embedded default's scale the best source answers bare, so a pool
# pair's chosen and rejected differ in form (a bare answer vs worked text) more than in correctness, and InfiFPO on
# such pairs learnt to answer bare (README). WRPO's y_wt / y_l and FuseChat's pairs are within one model already.
PoPool = Literal["all", "pivot"]
RANK_BY, TIE_BREAKS, SFT_CHOSEN, PO_POOL = get_args(RankBy), get_args(TieBreak), get_args(SftChosen), get_args(PoPool)
# docs/methods.md "Data recipes": InfiFPO half / half; WRPO one third SFT, two thirds PO; FuseChat-3.0 is plain DPO.
DEFAULT_SFT_FRACTION = {"infifpo": 0.5, "wrpo": 1 / 3, "fusechat": 0.0}

Sample = dict[str, Any]
Picked = dict[str, Sample]  # {"chosen", "rejected"[, "source_chosen"]} -> judged row


@dataclass(frozen=True)
class RecipeOptions:
    """What a recipe needs besides the samples: the pool, the seed and the recipe's knobs."""

    pivot: str
    sources: tuple[str, ...]
    seed: int = 0
    allow_truncated_chosen: bool = False
    min_gap: float = 0.01  # FuseChat reward-gap window, reward units
    max_gap: float = 0.1
    rank_by: RankBy = "verifier_first"
    tie_break: TieBreak = "pivot_first"
    sft_chosen: SftChosen = "any"
    po_pool: PoPool = "all"


# -- ranking ----------------------------------------------------------------------------------------------------
def quality(s: Sample, rank_by: str = "verifier_first") -> tuple[float, ...]:
    """Compared as a tuple, higher is better: (correctness rank, reward), or (reward,) with ``rank_by="reward"``;
    a missing reward ranks lowest."""
    reward = -math.inf if s["reward"] is None else float(s["reward"])
    return (reward,) if rank_by == "reward" else (CORRECT_RANK[s["correct"]], reward)


def _order_key(s: Sample, opts: RecipeOptions, *, worst: bool = False) -> tuple[tuple[float, ...], int, str]:
    """Sort key, higher = better: quality, then (``pivot_first``) the pivot's own sample first among the best and
    last among the worst, then a seeded hash of the sample id."""
    own = int(opts.tie_break == "pivot_first" and s["model"] == opts.pivot)
    tie = hashlib.sha256(f"{opts.seed}|{s['id']}".encode()).hexdigest()
    return quality(s, opts.rank_by), -own if worst else own, tie


def best(samples: list[Sample], opts: RecipeOptions) -> Sample:
    """The highest-ranked sample; ties as ``opts.tie_break`` says, then by a seeded hash (never by row order)."""
    return max(samples, key=lambda s: _order_key(s, opts))


def worst(samples: list[Sample], opts: RecipeOptions) -> Sample:
    """The lowest-ranked sample; ties as ``opts.tie_break`` says, then by a seeded hash (never by row order)."""
    return min(samples, key=lambda s: _order_key(s, opts, worst=True))


def may_be_chosen(s: Sample, opts: RecipeOptions) -> bool:
    """A finished response may be chosen; a truncated one only when allowed; an errored one never
    (docs/bad-inputs.md S3)."""
    return s["finish_reason"] == "stop" or (opts.allow_truncated_chosen and s["finish_reason"] == "length")


def best_vs_worst(pool: list[Sample], opts: RecipeOptions) -> Picked | str:
    """Chosen = best sample that may be chosen, rejected = worst of the others; or the reason there is no pair."""
    if len(pool) < 2:
        return "too_few_responses"
    candidates = [s for s in pool if may_be_chosen(s, opts)]
    if not candidates:
        return "no_eligible_chosen"
    chosen = best(candidates, opts)
    rejected = worst([s for s in pool if s is not chosen], opts)
    if quality(chosen, opts.rank_by) == quality(rejected, opts.rank_by):
        return "tie"
    if quality(chosen, opts.rank_by) < quality(rejected, opts.rank_by):  # every better one was truncated or errored
        return "best_ineligible"
    if chosen["text"].strip() == rejected["text"].strip():
        return "identical"
    return {"chosen": chosen, "rejected": rejected}


# -- recipes ----------------------------------------------------------------------------------------------------
def pair_infifpo(samples: list[Sample], domain: str, opts: RecipeOptions) -> Picked | str:
    """InfiFPO: best vs worst over every sample of the prompt, pivot and sources together."""
    return best_vs_worst([s for s in samples if s["model"] in (opts.pivot, *opts.sources)], opts)


def pair_wrpo(samples: list[Sample], domain: str, opts: RecipeOptions) -> Picked | str:
    """WRPO: source_chosen (y_ws) = best source sample; chosen (y_wt) / rejected (y_l) = best / worst pivot sample.

    y_ws must rank strictly above y_l, else the preference y_ws > y_l has no support and the prompt is dropped.
    """
    from_sources = [s for s in samples if s["model"] in opts.sources and may_be_chosen(s, opts)]
    if not from_sources:
        return "no_source_chosen"
    picked = best_vs_worst([s for s in samples if s["model"] == opts.pivot], opts)
    if isinstance(picked, str):
        return f"target_{picked}"
    source_chosen = best(from_sources, opts)
    if quality(source_chosen, opts.rank_by) <= quality(picked["rejected"], opts.rank_by):
        return "source_not_better"
    return {**picked, "source_chosen": source_chosen}


def pair_fusechat(samples: list[Sample], domain: str, opts: RecipeOptions) -> Picked | str:
    """FuseChat-3.0: best vs worst of the same source model. Models are tried best-response first; the first pair
    that qualifies wins. A pair qualifies when the verifier separates it (correct vs not), or, when neither side
    has a verdict, when the reward gap lies in [min_gap, max_gap]. Same verdict on both sides (math/code) drops it.
    """
    by_model: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s["model"] in opts.sources:
            by_model[s["model"]].append(s)
    if not by_model:
        return "no_source_samples"
    tops = {m: _order_key(best(ss, opts), opts) for m, ss in by_model.items()}
    reasons = []
    for model in sorted(by_model, key=tops.__getitem__, reverse=True):
        picked = _fusechat_model(by_model[model], opts)
        if not isinstance(picked, str):
            return picked
        reasons.append(picked)
    return reasons[0]


def _fusechat_model(pool: list[Sample], opts: RecipeOptions) -> Picked | str:
    picked = best_vs_worst(pool, opts)
    if isinstance(picked, str):
        return picked
    c, r = picked["chosen"], picked["rejected"]
    if c["correct"] != r["correct"]:
        return picked
    if c["correct"] is not None:
        return "same_correctness"
    if c["reward"] is None or r["reward"] is None:
        return "no_reward"
    gap = c["reward"] - r["reward"]
    if gap < opts.min_gap:
        return "gap_below_window"
    return "gap_above_window" if gap > opts.max_gap else picked


RECIPES = {"infifpo": pair_infifpo, "wrpo": pair_wrpo, "fusechat": pair_fusechat}


# -- validation -------------------------------------------------------------------------------------------------
def _resolve_options(models: set[str], recipe: str, pivot: str, sources: list[str] | None,
                     **kw: Any) -> RecipeOptions:
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}.")
    if pivot not in models:
        raise ConfigError(f"pivot {pivot!r} has no judged samples; models found: {sorted(models)}.")
    sources = sorted(models - {pivot}) if sources is None else list(sources)
    missing = [m for m in sources if m not in models]
    if missing:
        raise ConfigError(f"source model(s) {missing} have no judged samples; models found: {sorted(models)}.")
    if kw.get("rank_by", RANK_BY[0]) not in RANK_BY:
        raise ConfigError(f"rank_by must be one of {RANK_BY}, got {kw['rank_by']!r}.")
    if kw.get("sft_chosen", SFT_CHOSEN[0]) not in SFT_CHOSEN:
        raise ConfigError(f"sft_chosen must be one of {SFT_CHOSEN}, got {kw['sft_chosen']!r}.")
    if kw.get("po_pool", PO_POOL[0]) not in PO_POOL:
        raise ConfigError(f"po_pool must be one of {PO_POOL}, got {kw['po_pool']!r}.")
    if kw.get("tie_break", TIE_BREAKS[0]) not in TIE_BREAKS:
        raise ConfigError(f"tie_break must be one of {TIE_BREAKS}, got {kw['tie_break']!r}.")
    if recipe == "wrpo" and pivot in sources:
        raise ConfigError(f"wrpo: the pivot {pivot!r} cannot also be a source.")
    if recipe != "infifpo" and not sources:
        raise ConfigError(f"{recipe}: needs at least one source model besides the pivot {pivot!r}.")
    return RecipeOptions(pivot=pivot, sources=tuple(sources), **kw)


# -- building ---------------------------------------------------------------------------------------------------
def check_sft_fraction(fraction: float) -> float:
    """``fraction`` when it is a share in [0, 1]; ConfigError otherwise."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"sft_fraction must be in [0, 1], got {fraction}.")
    return fraction


def split_of(prompt_id: str, seed: int, sft_fraction: float) -> str:
    """'sft' or 'po' from a hash of (prompt id, seed): stable across runs and independent of the other rows."""
    u = int(hashlib.sha256(f"{seed}|{prompt_id}".encode()).hexdigest()[:13], 16) / 16**13
    return SPLITS[0] if u < sft_fraction else SPLITS[1]


def _message(s: Sample) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": s["text"]}]


def pair_row(prompt: dict[str, Any], picked: Picked, split: str, recipe: str) -> dict[str, Any]:
    """One pairs row (schema.PAIR_COLUMNS, TRL conversational) plus provenance columns for every response."""
    row = {"id": prompt["id"], "prompt": prompt["prompt"], "chosen": _message(picked["chosen"]),
           "rejected": _message(picked["rejected"]), "split": split, "domain": prompt["domain"],
           "recipe": recipe}
    for name, s in picked.items():
        if name == "source_chosen":
            row["source_chosen"] = _message(s)
        row.update({f"{name}_model": s["model"], f"{name}_reward": s["reward"], f"{name}_correct": s["correct"],
                    f"{name}_sample_id": s["id"]})
    return row


def build_pairs(
    judged_rows: list[dict[str, Any]], prompt_rows: list[dict[str, Any]], *, recipe: str, pivot: str,
    sources: list[str] | None = None, seed: int = 0, sft_fraction: float | None = None,
    allow_truncated_chosen: bool = False, min_gap: float = 0.01, max_gap: float = 0.1,
    rank_by: str = "verifier_first", tie_break: str = "pivot_first", sft_chosen: str = "any", po_pool: str = "all",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference rows (sorted by id) and a stats summary; judged rows join prompts by prompt_id, never by order.

    ``sources`` defaults to every judged model except the pivot; ``sft_fraction`` to the recipe's paper value;
    ``rank_by`` and ``tie_break``: see the module docstring. ``rank_by="reward"`` refuses a sample without a reward.
    ``sft_chosen``: see ``SFT_CHOSEN``; ``po_pool``: see ``PO_POOL``.
    """
    prompts = validate_prompts(prompt_rows)
    validate_samples(judged_rows, prompts, judged=True)
    by_prompt: dict[str, list[Sample]] = defaultdict(list)
    for i, row in enumerate(judged_rows):
        if rank_by == "reward" and row["reward"] is None:
            raise DataFormatError(f"{row_label(i, row)}, field 'reward': null, but rank_by='reward' ranks by the "
                                  "reward alone. Judge with a reward model (judge: reward_model) or use rank_by "
                                  "'verifier_first'.")
        by_prompt[row["prompt_id"]].append(row)
    opts = _resolve_options({r["model"] for r in judged_rows}, recipe, pivot, sources, seed=seed, min_gap=min_gap,
                            max_gap=max_gap, allow_truncated_chosen=allow_truncated_chosen, rank_by=rank_by,
                            tie_break=tie_break, sft_chosen=sft_chosen, po_pool=po_pool)
    fraction = check_sft_fraction(DEFAULT_SFT_FRACTION[recipe] if sft_fraction is None else sft_fraction)
    rows, dropped, excluded = [], Counter(), Counter()
    for pid in sorted(prompts):
        samples = by_prompt.get(pid, [])
        excluded["not_in_pool"] += sum(s["model"] not in (pivot, *opts.sources) for s in samples)
        kept = [s for s in samples if s["text"].strip()]
        excluded["empty_response"] += len(samples) - len(kept)
        split = split_of(pid, seed, fraction)
        if recipe == "infifpo" and split == "po" and po_pool == "pivot":
            kept = [s for s in kept if s["model"] == pivot]
        picked = RECIPES[recipe](kept, prompts[pid]["domain"], opts) if samples else "no_samples"
        if not isinstance(picked, str) and split == "sft" and sft_chosen == "pivot" \
                and picked["chosen"]["model"] != pivot:
            picked = "sft_chosen_not_pivot"
        if isinstance(picked, str):
            dropped[picked] += 1
            continue
        rows.append(pair_row(prompts[pid], picked, split, recipe))
    stats = pair_stats(rows, dropped, excluded, prompts_in=len(prompts), samples_in=len(judged_rows))
    stats.update(recipe=recipe, pivot=pivot, sources=list(opts.sources), seed=seed, sft_fraction=fraction,
                 rank_by=rank_by, tie_break=tie_break, sft_chosen=sft_chosen, po_pool=po_pool)
    return rows, stats


def pair_stats(rows: list[dict[str, Any]], dropped: Counter, excluded: Counter, *, prompts_in: int,
               samples_in: int) -> dict[str, Any]:
    """Counts per domain and split, each model's share of chosen / rejected / source_chosen, and drop reasons."""
    by_domain: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
    for r in rows:
        by_domain[r["domain"]][r["split"]] += 1
    shares = {}
    for col in ("chosen", "rejected", "source_chosen"):
        counts = Counter(r[f"{col}_model"] for r in rows if f"{col}_model" in r)
        if counts:
            total = sum(counts.values())
            shares[f"{col}_share"] = {m: round(c / total, 6) for m, c in sorted(counts.items())}
            shares[f"{col}_count"] = dict(sorted(counts.items()))
    return {
        "prompts_in": prompts_in, "prompts_out": len(rows), "samples_in": samples_in,
        "samples_excluded": {k: v for k, v in sorted(excluded.items()) if v},
        "dropped": dict(sorted(dropped.items())),
        "rows_by_split": {sp: sum(d[sp] for d in by_domain.values()) for sp in SPLITS},
        "rows_by_domain": {d: {**c, "total": sum(c.values())} for d, c in sorted(by_domain.items())},
        **shares,
    }


@dataclass
class PairOptions:
    """The options of `infifpo pair` (``--config FILE`` and flags, ``infifpo.config``)."""

    judged: list[str] = field(metadata={"help": "judged stage output directories (any order)"})
    prompts: str = field(metadata={"help": "the prompts stage output the samples were drawn from"})
    recipe: Recipe = field(metadata={"help": "which pairs to build (docs/methods.md, \"Data recipes\")"})
    pivot: str = field(metadata={"help": "the pivot (target) model's name as in the judged rows"})
    sources: list[str] | None = field(default=None, metadata={
        "help": "source models; unset: every other judged model"})
    sft_fraction: float | None = field(default=None, metadata={
        "help": "share of prompts in the SFT split; unset: the recipe's paper value (DEFAULT_SFT_FRACTION)"})
    allow_truncated_chosen: bool = field(default=False, metadata={"help": "let length-truncated responses be chosen"})
    min_gap: float = field(default=0.01, metadata={"help": "fusechat: smallest reward gap kept"})
    max_gap: float = field(default=0.1, metadata={"help": "fusechat: largest reward gap kept"})
    rank_by: RankBy = field(default="verifier_first", metadata={
        "help": "verifier verdict then reward, or the reward alone (the paper's recipe)"})
    tie_break: TieBreak = field(default="pivot_first", metadata={
        "help": "among equally ranked samples, the pivot's own first, or by hash only"})
    sft_chosen: SftChosen = field(default="any", metadata={
        "help": "SFT rows trained on any model's best response (the paper) or only the pivot's own"})
    po_pool: PoPool = field(default="all", metadata={
        "help": "InfiFPO PO pairs drawn from every model's samples (the paper) or the pivot's own"})
    seed: int = field(default=0, metadata={"help": "seed of the split and of hash tie-breaks"})
    out: str = field(default="runs", metadata={"help": "root directory of stage outputs"})

    def __post_init__(self) -> None:
        if self.sft_fraction is not None:
            check_sft_fraction(self.sft_fraction)

    def recipe_options(self) -> dict[str, Any]:
        """The keyword arguments of ``build_pairs`` (also what the output is keyed by besides its inputs)."""
        return {k: v for k, v in asdict(self).items() if k not in ("judged", "prompts", "out")}


def main(argv: list[str] | None = None) -> int:
    """`infifpo pair --judged DIR [DIR...] --prompts DIR --recipe R --pivot NAME [...] [--out ROOT]`, or the same
    options in ``--config FILE``."""
    opts = parse_config(PairOptions, argv, prog="infifpo pair",
                        description="Build preference rows from judged samples.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    judged = [row for d in opts.judged for row in read_output(d)]
    prompts = read_output(opts.prompts)
    prompts_digest = output_digest(opts.prompts)
    for d in opts.judged:  # every input checked before anything is written
        require_built_from(d, "prompts", prompts_digest, what="prompts", given=f"--prompts {opts.prompts}",
                           fix=f"Pass the prompts output {d} was judged against, or judge its samples again with "
                               f"`infifpo judge --prompts {opts.prompts}`.")
    options = opts.recipe_options()
    key = {"stage": "pair", "version": PAIR_VERSION, **options, "prompts": prompts_digest,
           "judged": sorted(output_digest(d) for d in opts.judged)}
    out = StageOutput(opts.out, f"pairs-{opts.recipe}", key).lock()
    if out.is_complete():
        logger.info("pairs already built for these inputs; reusing %s", out.path)
        stats = json.loads((out.path / "stats.json").read_text())
    else:
        rows, stats = build_pairs(judged, prompts, **options)
        if not rows:
            raise EmptyOutputError(
                f"no preference rows: all {stats['prompts_in']} prompts were dropped ({stats['dropped']}); nothing "
                "was written. docs/formats.md (the pairs' stats.json) says what each reason means; the usual fixes "
                "are more samples per prompt, a larger max_tokens (truncated responses cannot be chosen), or "
                "allow_truncated_chosen.")
        out.path.mkdir(parents=True, exist_ok=True)
        (out.path / "stats.json").write_text(json.dumps(stats, indent=1))  # before _SUCCESS: complete => has stats
        out.write_all(rows)
    announce(out.path, summary=f"pairs={stats['prompts_out']} of prompts={stats['prompts_in']}  "
                               f"splits={stats['rows_by_split']}  dropped={stats['dropped']}")
    return 0
