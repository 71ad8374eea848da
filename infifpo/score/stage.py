"""Stage `score`: pairs -> the summed log-prob, mean log-prob and token count of every response under the frozen
pivot and under every source model, each with its own tokenizer and chat template.

Owns: which rows/columns are scored, bad-input policies (empty, too long), one resumable per-model output (so a
changed source re-scores only itself), ``--split`` selection, and ``ScoreOptions``, the stage's options (flags, or a
``--config`` YAML of the same names; ``infifpo.config``). The files it writes (per-model identity, run
statistics in ``score_stats.json``, the assembled scored-pairs format) are ``infifpo.score.output``'s.
The tokens of a response are ``logprobs.response_spans`` of the row's prompt and all its responses, which for the
pivot are exactly the tokens TRL's DPOTrainer sums over. ``--num_shards N`` runs N local worker processes, one per
shard (``infifpo.shards``; docs/scaling.md).
Does not own: running models (``backends``), the token split (``logprobs``), or fusion (``fusion``, trainers).
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import math
import multiprocessing
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm
from transformers import AutoConfig

from infifpo import shards, store
from infifpo.backends import load_engine
from infifpo.backends.hf_engine import resolve_dtype
from infifpo.backends.vllm_engine import one_engine_process
from infifpo.config import parse_config
from infifpo.logprobs import Messages, require_chat_template, response_spans
from infifpo.models.resolve import load_tokenizer, model_identity, resolve_model
from infifpo.precision import model_dir_shape
from infifpo.schema import (
    RESPONSE_COLUMNS,
    SPLITS,
    ChatTemplateError,
    DataFormatError,
    ModelLoadError,
    ScoredPairsError,
    check_messages,
    require_columns,
    row_label,
)
from infifpo.score.output import ShardStats, assemble, finalize_model

logger = logging.getLogger(__name__)

# Part of every per-model output's key: bump when what is written for the same inputs changes, so older outputs are
# not reused (2: per-response mean next-token entropies, `<R>_mean_entropy`, with the transformers backend).
SCORE_VERSION = 2
Policy = Literal["error", "drop"]  # what to do with an empty or a too-long response: stop, or drop the row (counted)
POLICIES = {"on_empty": typing.get_args(Policy), "on_too_long": typing.get_args(Policy)}
Split = Literal[(*SPLITS, "all")]


@dataclass(frozen=True)
class ScoreJob:
    """The settings and rows of one ``score_pairs`` call, the same for every model it scores (pickled into a model's
    own process with the vllm backend)."""

    rows: list[dict[str, Any]]  # the rows scored: the selected split, less rows dropped for an empty response
    texts: dict[str, dict[str, str]]  # row id -> {response column: its text}
    pairs_fp: str  # fingerprint of the scored texts, part of every per-model output's key
    out_root: str
    backend: str
    dtype: str  # as asked ("auto" resolves per model)
    shard: tuple[int, int]
    on_too_long: str
    max_length: int | None
    write_every: int
    engine_kw: dict[str, Any]


# ---------------------------------------------------------------- Python API


def score_responses(model: str, prompts: list[Messages], responses: list[str] | list[list[str]], *,
                    backend: str = "transformers", **engine_kw: Any) -> list[dict] | list[list[dict]]:
    """Score responses to ``prompts`` under ``model`` (its own tokenizer and chat template).

    ``responses[i]`` is one response (str) or several (list[str], split jointly as DPOTrainer splits a row's chosen
    and rejected). Returns, in the same nesting, ``{"sum": nats, "mean": nats/token, "num_tokens": int}`` with
    mean = sum / num_tokens.
    """
    nested = bool(responses) and isinstance(responses[0], list)
    groups = responses if nested else [[r] for r in responses]
    if len(groups) != len(prompts):
        raise DataFormatError(f"{len(prompts)} prompts but {len(groups)} responses")
    tokenizer = load_tokenizer(model)
    spans = []
    for i, (prompt, group) in enumerate(zip(prompts, groups, strict=True)):
        row = {"id": i, "prompt": prompt}
        check_messages(prompt, i, row, "prompt")
        for r in group:
            _check_text(r, i, row, "response")
        spans.append(_spans(tokenizer, prompt, group, i, row, model))
    engine = load_engine(backend, resolve_model(model), **engine_kw)
    try:
        logps = engine.score([p for p, cs in spans for _ in cs], [c for _, cs in spans for c in cs])
    finally:
        engine.close()
    flat = iter(logps)
    out = [[_summary(next(flat), i, {"id": i}, "response", model) for _ in cs] for i, (_, cs) in enumerate(spans)]
    return out if nested else [o[0] for o in out]


def score_pairs(rows: list[dict[str, Any]], *, pivot: str, sources: Sequence[str], out_root: str | Path,
                backend: str = "transformers", dtype: str = "auto", shard: tuple[int, int] = (0, 1),
                on_empty: str = "error", on_too_long: str = "error", max_length: int | None = None,
                write_every: int = 64, split: str | None = None, **engine_kw: Any) -> Path | None:
    """Score every response column of ``rows`` (pairs format) under ``pivot`` and each of ``sources``.

    One model at a time (with ``backend="vllm"`` each in its own spawned process so memory returns to baseline),
    each into a resumable per-model output under ``out_root``; then, once every row of every model is done (all
    shards), the joined scored-pairs output. Returns its directory, or None while other shards are outstanding.
    ``split`` ("po" | "sft" | "all"; None: "po" when rows have a ``split`` column, else "all") selects the rows scored
    and assembled: the preference trainers read po rows only, so scoring sft rows would be wasted compute.
    """
    for name, value in (("on_empty", on_empty), ("on_too_long", on_too_long)):
        if value not in POLICIES[name]:
            raise ValueError(f"{name}={value!r}: use one of {POLICIES[name]}")
    rows = select_split(rows, split)
    texts = _validate_rows(rows, on_empty)
    pairs_fp = store.fingerprint(sorted((r["id"], r["prompt"], texts[r["id"]]) for r in rows if r["id"] in texts))
    models = list(dict.fromkeys([pivot, *sources]))
    job = ScoreJob(rows=[r for r in rows if r["id"] in texts], texts=texts, pairs_fp=pairs_fp, out_root=str(out_root),
                   backend=backend, dtype=dtype, shard=shard, on_too_long=on_too_long, max_length=max_length,
                   write_every=write_every, engine_kw=engine_kw)
    for ref in models:  # every model's tokenizer and chat template, before the first model is scored
        require_chat_template(_tokenizer_and_limit(ref, resolve_model(ref), max_length)[0], ref)
    outputs = {}
    for ref in models:
        role = "pivot" if ref == pivot else "source"
        if backend == "vllm":  # a fresh process per engine: vLLM's memory is only returned when its process exits
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                outputs[ref] = pool.submit(_score_model_alone, ref, job, role).result()
        else:
            outputs[ref] = score_model(ref, job, role)
    if not all(out.is_complete() for out in outputs.values()):
        logger.info("score: shard %d/%d done; run the remaining shards to assemble the scored pairs", *shard)
        return None
    return assemble(job.rows, pivot, list(sources), outputs, out_root)


def _score_model_alone(ref: str, job: ScoreJob, role: str) -> store.StageOutput:
    """``score_model`` in a process that holds this one engine (see ``one_engine_process``)."""
    with one_engine_process(job.backend):
        return score_model(ref, job, role)


# ---------------------------------------------------------------- input checks


def select_split(rows: list[dict[str, Any]], split: str | None) -> list[dict[str, Any]]:
    """The rows of ``split`` ("po" | "sft" | "all"); None means "po" when any row has a ``split`` column, else all.
    Raises DataFormatError when a row has no ``split`` to select by, or no row is left."""
    if split is None:
        split = "po" if any("split" in r for r in rows) else "all"
    if split == "all":
        return rows
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {(*SPLITS, 'all')}")
    for i, row in enumerate(rows):
        if "split" not in row:
            raise DataFormatError(f"{row_label(i, row)}: no 'split' column to select split {split!r} by; add it "
                                  "(pair stage rows have it) or score every row with `--split all`.")
    kept = [r for r in rows if r["split"] == split]
    if not kept:
        present = sorted({str(r["split"]) for r in rows})
        raise DataFormatError(f"no row has split {split!r} (splits present: {present}); use --split "
                              f"{present[0] if present else 'all'} or --split all.")
    logger.info("score: %d of %d rows have split %r and are scored; the others are skipped", len(kept), len(rows),
                split)
    return kept


def _check_text(value: Any, index: int, row: dict, field: str) -> None:
    if not isinstance(value, str):
        raise DataFormatError(f"{row_label(index, row)}, field {field!r}: expected a string, "
                              f"got {type(value).__name__}.")
    if not value.strip():
        raise DataFormatError(
            f"{row_label(index, row)}, field {field!r}: the response is empty (whitespace only), so it has no "
            "log-prob. Fix the data, or drop such rows with `--on_empty drop` (they are counted)."
        )


def response_text(row: dict[str, Any], column: str, index: int) -> str:
    """The assistant text of response column ``column``: a string, or a one-message assistant list (TRL format)."""
    value = row[column]
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise DataFormatError(
                f"{row_label(index, row)}, field {column!r}: expected one assistant message "
                f"[{{'role': 'assistant', 'content': ...}}], got {value!r:.120}."
            )
        value = value[0].get("content")
    _check_text(value, index, row, column)
    return value


def _validate_rows(rows: list[dict[str, Any]], on_empty: str) -> dict[str, dict[str, str]]:
    """id -> {column: text} for every row kept; raises DataFormatError on malformed rows (empty ones per policy)."""
    texts: dict[str, dict[str, str]] = {}
    dropped = []
    for i, row in enumerate(rows):
        require_columns(row, ("id", "prompt", "chosen", "rejected"), i, "pairs")
        if row["id"] in texts:
            raise DataFormatError(f"{row_label(i, row)}: duplicate id; ids must be unique.")
        check_messages(row["prompt"], i, row, "prompt")
        try:
            texts[row["id"]] = {c: response_text(row, c, i) for c in RESPONSE_COLUMNS if row.get(c) is not None}
        except DataFormatError as e:
            if on_empty != "drop" or "is empty" not in str(e):
                raise
            dropped.append(row["id"])
    if dropped:
        logger.warning("score: dropped %d row(s) with an empty response (--on_empty drop): %s", len(dropped),
                       dropped[:10])
    return texts


def _spans(tokenizer: Any, prompt: Messages, responses: list[str], index: int, row: dict, model: str):
    try:
        return response_spans(tokenizer, prompt, responses)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"{row_label(index, row)}, model {model!r}: {e}") from e


def _summary(logps: list[float], index: int, row: dict, field: str, model: str,
             entropies: list[float] | None = None) -> dict[str, Any]:
    """{"sum", "mean", "num_tokens"} of one response's per-token log-probs, and "mean_entropy" (nats/token) when
    the engine gave per-token ``entropies``."""
    total = math.fsum(logps)
    mean_entropy = None if entropies is None else math.fsum(entropies) / len(entropies)
    for what, value in (("log-prob", total), ("mean entropy", mean_entropy)):
        if value is not None and not math.isfinite(value):
            raise ScoredPairsError(
                f"{row_label(index, row)}, field {field!r}, model {model!r}: {what} is {value} (not finite); the "
                "model produced NaN/inf (broken weights, or fp16 overflow: try --dtype float32)."
            )
    out = {"sum": total, "mean": total / len(logps), "num_tokens": len(logps)}
    return out if mean_entropy is None else {**out, "mean_entropy": mean_entropy}


# ---------------------------------------------------------------- one model


def _output_name(ref: str) -> str:
    return "score-" + store.safe_name(Path(ref).name or ref)


def model_output(ref: str, job: ScoreJob) -> tuple[store.StageOutput, str, str]:
    """(the per-model StageOutput, the model's local dir, resolved dtype) for ``ref`` under ``job``'s settings."""
    path = resolve_model(ref)
    device = job.engine_kw.get("device", "cuda" if job.backend == "vllm" and torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(job.dtype, device, model_dir_shape(path))
    key = {"version": SCORE_VERSION, "model": model_identity(path), "backend": job.backend, "dtype": dtype,
           "pairs": job.pairs_fp,
           "max_length": job.max_length, "on_too_long": job.on_too_long, "spans": "trl-conversational"}
    return store.StageOutput(job.out_root, _output_name(ref), key), path, dtype


def score_model(ref: str, job: ScoreJob, role: str = "source") -> store.StageOutput:
    """Score the job's rows (this shard, not yet done) under one model; finalize its output (with its
    ``score_stats.json``) once every row of every shard is done. ``role`` ("pivot" | "source") is recorded there."""
    out, path, dtype = model_output(ref, job)
    out.lock(*job.shard)  # one writer per (output, shard)
    if out.is_complete():
        logger.info("score %s: already complete at %s", ref, out.path)
        return out
    shard, num_shards = job.shard
    done = out.done_ids()
    todo = [(i, r) for i, r in enumerate(job.rows)
            if r["id"] not in done and store.in_shard(r["id"], *job.shard)]
    if todo:
        start = time.perf_counter()
        tokenizer, limit = _tokenizer_and_limit(ref, path, job.max_length)
        encoded, too_long = _encode(tokenizer, todo, job, ref, limit)
        with out.open_shard(shard, num_shards) as writer:
            stats = ShardStats(out, shard, num_shards)
            stats.add(load_seconds=time.perf_counter() - start)
            writer.write([{"id": rid, "status": "too_long"} for rid in too_long])
            stats.save()
            if encoded:
                _score_encoded(ref, path, dtype, encoded, writer, job, stats)
    if out.done_ids() >= {r["id"] for r in job.rows}:
        finalize_model(out, {"model": ref, "role": role, "backend": job.backend, "dtype": dtype})
    return out


def _tokenizer_and_limit(ref: str, path: str, max_length: int | None) -> tuple[Any, int | None]:
    """The model's tokenizer and its token limit: min(max_position_embeddings, ``max_length``)."""
    try:
        tokenizer = load_tokenizer(ref)
        config = AutoConfig.from_pretrained(path).get_text_config()
    except Exception as e:
        raise ModelLoadError(f"model {ref!r} ({path}): config or tokenizer could not be loaded: {e}") from e
    limits = [x for x in (getattr(config, "max_position_embeddings", None), max_length) if x]
    return tokenizer, (min(limits) if limits else None)


def _encode(tokenizer: Any, todo: list, job: ScoreJob, ref: str, limit: int | None):
    """[(index, row, prompt ids, {column: completion ids})] for rows that fit ``limit``, and ids of rows that do
    not."""
    encoded, too_long = [], []
    for i, row in tqdm(todo, desc=f"tokenize {ref}", unit="row", leave=False):
        columns = list(job.texts[row["id"]])
        prompt_ids, completions = _spans(tokenizer, row["prompt"], [job.texts[row["id"]][c] for c in columns],
                                         i, row, ref)
        longest = len(prompt_ids) + max(len(c) for c in completions)
        if limit is not None and longest > limit:
            if job.on_too_long == "error":
                raise DataFormatError(
                    f"{row_label(i, row)}, model {ref!r}: prompt + response is {longest} tokens, over the model's "
                    f"limit of {limit} (max_position_embeddings / --max_length). Shorten or remove the row, or "
                    "pass `--on_too_long drop` to drop such rows (counted); scores are never truncated silently."
                )
            too_long.append(row["id"])
            continue
        encoded.append((i, row, prompt_ids, dict(zip(columns, completions, strict=True))))
    if too_long:
        logger.warning("score %s: %d row(s) longer than %s tokens dropped (--on_too_long drop): %s", ref,
                       len(too_long), limit, too_long[:10])
    return encoded, too_long


def _score_encoded(ref: str, path: str, dtype: str, encoded: list, writer: store.ShardWriter, job: ScoreJob,
                   stats: ShardStats) -> None:
    """Run the engine over ``encoded`` rows, longest first, writing ``write_every`` rows at a time."""
    encoded.sort(key=lambda e: -(len(e[2]) + max(len(c) for c in e[3].values())))
    total = sum(len(e[2]) + len(c) for e in encoded for c in e[3].values())
    start = time.perf_counter()
    engine = load_engine(job.backend, path, dtype=dtype, **job.engine_kw)
    stats.add(load_seconds=time.perf_counter() - start)
    try:
        with tqdm(total=total, desc=f"score {ref}", unit="tok", unit_scale=True) as bar:
            for start in range(0, len(encoded), job.write_every):
                batch = encoded[start : start + job.write_every]
                requests = [(e[2], c) for e in batch for c in e[3].values()]
                counts = {"responses": len(requests), "tokens": sum(len(c) for _, c in requests),
                          "prompt_tokens": sum(len(p) for p, _ in requests)}  # before the engine sees the lists
                t0 = time.perf_counter()
                logps, entropies = engine.score_with_entropy([p for p, _ in requests], [c for _, c in requests])
                seconds = time.perf_counter() - t0
                logps, entropies = iter(logps), iter(entropies or [None] * len(requests))
                rows = []
                for i, row, _, completions in batch:
                    scored = {"id": row["id"], "status": "ok"}
                    for column in completions:
                        s = _summary(next(logps), i, row, column, ref, next(entropies))
                        scored[f"{column}_logps"], scored[f"{column}_num_tokens"] = s["sum"], s["num_tokens"]
                        if "mean_entropy" in s:  # not from vLLM (backends.vllm_engine.score_with_entropy)
                            scored[f"{column}_mean_entropy"] = s["mean_entropy"]
                    rows.append(scored)
                writer.write(rows)
                stats.add(seconds=seconds, **counts)
                stats.save()
                bar.update(sum(len(p) + len(c) for p, c in requests))
    finally:
        engine.close()
        del engine
        gc.collect()


# ---------------------------------------------------------------- CLI


@dataclass
class ScoreOptions(shards.ShardOptions):
    """The options of `infifpo score`: flags, or keys of its ``--config`` YAML (``infifpo.config``)."""

    pairs: str = field(metadata={"help": "pairs stage output directory, or a .jsonl file of pairs rows"})
    pivot: str = field(metadata={"help": "pivot model: packaged name, local directory or hub id"})
    sources: list[str] = field(metadata={"help": "source models, in fusion order (K of them)"})
    split: Split | None = field(default=None, metadata={
        "help": "rows to score; unset: po when rows have a `split` column, else all"})
    backend: Literal["transformers", "vllm"] = field(default="transformers", metadata={"help": "scoring engine"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 where the hardware has it) | bfloat16 | float32"})
    device: str = field(default="cpu", metadata={"help": "transformers backend: cpu | cuda"})
    out: str = field(default="runs", metadata={"help": "root directory of stage outputs"})
    on_empty: Policy = field(default="error", metadata={"help": "a row with an empty response: stop, or drop it"})
    on_too_long: Policy = field(default="error", metadata={
        "help": "a row longer than the model's limit (--max_length): stop, or drop it"})
    max_length: int | None = field(default=None, metadata={
        "help": "max prompt+response tokens; unset: the model's context"})
    write_every: int = field(default=64, metadata={"help": "rows per written batch (a kill loses at most one)"})
    token_budget: int | None = field(default=None, metadata={
        "help": "transformers: tokens per forward, padding included; unset: 4096 on CPU, on CUDA what fits a quarter "
                "of the memory free after the load, up to 65536"})
    compile_head: bool = field(default=False, metadata={"help": "transformers: torch.compile the chunked log-softmax"})
    tensor_parallel_size: int | None = field(default=None, metadata={
        "help": "vllm: GPUs per engine (14-24B models need 2-4)"})

    def engine_kwargs(self) -> dict[str, Any]:
        """Engine constructor arguments of ``backend`` (transformers: device, token_budget, compile_head; vllm:
        tensor_parallel_size) when set, then ``engine_arg``."""
        if self.backend == "transformers":
            named = {"device": self.device, "token_budget": self.token_budget,
                     "compile_head": self.compile_head or None}
        else:
            named = {"tensor_parallel_size": self.tensor_parallel_size}
        return {k: v for k, v in named.items() if v is not None} | super().engine_kwargs()


def main(argv: list[str] | None = None) -> int:
    """``infifpo score --pairs DIR --pivot M --sources M1 M2 ... [--split] [--backend] [--dtype] [--shard I/N |
    --num_shards N] [--out ROOT]``, or ``--config FILE`` with the same options as YAML keys."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_config(ScoreOptions, argv, prog="infifpo score", description=__doc__.split("\n\n")[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pairs = Path(options.pairs)
    rows = store.read_jsonl(pairs) if pairs.is_file() else store.read_output(pairs)
    # --num_shards: the workers score every shard; this process then only assembles (or finds) the scored pairs.
    launched = shards.launch_from_args("score", argv, options, Path(options.out) / "logs")
    path = score_pairs(rows, pivot=options.pivot, sources=options.sources, out_root=options.out,
                       backend=options.backend, dtype=options.dtype,
                       shard=(0, 1) if launched else options.shard_range(), on_empty=options.on_empty,
                       on_too_long=options.on_too_long, max_length=options.max_length,
                       write_every=options.write_every, split=options.split, **options.engine_kwargs())
    if path is None:
        store.announce(summary="shard done; scored pairs are assembled when every shard has run")
    else:
        store.announce(path)
    return 0
