"""Stage `eval`: the judged greedy samples of one model on benchmark prompt sets -> per-item rows and per-benchmark
accuracy with 95 % intervals (plus lm-eval tasks when installed).

    infifpo eval --samples DIR --judged DIR --prompts DIR [DIR ...] --model M [--label L] [--out ROOT]
                 [--lm_eval TASK ...] [--lm_eval_limit N]

or the same options as keys of ``--config FILE`` (``EvalOptions``, ``infifpo.config``). The inputs come from the other
stages, through files: `infifpo prompts` writes one prompts output per benchmark (``--prompts``; each built from one
source spec, which names the benchmark: ``benchmark_key``), `infifpo sample` the greedy samples of their items (n 1,
temperature 0; ``--samples``) and `infifpo judge` the verdicts on them (math: the gold answer via math-verify; code:
the hidden tests in the bwrap sandbox; ``--judged``). `infifpo eval --model M --benchmarks SPEC ...` runs that chain
and then this stage (``infifpo.evaluate``, ``pipeline.evaluate_model``), as the pipeline does for every report row.

Owns: the benchmark of each item, the checks that the inputs belong together (the samples were drawn from exactly
these items by ``--model``, its identity by content: ``models.model_identity``; the verdicts are of these samples),
the per-item rows and ``scores.json`` of the ``eval-<label>`` output (docs/formats.md "Eval outputs"), and the
options (``EvalOptions``). Does not own: prompts, generation, answer checking, the statistics (``infifpo.eval.stats``)
or lm-eval (``infifpo.eval.lm_eval_adapter``, which drives its own model).

Resuming: the output is keyed by its inputs' content (samples, verdicts, each benchmark's items), the model's
identity and the lm-eval tasks, so a model retrained into the same directory (another samples output) is evaluated
again. A finished eval is skipped (its directory is printed again); a killed one appends only the rows not yet
written. An item whose prompt could not be generated (an ``error`` sample: too long for the context) counts as
incorrect. ``seconds`` in scores.json is the wall time of the invocation that wrote it; generation and judging are the
sample and judge stages' (the pipeline's timings ``eval/<label>/sample`` and ``eval/<label>/judge``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infifpo.config import parse_config
from infifpo.eval.stats import accuracy, wilson_interval
from infifpo.models.resolve import model_identity, resolve_model
from infifpo.provenance import output_digest, prompt_set_digest, recorded, require_built_from
from infifpo.schema import ConfigError, DataFormatError, ModelLoadError
from infifpo.store import StageOutput, atomic_write, read_output, record_outputs, tree_sha256

logger = logging.getLogger(__name__)

EVAL_VERSION = 2  # bump when the rows or scores written for the same inputs would change (2: from judged outputs)
SCORES = "scores.json"
Row = dict[str, Any]


@dataclass(kw_only=True)
class ModelEvalOptions:
    """What is evaluated, the output's name and root, and lm-eval tasks: options of `infifpo eval` in both its forms
    (this stage's ``EvalOptions`` and the composed ``pipeline.EvaluateOptions``)."""

    model: str = field(metadata={"help": "the evaluated model: packaged name, checkpoint directory or hub id"})
    label: str | None = field(default=None, metadata={
        "help": "name of the output (eval-<label>); unset: the model's last path component"})
    out: str = field(default="runs", metadata={"help": "root directory of stage outputs"})
    lm_eval: list[str] = field(default_factory=list, metadata={
        "help": "lm-evaluation-harness tasks, run on the model by lm-eval itself (needs `pip install lm-eval`)"})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "items per lm-eval task; unset: all"})
    lm_eval_include_path: list[str] = field(default_factory=list, metadata={
        "help": "directories (or files) of further lm-eval task YAMLs, lm-eval's --include_path"})

    def output_label(self) -> str:
        """``label``, or the model's last path component, made directory-safe (``safe_label``)."""
        return safe_label(self.label or Path(self.model).name)


@dataclass(kw_only=True)
class EvalOptions(ModelEvalOptions):
    """The options of the `infifpo eval` summary (flags, or keys of ``--config FILE``: ``infifpo.config``)."""

    samples: str = field(metadata={
        "help": "the model's greedy samples of the benchmark items (`infifpo sample --n 1 --temperature 0`)"})
    judged: str = field(metadata={"help": "the judged output of those samples (`infifpo judge`)"})
    prompts: list[str] = field(metadata={
        "help": "the benchmarks: one `infifpo prompts` output each (built from one --source spec), together the "
                "prompts the samples were drawn from"})


DESCRIPTION = " ".join(__doc__.split("\n\n")[0].split())


# -- benchmarks ------------------------------------------------------------------------------------------------
def benchmark_key(spec: dict[str, Any]) -> str:
    """The benchmark name of a parsed source spec (as a prompts output records it in its key's ``specs``, or a
    config's mapping source): its source (gsm8k, arithmetic, humaneval), ``hf:NAME[:CONFIG]`` or ``jsonl:STEM``.
    TypeError for a spec string (parse it with ``data_prep.prompts.parse_spec`` first)."""
    if not isinstance(spec, dict):
        raise TypeError(f"benchmark_key takes a parsed source spec (a mapping), not {type(spec).__name__} {spec!r}.")
    if spec["source"] == "hf":
        return f"hf:{spec['name']}" + (f":{spec['config']}" if spec.get("config") else "")
    if spec["source"] == "jsonl":
        return f"jsonl:{Path(spec['path']).stem}"
    return spec["source"]


def _verifiable(row: Row) -> bool:
    return (row["domain"] == "math" and row.get("answer") is not None) or (row["domain"] == "code"
                                                                           and bool(row.get("tests")))


def read_benchmarks(prompts: Sequence[str | Path]) -> tuple[list[Row], dict[str, str], list[str]]:
    """The items of every benchmark, one finished `infifpo prompts` output each: (rows sorted by id, {prompt id:
    benchmark key}, the benchmark keys in the order given). An output's one recorded source spec names its benchmark
    (``benchmark_key``).

    ConfigError for no output, an output of several specs, a benchmark given twice, and an item with nothing to
    check an answer against (no gold answer, no tests); DataFormatError for an item id in two benchmarks."""
    if not prompts:
        raise ConfigError("give at least one benchmark: a prompts output (`infifpo prompts --source SPEC`).")
    rows: list[Row] = []
    bench_of: dict[str, str] = {}
    keys: list[str] = []
    for path in prompts:
        specs = recorded(path, "specs")
        if not isinstance(specs, list) or len(specs) != 1:
            raise ConfigError(f"{path}: a benchmark is a prompts output of one source spec, this one records "
                              f"{specs!r}; build one per benchmark (`infifpo prompts --source SPEC`).")
        key = benchmark_key(specs[0])
        if key in keys:
            raise ConfigError(f"benchmark {key!r} is given twice ({path}); give each benchmark one prompts output.")
        keys.append(key)
        for row in read_output(path):
            if not _verifiable(row):
                raise ConfigError(f"benchmark {key!r} ({path}), item {row['id']!r}: domain {row['domain']!r} with no "
                                  "gold answer or tests, so correctness cannot be judged. Evaluate verifiable sources "
                                  "only (gsm8k, arithmetic, humaneval, or prompt files with 'answer' / 'tests').")
            if row["id"] in bench_of:
                raise DataFormatError(f"benchmark {key!r}: item id {row['id']!r} also in {bench_of[row['id']]!r}.")
            bench_of[row["id"]] = key
            rows.append(row)
    return sorted(rows, key=lambda r: r["id"]), bench_of, keys


# -- rows and scores -------------------------------------------------------------------------------------------
def item_rows(judged: Sequence[Row], samples: Sequence[Row], bench_of: dict[str, str]) -> list[Row]:
    """The per-item eval row of every judged sample, in the order of ``judged``: id (``<benchmark>/<prompt id>``),
    benchmark, prompt_id, completion, finish_reason, correct, reason (the judge's, plus the generation error of an
    ``error`` sample, which is incorrect), num_tokens. DataFormatError unless every item has exactly one verdict."""
    count = Counter(j["prompt_id"] for j in judged)
    wrong = sorted(p for p in count.keys() | bench_of.keys() if count[p] != int(p in bench_of))
    if wrong:
        raise DataFormatError(f"items {wrong[:3]}: judged {[count[p] for p in wrong[:3]]} times, but each benchmark "
                              "item needs exactly one judged sample (pass@1 of greedy samples: `infifpo sample --n 1 "
                              "--temperature 0` on the benchmarks' prompts).")
    errors = {s["id"]: s["error"] for s in samples if s.get("error")}
    out = []
    for j in judged:
        if j["correct"] is None:
            raise DataFormatError(f"judged sample {j['id']!r}: no verdict ({j['judge_reason']}).")
        error = errors.get(j["id"])
        out.append({"id": f"{bench_of[j['prompt_id']]}/{j['prompt_id']}", "benchmark": bench_of[j["prompt_id"]],
                    "prompt_id": j["prompt_id"], "completion": j["text"], "finish_reason": j["finish_reason"],
                    "correct": bool(j["correct"]) and j["finish_reason"] != "error",
                    "reason": j["judge_reason"] + (f"; generation error: {error}" if error else ""),
                    "num_tokens": int(j.get("num_tokens") or 0)})
    return out


def summarize(items: Sequence[Row], benchmarks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{benchmark: {n, correct, accuracy (percent), ci95 (Wilson, percent), ci_method}} in ``benchmarks`` order."""
    out = {}
    for bench in benchmarks:
        verdicts = [r["correct"] for r in items if r["benchmark"] == bench]
        n, k = len(verdicts), sum(verdicts)
        out[bench] = {"n": n, "correct": k, "accuracy": accuracy(k, n), "ci95": list(wilson_interval(k, n)),
                      "ci_method": "wilson"}
    return out


# -- the model -------------------------------------------------------------------------------------------------
def count_params(model_dir: str | Path) -> int:
    """Parameter count of a checkpoint from its safetensors headers (no weights loaded; tied weights stored once),
    or from a memory-mapped ``*.bin`` state dict. Raises ModelLoadError when the directory holds neither."""
    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors"))
    if files:
        total = 0
        for f in files:
            with open(f, "rb") as fh:  # safetensors: 8-byte little-endian header length, then a JSON header
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        return total
    bins = sorted(root.glob("*.bin"))
    if bins:
        import torch

        # Tied weights are one tensor under two names in a .bin state dict: count each tensor once.
        tensors = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t for f in bins
                   for t in torch.load(f, map_location="cpu", mmap=True, weights_only=True).values()}
        return sum(t.numel() for t in tensors.values())
    raise ModelLoadError(f"{root}: no *.safetensors or *.bin weight files, so the parameter count is unknown.")


def sampled_model(model: str, samples: str | Path) -> str:
    """The local checkpoint directory of ``model``, which must be the model that wrote ``samples`` (its recorded
    ``checkpoint``: ``models.model_identity``, so a model retrained since is refused); InputMismatchError else."""
    model_dir = resolve_model(model)
    require_built_from(samples, "checkpoint", model_identity(model_dir), what="model", given=f"--model {model}",
                       fix=f"Give the model {samples} was sampled from, or sample {model} again (a retrained model "
                           "is another model).")
    return model_dir


# -- the stage -------------------------------------------------------------------------------------------------
def safe_label(text: str) -> str:
    """A directory-safe label: runs of other characters become "_" (at most 60 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "model"


def eval_output(opts: EvalOptions, benchmarks: Sequence[str], checkpoint: str) -> StageOutput:
    """The ``eval-<label>`` output keyed by the content of its inputs (samples, verdicts, each benchmark's items), the
    model's identity (``checkpoint``) and the lm-eval tasks."""
    key = {"stage": "eval", "version": EVAL_VERSION, "checkpoint": checkpoint, "samples": output_digest(opts.samples),
           "judged": output_digest(opts.judged),
           "benchmarks": [[k, output_digest(p)] for k, p in zip(benchmarks, opts.prompts, strict=True)],
           "lm_eval": {"tasks": list(opts.lm_eval), "limit": opts.lm_eval_limit,
                       "include": [[p, tree_sha256(p)] for p in opts.lm_eval_include_path]} if opts.lm_eval else None}
    return StageOutput(opts.out, f"eval-{opts.output_label()}", key)


def run_eval(opts: EvalOptions) -> Path:
    """Summarise the judged samples of ``opts`` into the eval output; returns its finished directory.

    Every input is checked before anything is written: InputMismatchError when the samples were not drawn from
    exactly the benchmarks' items by ``opts.model``, or the verdicts are not of these samples; ConfigError for a bad
    benchmark or a missing lm-eval. An output already finished is returned as is."""
    start = time.perf_counter()
    if opts.lm_eval:
        from infifpo.eval.lm_eval_adapter import require_lm_eval

        require_lm_eval()
        missing = [p for p in opts.lm_eval_include_path if tree_sha256(p) is None]
        if missing:
            raise ConfigError(f"--lm_eval_include_path {missing[0]}: no such file or directory; give the directory "
                              "holding your lm-eval task YAMLs.")
    rows, bench_of, benchmarks = read_benchmarks(opts.prompts)
    require_built_from(opts.samples, "prompts", prompt_set_digest(rows), what="prompts",
                       given=f"the benchmarks {' '.join(map(str, opts.prompts))}",
                       fix="Give the prompts outputs the samples were drawn from (one per benchmark), or sample "
                           "these benchmarks' items (their union: `infifpo prompts` with every spec).")
    require_built_from(opts.judged, "samples", output_digest(opts.samples), what="samples",
                       given=f"--samples {opts.samples}",
                       fix=f"Give the judged output of {opts.samples} (`infifpo judge --samples {opts.samples}`).")
    model_dir = sampled_model(opts.model, opts.samples)
    out = eval_output(opts, benchmarks, recorded(opts.samples, "checkpoint")).lock()
    if out.is_complete():
        logger.info("%s: already evaluated from these inputs; reusing it", out.path)
        return out.path
    samples = read_output(opts.samples)
    items = item_rows(read_output(opts.judged), samples, bench_of)
    scores_by_bench = summarize(items, benchmarks)
    generation = {"backend": recorded(opts.samples, "backend"), **(recorded(opts.samples, "sampling") or {}),
                  "engine": recorded(opts.samples, "engine") or {}, "samples": str(opts.samples)}
    if opts.lm_eval:
        from infifpo.eval.lm_eval_adapter import run_lm_eval

        for task, entry in run_lm_eval(model_dir, opts.lm_eval, limit=opts.lm_eval_limit,
                                       include_path=opts.lm_eval_include_path or None,
                                       seed=generation.get("seed", 0),
                                       dtype=generation["engine"].get("dtype", "auto")).items():
            scores_by_bench[f"lm-eval:{task}" if task in scores_by_bench else task] = entry
    scores = {
        "model": opts.model, "label": opts.output_label(), "params": count_params(model_dir),
        "benchmarks": scores_by_bench, "generation": generation,
        "tokens_generated": sum(s["num_tokens"] for s in samples), "seconds": time.perf_counter() - start,
        # measured by the sample and judge stages' callers (the pipeline's timings), not here
        "generation_seconds": None, "judge_seconds": None, "generation_tokens_per_second": None, "resumed": None,
    }
    done = out.done_ids()
    with out.open_shard() as writer:
        writer.write([r for r in items if r["id"] not in done])
    atomic_write(out.path / SCORES, json.dumps(scores, indent=1))
    return out.finalize()


def read_scores(path: str | Path) -> dict[str, Any]:
    """``scores.json`` of a finished eval output directory (StoreError via ``read_output`` if unfinished)."""
    path = Path(path)
    read_output(path)  # checks completeness and checksums
    return json.loads((path / SCORES).read_text())


def log_scores(scores: dict[str, Any]) -> None:
    """One log line per benchmark: ``gsm8k: 12/30 = 40.0 % [24.6, 57.7]``."""
    for bench, e in scores["benchmarks"].items():
        ci = "" if e["ci95"] is None else f" [{e['ci95'][0]:.1f}, {e['ci95'][1]:.1f}]"
        logger.info("%s: %d/%d = %.1f %%%s", bench, e["correct"], e["n"], e["accuracy"], ci)


def main(argv: list[str] | None = None) -> int:
    """`infifpo eval --samples DIR --judged DIR --prompts DIR [DIR ...] --model M [--label L] [--out ROOT] ...`"""
    opts = parse_config(EvalOptions, argv, prog="infifpo eval", description=DESCRIPTION)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = run_eval(opts)
    log_scores(read_scores(path))
    print(path)
    record_outputs(path)
    return 0
