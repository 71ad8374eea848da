"""Stage `sample`: prompts x model pool -> `samples` (schema.SAMPLE_COLUMNS), one stage output per model.

Owns: encoding each prompt with the sampling model's own chat template (``logprobs.encode_prompt``), batching prompts
through an engine (``backends``), per-sample seeds, error rows for prompts that cannot be sampled, the content key of
the output, resumable and sharded writing (``store``), the multi-model run (one fresh process per model), and
``SampleOptions``, the stage's options (flags, or a ``--config`` YAML of the same names whose ``models:`` list is the
pool; ``infifpo.config``). ``--num_shards N`` runs N local worker processes, one per shard (``infifpo.shards``);
docs/scaling.md.
Does not own: the engines, the on-disk format, or judging.

Seeds (docs/bad-inputs.md S2): sample i of prompt p under model m gets ``sample_seed(spec.seed, p, m, i)`` (sha256, 31
bits), passed to engines that take per-sample seeds (vLLM), so a sample is the same whatever the batch, shard or ``n``.
The transformers engine seeds once per ``generate`` call instead; its rows record the base seed ``spec.seed``, and its
samples at T > 0 depend on batching (greedy ones do not).

Error rows (docs/bad-inputs.md D9): a prompt that leaves no room for one token in the model's context, or that the chat
template rejects, gets ``finish_reason="error"``, empty completion, ``gen_logp=None`` and an extra ``error`` column
with the reason; the batch continues. Re-running does not retry error rows (they are finished; change the inputs to
redo them).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import multiprocessing
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from infifpo import shards
from infifpo.backends import Engine, SamplingSpec, load_engine
from infifpo.backends.vllm_engine import one_engine_process
from infifpo.config import check_keys, parse_config
from infifpo.logprobs import encode_prompt
from infifpo.models.resolve import model_identity
from infifpo.provenance import prompt_set_digest
from infifpo.schema import ChatTemplateError, ConfigError, ModelLoadError, sample_id, validate_prompts
from infifpo.store import StageOutput, announce, in_shard, read_jsonl, read_output, record_outputs, safe_name

logger = logging.getLogger(__name__)

SAMPLE_VERSION = 1  # bump when this stage changes what it writes, so old outputs are not reused
# Sequences (prompts x n) per engine call. A decode step's cost on CPU is mostly per step, not per sequence, so
# sequences in flight are throughput: 16 prompts per call (64 sequences at n = 4, 16 for a greedy eval) ran the 135M
# pivot at ~30 tokens/s on the loaded 2-core machine. A bigger call loses more on a kill (the batch in flight).
BATCH_SEQUENCES = 256
DEFAULT_BATCH_PROMPTS: int | None = None  # None: BATCH_SEQUENCES // n prompts per call


def batch_size(batch_prompts: int | None, n: int) -> int:
    """Prompts per engine call: ``batch_prompts`` when given, else ``BATCH_SEQUENCES // n`` (at least 1)."""
    return int(batch_prompts) if batch_prompts else max(1, BATCH_SEQUENCES // max(1, n))


@dataclass
class ModelSpec:
    """One model of the pool and how to sample it. ``n`` None means 8 for the pivot and 4 for a source
    (docs/methods.md)."""

    name: str
    ref: str | None = None  # what infifpo.models.resolve_model resolves; defaults to ``name``
    pivot: bool = False
    n: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int = 0
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def sampling(self) -> SamplingSpec:
        n = self.n if self.n is not None else (8 if self.pivot else 4)
        return SamplingSpec(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                            seed=self.seed)


def sample_seed(base_seed: int, prompt_id: str, model: str, sample_index: int) -> int:
    """Seed of sample ``sample_index`` of prompt ``prompt_id`` under model ``model`` (31-bit, from sha256)."""
    blob = f"{int(base_seed)}|{prompt_id}|{model}|{int(sample_index)}".encode()
    return int(hashlib.sha256(blob).hexdigest()[:8], 16) & 0x7FFFFFFF


def resolve(ref: str) -> str:
    """Local checkpoint directory of ``ref`` (a directory, a packaged name or a hub id) via
    ``infifpo.models.resolve``."""
    from infifpo.models.resolve import resolve_model

    return resolve_model(ref)


def output_for(prompt_rows: Sequence[dict], model_name: str, model_dir: str, spec: SamplingSpec, backend: str,
               out_root: str | Path, engine_kwargs: dict[str, Any] | None = None) -> StageOutput:
    """The stage output (directory) that sampling ``prompt_rows`` with this model, spec and backend writes to.

    Keyed by the checkpoint's identity (``models.model_identity``: config, tokenizer and weight bytes, so a model
    retrained into the same directory is another output) and by the prompts drawn from, recorded under ``prompts``
    (``provenance.prompt_set_digest``), which `infifpo judge` compares with its ``--prompts``."""
    key = {
        "stage": "sample", "version": SAMPLE_VERSION, "model": model_name, "checkpoint": model_identity(model_dir),
        "sampling": asdict(spec), "backend": backend, "engine": dict(sorted((engine_kwargs or {}).items())),
        "prompts": prompt_set_digest(prompt_rows),
    }
    return StageOutput(out_root, f"samples-{safe_name(model_name)}", key)


def _context_limit(engine: Engine) -> int | None:
    """Longest prompt (tokens) the engine can extend by one token, or None if it does not say."""
    for attr in ("max_model_len", "max_length"):
        value = getattr(engine, attr, None)
        if value:
            return int(value) - 1
    return None


def _error_row(pid: str, model: str, i: int, seed: int, reason: str) -> dict[str, Any]:
    return {"id": sample_id(pid, model, i), "prompt_id": pid, "model": model, "sample_index": i,
            "completion_ids": [], "text": "", "finish_reason": "error", "gen_logp": None, "num_tokens": 0,
            "seed": seed, "error": reason}


def _sample_batch(engine: Engine, tokenizer: Any, rows: list[dict], model: str, spec: SamplingSpec,
                  limit: int | None) -> list[dict[str, Any]]:
    """Sample every row of one batch; rows that cannot be sampled become error rows (docs/bad-inputs.md D9)."""
    per_sample_seeds = "seeds" in inspect.signature(engine.generate).parameters
    seeds = {r["id"]: [sample_seed(spec.seed, r["id"], model, i) if per_sample_seeds else spec.seed
                       for i in range(spec.n)] for r in rows}
    out: dict[str, list[dict[str, Any]]] = {}
    ok_rows, ok_ids = [], []
    for r in rows:
        try:
            ids = encode_prompt(tokenizer, r["prompt"])
        except ChatTemplateError as e:
            out[r["id"]] = [_error_row(r["id"], model, i, seeds[r["id"]][i], f"chat template: {e}")
                            for i in range(spec.n)]
            continue
        if limit is not None and len(ids) > limit:
            reason = f"prompt is {len(ids)} tokens; the context leaves room for at most {limit} prompt tokens"
            out[r["id"]] = [_error_row(r["id"], model, i, seeds[r["id"]][i], reason) for i in range(spec.n)]
            continue
        ok_rows.append(r)
        ok_ids.append(ids)
    if ok_rows:
        kwargs = {"seeds": [seeds[r["id"]] for r in ok_rows]} if per_sample_seeds else {}
        for r, gens in zip(ok_rows, engine.generate(ok_ids, spec, **kwargs), strict=True):
            out[r["id"]] = [
                {"id": sample_id(r["id"], model, i), "prompt_id": r["id"], "model": model, "sample_index": i,
                 "completion_ids": list(g.token_ids), "text": g.text, "finish_reason": g.finish_reason,
                 "gen_logp": float(g.logp), "num_tokens": len(g.token_ids), "seed": seeds[r["id"]][i]}
                for i, g in enumerate(gens)
            ]
    return [s for r in rows for s in out[r["id"]]]


def sample_prompts(prompt_rows: Sequence[dict], *, model: str, spec: SamplingSpec, backend: str = "vllm",
                   out_root: str | Path = "runs", shard: tuple[int, int] = (0, 1), name: str | None = None,
                   engine: Engine | None = None, engine_kwargs: dict[str, Any] | None = None,
                   batch_prompts: int | None = DEFAULT_BATCH_PROMPTS) -> Path:
    """Sample ``spec.n`` completions of every prompt in shard ``shard`` = (I, N) with one model; return the output dir.

    ``model`` is a reference for ``infifpo.models.resolve_model``; ``name`` (default: ``model``) is what the
    ``model`` column holds. Rows are written and flushed after every ``batch_prompts`` prompts (default
    ``batch_size``: ``BATCH_SEQUENCES`` sequences per engine call); re-running skips
    sample ids already on disk, so a killed run loses at most the batch in flight. The output is finalized when
    every prompt of every shard is present. ``engine`` (tests, benchmarks) reuses an already built engine.
    """
    validate_prompts(prompt_rows, columns=("id", "prompt"))  # sampling renders the prompt only
    name = name or model
    model_dir = resolve(model)
    output = output_for(prompt_rows, name, model_dir, spec, backend, out_root, engine_kwargs).lock(*shard)
    if output.is_complete():
        logger.info("%s: already complete, skipping", output.path)
        return output.path
    done = output.done_ids()
    todo = [r for r in prompt_rows if in_shard(r["id"], *shard)
            and any(sample_id(r["id"], name, i) not in done for i in range(spec.n))]
    if todo:
        _run_shard(todo, done, output, model_dir, name, spec, backend, shard, engine, engine_kwargs, batch_prompts)
    expected = {sample_id(r["id"], name, i) for r in prompt_rows for i in range(spec.n)}
    if expected <= output.done_ids():
        output.finalize()
    else:
        logger.info("%s: shard %d/%d done; waiting for the other shards", output.path, *shard)
    return output.path


def _run_shard(todo: list[dict], done: set[str], output: StageOutput, model_dir: str, name: str, spec: SamplingSpec,
               backend: str, shard: tuple[int, int], engine: Engine | None, engine_kwargs: dict[str, Any] | None,
               batch_prompts: int | None) -> None:
    from transformers import AutoTokenizer

    batch_prompts = batch_size(batch_prompts, spec.n)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"model {name!r} ({model_dir}): its tokenizer has no chat_template, so prompts cannot "
                                "be rendered the way the model expects. Use a model with a chat template.")
    own_engine = engine is None
    engine = engine or load_engine(backend, model_dir, **(engine_kwargs or {}))
    limit = _context_limit(engine)
    tokens, start = 0, time.perf_counter()
    try:
        with output.open_shard(*shard) as writer, tqdm(total=len(todo), desc=f"sample {name}", unit="prompt") as bar:
            for b in range(0, len(todo), batch_prompts):
                rows = todo[b : b + batch_prompts]
                new = [s for s in _sample_batch(engine, tokenizer, rows, name, spec, limit) if s["id"] not in done]
                writer.write(new)
                tokens += sum(s["num_tokens"] for s in new)
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.1f}")
    finally:
        if own_engine:
            engine.close()


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt rows from a finished `prompts` stage output directory or a JSONL file."""
    path = Path(path)
    return read_output(path) if path.is_dir() else read_jsonl(path)


def _sample_one_model(prompts: str, spec: ModelSpec, backend: str, out_root: str, shard: tuple[int, int],
                      batch_prompts: int | None = DEFAULT_BATCH_PROMPTS) -> str:
    rows = read_prompts(prompts)
    return str(sample_prompts(rows, model=spec.ref or spec.name, name=spec.name, spec=spec.sampling(),
                              backend=backend, out_root=out_root, shard=shard, engine_kwargs=spec.engine_kwargs,
                              batch_prompts=batch_prompts))


def _child(conn: Any, *args: Any) -> None:
    logging.basicConfig(level=logging.INFO)
    try:
        with one_engine_process(args[2]):
            conn.send(("ok", _sample_one_model(*args)))
    except BaseException as e:  # report any failure (including a load error) to the parent, then exit non-zero
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise


def run(prompts_dir: str | Path, models: Sequence[ModelSpec], backend: str = "vllm", out_root: str | Path = "runs",
        shard: tuple[int, int] = (0, 1), batch_prompts: int | None = DEFAULT_BATCH_PROMPTS) -> dict[str, Path]:
    """Sample every model of the pool, one after another, each in a fresh (spawned) process so its memory is
    returned before the next loads (docs/bad-inputs.md S1). Returns {model name: output directory}."""
    ctx = multiprocessing.get_context("spawn")
    paths: dict[str, Path] = {}
    for spec in models:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, str(prompts_dir), spec, backend, str(out_root), shard,
                                                batch_prompts))
        proc.start()
        child.close()
        try:
            status, value = parent.recv()
        except EOFError:  # the child died without reporting (killed, out of memory, segfault)
            status, value = "error", "the process ended without a result"
        proc.join()
        if status != "ok" or proc.exitcode != 0:
            raise ModelLoadError(f"sampling model {spec.name!r} failed (exit code {proc.exitcode}): {value}")
        paths[spec.name] = Path(value)
    return paths


# Options that are also ModelSpec fields: the sampling of ``--model``, and the defaults of every ``models:`` entry.
MODEL_DEFAULTS = ("pivot", "n", "temperature", "top_p", "max_tokens", "seed")


@dataclass
class SampleOptions(shards.ShardOptions):
    """The options of `infifpo sample`: flags, or keys of its ``--config`` YAML (``infifpo.config``)."""

    prompts: str = field(metadata={"help": "a `prompts` stage output directory or a JSONL file"})
    model: str | None = field(default=None, metadata={
        "help": "model reference (local dir, packaged name, hub id); or a `models:` list in --config"})
    name: str | None = field(default=None, metadata={"help": "name written in the `model` column; unset: --model"})
    models: list[dict[str, Any] | str] = field(default_factory=list, metadata={
        "yaml_only": True, "help": "the pool: ModelSpec mappings (or names), each sampled in a fresh process"})
    pivot: bool = field(default=False, metadata={"help": "the model is the pivot (n defaults to 8 instead of 4)"})
    n: int | None = field(default=None, metadata={"help": "samples per prompt; unset: 8 for the pivot, 4 otherwise"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling: smallest token set of this mass"})
    max_tokens: int = field(default=256, metadata={"help": "most tokens per completion"})
    seed: int = field(default=0, metadata={"help": "base seed; each sample's seed is derived from it (sample_seed)"})
    backend: Literal["vllm", "transformers"] = field(default="vllm", metadata={"help": "sampling engine"})
    dtype: str | None = field(default=None, metadata={"help": "engine dtype (bfloat16 | float32 | auto)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "vLLM context length (prompt + completion tokens)"})
    tensor_parallel_size: int | None = field(default=None, metadata={
        "help": "vLLM: GPUs per engine (14-24B models need 2-4)"})
    batch_prompts: int | None = field(default=DEFAULT_BATCH_PROMPTS, metadata={
        "help": f"prompts per engine call; unset: {BATCH_SEQUENCES} // n. Rows are written (and a kill loses at most) "
                "one batch at a time"})
    out: str = field(default="runs", metadata={"help": "output root directory"})
    json: bool = field(default=False, metadata={
        "help": "print {model name: output directory} as one JSON line instead of one directory per line"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.model or self.models):
            raise ConfigError("give --prompts and --model, or a `models:` list in --config")
        if self.models and (self.model or self.name):
            raise ConfigError("give --model (and --name) for one model or a `models:` list in --config, not both")
        self.model_specs()

    def engine_kwargs(self) -> dict[str, Any]:
        """Engine constructor arguments: ``dtype``, ``max_model_len`` and ``tensor_parallel_size`` when set, then
        ``engine_arg``."""
        named = {k: v for k in ("dtype", "max_model_len", "tensor_parallel_size") if (v := getattr(self, k))}
        return named | super().engine_kwargs()

    def model_specs(self) -> list[ModelSpec]:
        """The models to sample: ``model`` with these options, or every ``models:`` entry over them (an entry's own
        keys win; its ``engine_kwargs`` are merged over ``engine_kwargs()``). ConfigError for a bad entry."""
        defaults = {k: getattr(self, k) for k in MODEL_DEFAULTS}
        entries = [{"name": self.name or self.model, "ref": self.model}] if self.model else self.models
        known = [f.name for f in fields(ModelSpec)]
        specs = []
        for i, entry in enumerate(entries):
            entry = {"name": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, dict) or not isinstance(entry.get("engine_kwargs", {}), dict):
                raise ConfigError(f"models[{i}]: expected a mapping of ModelSpec fields (or a model name), with "
                                  f"engine_kwargs a mapping; got {entry!r}")
            check_keys(entry, known, f"models[{i}] of --config", f"Keys are ModelSpec fields: {', '.join(known)}.")
            if not entry.get("name"):
                raise ConfigError(f"models[{i}]: no `name` (what the `model` column holds; `ref` defaults to it)")
            specs.append(ModelSpec(**{**defaults, **entry,
                                      "engine_kwargs": {**self.engine_kwargs(), **entry.get("engine_kwargs", {})}}))
        return specs


DESCRIPTION = __doc__.splitlines()[0] + "\n\n" + textwrap.fill(
    "--config FILE is a YAML of these options (keys without --). Its `models:` key (YAML only) is the pool: a list of "
    f"ModelSpec mappings ({', '.join(f.name for f in fields(ModelSpec))}), each sampled in a fresh process, with the "
    f"options {', '.join(MODEL_DEFAULTS)} as their defaults.", 100)


def main(argv: list[str] | None = None) -> int:
    """``infifpo sample --prompts P --model M [options]``, or ``--config FILE`` with the same options as YAML keys
    (and a ``models:`` pool); prints each model's output directory on its own line, in pool order (``--json``: one
    JSON line {model name: output directory})."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_config(SampleOptions, argv, prog="infifpo sample", description=DESCRIPTION)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    specs = options.model_specs()
    # --num_shards: the workers write every shard; this process then only finds the finished output (no engine).
    launched = shards.launch_from_args("sample", argv, options, Path(options.out) / "logs")
    shard = (0, 1) if launched else options.shard_range()
    if options.models:
        paths = run(options.prompts, specs, options.backend, options.out, shard, options.batch_prompts)
    else:
        with one_engine_process(options.backend):
            paths = {specs[0].name: Path(_sample_one_model(options.prompts, specs[0], options.backend, options.out,
                                                           shard, options.batch_prompts))}
    if options.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}))
        record_outputs(*paths.values())
    else:
        announce(*paths.values())
    return 0
