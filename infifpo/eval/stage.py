"""Stage `eval`: one model or checkpoint -> per-benchmark accuracy with 95 % intervals (GSM8K, arithmetic, HumanEval,
and lm-eval tasks when installed).

    infifpo eval --model M [--label L] --benchmarks gsm8k:test:30 arithmetic:test:40 humaneval:test:10
                 [--backend vllm|transformers] [--max-tokens 256] [--out ROOT] [--seed 0] [--lm-eval TASK ...]

Owns: turning benchmark specs into prompt rows (``data_prep.prompts`` specs; the benchmark key is the spec's source
name), greedy generation through the sample stage (``infifpo.sample``: same chat templates, engines, resumable
content-addressed samples output under ``--out``; vLLM runs in its own process), judging every completion with the
judge stage's verifier (math: gold answer via math-verify; code: hidden tests in the bwrap sandbox, pass@1), the
per-item rows and ``scores.json`` of the ``eval-<label>`` output (docs/formats.md "Eval outputs"). Does not own:
generation, answer checking, the statistics (``infifpo.eval.stats``) or lm-eval (``infifpo.eval.lm_eval_adapter``).

Resuming: the output is keyed by the checkpoint's identity (``models.model_identity``: its config, tokenizer and
weight bytes, so a model retrained into the same directory is evaluated again), the benchmark specs and the content
of their items, the generation settings, the seed and the judge version. A finished eval is skipped (its directory
is printed again). A killed one resumes: finished samples are kept by the sample stage; judging is cheap and
redone, and only rows not yet written are appended. A prompt that cannot be generated (too long for the context) is
an ``error`` sample and counts as incorrect. ``seconds`` in scores.json is the wall time of the invocation that
finished the eval.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import struct
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.prompts import build_prompts, parse_spec, prompts_key, spec_arg
from infifpo.backends import SamplingSpec
from infifpo.eval.stats import accuracy, wilson_interval
from infifpo.judge.stage import JUDGE_VERSION, verify_sample
from infifpo.models.resolve import model_identity
from infifpo.provenance import prompt_set_digest, require_built_from, rows_digest
from infifpo.sample import ModelSpec, output_for, resolve, run, sample_prompts
from infifpo.schema import ConfigError, DataFormatError, ModelLoadError
from infifpo.store import StageOutput, atomic_write, read_output, record_outputs

logger = logging.getLogger(__name__)

EVAL_VERSION = 1  # bump when the rows or scores written for the same inputs would change
SCORES = "scores.json"
DEFAULT_BENCHMARKS = ("gsm8k:test:30", "arithmetic:test:40", "humaneval:test:10")
Row = dict[str, Any]


# -- benchmarks ------------------------------------------------------------------------------------------------
def benchmark_key(spec: str | dict[str, Any]) -> str:
    """The benchmark name of a spec: its source (gsm8k, arithmetic, humaneval), ``hf:NAME`` or ``jsonl:STEM``."""
    s = parse_spec(spec)
    if s["source"] == "hf":
        return f"hf:{s['name']}" + (f":{s['config']}" if s.get("config") else "")
    if s["source"] == "jsonl":
        return f"jsonl:{Path(s['path']).stem}"
    return s["source"]


def _verifiable(row: Row) -> bool:
    return (row["domain"] == "math" and row.get("answer") is not None) or (row["domain"] == "code"
                                                                           and bool(row.get("tests")))


def build_benchmarks(specs: Sequence[str | dict[str, Any]], seed: int = 0) -> tuple[list[Row], dict[str, str]]:
    """Prompt rows of every benchmark spec (sorted by id) and {prompt id: benchmark key}.

    Each spec is built as ``infifpo prompts`` would build it with this seed. Raises ConfigError for an unknown or
    repeated benchmark, or an item with nothing to check it against (no gold answer, no tests).
    """
    if not specs:
        raise ConfigError("--benchmarks: give at least one benchmark spec, e.g. gsm8k:test:30.")
    rows: list[Row] = []
    bench_of: dict[str, str] = {}
    for spec in specs:
        key = benchmark_key(spec)
        if key in bench_of.values():
            raise ConfigError(f"benchmark {key!r} is listed twice ({spec!r}); give each benchmark one spec.")
        for row in build_prompts([spec], seed=seed):
            if not _verifiable(row):
                raise ConfigError(f"benchmark {spec!r}, item {row['id']!r}: domain {row['domain']!r} with no gold "
                                  "answer or tests, so correctness cannot be judged. Evaluate verifiable sources only "
                                  "(gsm8k, arithmetic, humaneval, or prompt files with 'answer' / 'tests').")
            if row["id"] in bench_of:
                raise DataFormatError(f"benchmark {spec!r}: item id {row['id']!r} also in {bench_of[row['id']]!r}.")
            bench_of[row["id"]] = key
            rows.append(row)
    return sorted(rows, key=lambda r: r["id"]), bench_of


# -- judging ---------------------------------------------------------------------------------------------------
def judge_item(sample: Row, prompt: Row, benchmark: str, *, code_timeout: float = 10.0) -> Row:
    """The per-item eval row of one completion (``sample``: ``text``, ``finish_reason``, optional ``error`` and
    ``num_tokens``) of ``prompt``: id, benchmark, prompt_id, completion, finish_reason, correct, reason, num_tokens.

    Correctness comes from ``infifpo.judge.stage.verify_sample`` (math-verify against the gold answer; HumanEval's
    hidden tests in the sandbox). An error sample (never generated) is incorrect."""
    correct, reason = verify_sample(sample, prompt, code_timeout=code_timeout)
    if correct is None:
        raise DataFormatError(f"item {prompt['id']!r} ({benchmark}): no verifier applies ({reason}).")
    if sample.get("error"):
        reason += f"; generation error: {sample['error']}"
    return {"id": f"{benchmark}/{prompt['id']}", "benchmark": benchmark, "prompt_id": prompt["id"],
            "completion": sample["text"], "finish_reason": sample["finish_reason"], "correct": bool(correct),
            "reason": reason, "num_tokens": int(sample.get("num_tokens", 0))}


def judge_items(samples: Sequence[Row], prompts: Sequence[Row], bench_of: dict[str, str], *, workers: int = 2,
                code_timeout: float = 10.0) -> list[Row]:
    """Per-item rows of every sample (joined to its prompt by ``prompt_id``), in the order of ``samples``.
    ``workers`` threads run the checks (code runs in separate sandboxed processes)."""
    by_id = {p["id"]: p for p in prompts}
    for i, s in enumerate(samples):
        if s.get("prompt_id") not in by_id:
            raise DataFormatError(f"sample row {i}: prompt_id {s.get('prompt_id')!r} is not an item of the "
                                  "benchmarks; judge samples drawn from these benchmarks' prompts (same specs and "
                                  "seed).")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda s: judge_item(s, by_id[s["prompt_id"]], bench_of[s["prompt_id"]],
                                             code_timeout=code_timeout), samples)
        return list(tqdm(jobs, total=len(samples), desc="judge", unit="item"))


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


# -- the stage -------------------------------------------------------------------------------------------------
def safe_label(text: str) -> str:
    """A directory-safe label: runs of other characters become "_" (at most 60 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "model"


def greedy_spec(max_tokens: int, seed: int) -> SamplingSpec:
    """Greedy decoding, one completion per item (pass@1): temperature 0, top-p 1."""
    return SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=seed)


def eval_output(model_dir: str, benchmarks: Sequence[str | dict[str, Any]], seed: int, settings: dict[str, Any],
                label: str, out_root: str | Path, rows: Sequence[Row] | None = None) -> StageOutput:
    """The ``eval-<label>`` output keyed by the checkpoint's identity, the benchmark specs, the content of their items
    (``rows``: built from the specs when None), the seed and the settings."""
    rows = build_benchmarks(benchmarks, seed)[0] if rows is None else rows
    key = {"stage": "eval", "version": EVAL_VERSION, "judge_version": JUDGE_VERSION,
           "checkpoint": model_identity(model_dir), "benchmarks": prompts_key(list(benchmarks), seed),
           "items": rows_digest(rows), **settings}
    return StageOutput(out_root, f"eval-{safe_label(label)}", key)


def _write_missing(output: StageOutput, rows: Sequence[Row]) -> None:
    """Append the rows whose id is not on disk yet (a killed run may have written some)."""
    output.lock(wait=60)  # evals of other models on the same benchmarks share the prompts output: seconds to write
    done = output.done_ids()
    with output.open_shard() as writer:
        writer.write([r for r in rows if r["id"] not in done])


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, json.dumps(value, indent=1))


def generate(rows: Sequence[Row], model_dir: str, spec: SamplingSpec, backend: str, out_root: str | Path,
             prompts_key_: dict[str, Any], *, engine: Any = None, engine_kwargs: dict[str, Any] | None = None) -> Path:
    """Greedy completions of ``rows`` through the sample stage; returns its (resumable) output directory.

    vLLM runs in a fresh process (``sample.run``, which needs the rows as a ``prompts`` output: written under
    ``out_root`` as `infifpo prompts` would); transformers runs here. ``engine`` reuses a built engine (tests)."""
    name = f"eval-{safe_label(Path(model_dir).name)}"  # the samples' model column; the key holds the fingerprint
    if engine is not None or backend != "vllm":
        return sample_prompts(rows, model=model_dir, name=name, spec=spec, backend=backend, out_root=out_root,
                              engine=engine, engine_kwargs=engine_kwargs)
    prompts_out = StageOutput(out_root, "prompts", prompts_key_)
    if not prompts_out.is_complete():
        _write_missing(prompts_out, rows)
        prompts_out.finalize()
    mspec = ModelSpec(name=name, ref=model_dir, n=1, temperature=spec.temperature, top_p=spec.top_p,
                      max_tokens=spec.max_tokens, seed=spec.seed, engine_kwargs=dict(engine_kwargs or {}))
    return run(prompts_out.path, [mspec], backend, out_root)[name]


def run_eval(model: str, benchmarks: Sequence[str | dict[str, Any]] = DEFAULT_BENCHMARKS, *,
             label: str | None = None, backend: str = "vllm", max_tokens: int = 256, out_root: str | Path = "runs",
             seed: int = 0, lm_eval_tasks: Sequence[str] = (), lm_eval_limit: int | None = None,
             engine_kwargs: dict[str, Any] | None = None, code_timeout: float = 10.0, workers: int = 2,
             engine: Any = None) -> Path:
    """Evaluate ``model`` (packaged name, checkpoint directory or hub id) and return the finished output directory.

    Writes the per-item rows and ``scores.json`` (docs/formats.md "Eval outputs"); an output already finished is
    returned as is. Raises ConfigError for a bad benchmark spec or a missing lm-eval before any model is loaded.
    """
    start = time.perf_counter()
    rows, bench_of = build_benchmarks(benchmarks, seed)
    if lm_eval_tasks:
        from infifpo.eval.lm_eval_adapter import require_lm_eval

        require_lm_eval()
    label = label or safe_label(Path(model).name)
    model_dir = resolve(model)
    spec, engine_kwargs = greedy_spec(max_tokens, seed), dict(engine_kwargs or {})
    settings = {"generation": {"backend": backend, **asdict(spec),
                               "engine": dict(sorted(engine_kwargs.items()))},
                "code_timeout": code_timeout,
                "lm_eval": {"tasks": list(lm_eval_tasks), "limit": lm_eval_limit} if lm_eval_tasks else None}
    out = eval_output(model_dir, benchmarks, seed, settings, label, out_root, rows).lock()
    if out.is_complete():
        logger.info("%s: already evaluated with these settings; reusing it", out.path)
        return out.path
    name = f"eval-{safe_label(Path(model_dir).name)}"
    before = output_for(rows, name, model_dir, spec, backend, out_root, engine_kwargs).done_ids()
    samples_dir = generate(rows, model_dir, spec, backend, out_root, prompts_key(list(benchmarks), seed),
                           engine=engine, engine_kwargs=engine_kwargs)
    require_built_from(samples_dir, "prompts", prompt_set_digest(rows), what="prompts", given="the benchmarks",
                       fix=f"The items changed since the prompts under {out_root} were written (a data or loader "
                           "update): delete that prompts-* output and run the eval again.")
    samples = read_output(samples_dir)
    gen_seconds, new_tokens = (time.perf_counter() - start,
                               sum(s["num_tokens"] for s in samples if s["id"] not in before))
    items = judge_items(samples, rows, bench_of, workers=workers, code_timeout=code_timeout)
    judge_seconds = time.perf_counter() - start - gen_seconds
    scores_by_bench = summarize(items, list(dict.fromkeys(benchmark_key(s) for s in benchmarks)))
    if lm_eval_tasks:
        from infifpo.eval.lm_eval_adapter import run_lm_eval

        for task, entry in run_lm_eval(model_dir, lm_eval_tasks, limit=lm_eval_limit, seed=seed,
                                       dtype=engine_kwargs.get("dtype", "auto")).items():
            scores_by_bench[f"lm-eval:{task}" if task in scores_by_bench else task] = entry
    scores = {
        "model": model, "label": label, "params": count_params(model_dir), "benchmarks": scores_by_bench,
        "generation": {**settings["generation"], "samples": str(samples_dir)},
        "tokens_generated": sum(s["num_tokens"] for s in samples), "seconds": time.perf_counter() - start,
        "generation_seconds": gen_seconds, "judge_seconds": judge_seconds,
        # tokens generated by this invocation over its generation wall time (model load included)
        "generation_tokens_per_second": new_tokens / gen_seconds if gen_seconds > 0 else None,
        "resumed": bool(before),
    }
    _write_missing(out, items)
    _write_json(out.path / SCORES, scores)
    return out.finalize()


def read_scores(path: str | Path) -> dict[str, Any]:
    """``scores.json`` of a finished eval output directory (StoreError via ``read_output`` if unfinished)."""
    path = Path(path)
    read_output(path)  # checks completeness and checksums
    return json.loads((path / SCORES).read_text())


def main(argv: list[str] | None = None) -> int:
    """`infifpo eval --model M [--label L] --benchmarks SPEC ... [--backend B] [--max-tokens N] [--out ROOT] ...`"""
    ap = argparse.ArgumentParser(prog="infifpo eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="packaged name, checkpoint directory or hub id")
    ap.add_argument("--label", help="name of the output (eval-<label>); default: the model's basename")
    ap.add_argument("--benchmarks", nargs="+", default=list(DEFAULT_BENCHMARKS), type=spec_arg,
                    help="data_prep.prompts specs: gsm8k:test:N arithmetic:test:N humaneval:test:N ..., or a JSON "
                         'object with the keys of a config mapping, e.g. \'{"source": "hf", "name": ...}\'')
    ap.add_argument("--backend", choices=("vllm", "transformers"), default="vllm")
    ap.add_argument("--max-tokens", type=int, default=256, help="new tokens per completion")
    ap.add_argument("--out", default="runs", help="root directory of stage outputs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the benchmark subsets (and of generation)")
    ap.add_argument("--dtype", help="engine dtype (bfloat16 | float32 | auto)")
    ap.add_argument("--max-model-len", type=int, help="vLLM context length (prompt + completion tokens)")
    ap.add_argument("--device", help="transformers backend device (cpu | cuda)")
    ap.add_argument("--code-timeout", type=float, default=10.0, help="wall seconds per sandboxed test run")
    ap.add_argument("--workers", type=int, default=2, help="judging threads")
    ap.add_argument("--lm-eval", nargs="+", default=[], metavar="TASK", help="lm-eval-harness tasks (needs lm-eval)")
    ap.add_argument("--lm-eval-limit", type=int, help="items per lm-eval task (default: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine_kwargs = {k: v for k, v in (("dtype", args.dtype), ("max_model_len", args.max_model_len),
                                       ("device", args.device)) if v}
    path = run_eval(args.model, args.benchmarks, label=args.label, backend=args.backend, max_tokens=args.max_tokens,
                    out_root=args.out, seed=args.seed, lm_eval_tasks=args.lm_eval, lm_eval_limit=args.lm_eval_limit,
                    engine_kwargs=engine_kwargs, code_timeout=args.code_timeout, workers=args.workers)
    scores = read_scores(path)
    for bench, e in scores["benchmarks"].items():
        ci = "" if e["ci95"] is None else f" [{e['ci95'][0]:.1f}, {e['ci95'][1]:.1f}]"
        logger.info("%s: %d/%d = %.1f %%%s", bench, e["correct"], e["n"], e["accuracy"], ci)
    print(path)
    record_outputs(path)
    return 0
