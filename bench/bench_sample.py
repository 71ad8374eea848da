"""Sampling throughput: the vLLM engine against transformers ``generate`` (HFEngine) on the same prompts.

SmolLM2-135M-Instruct, 8 GSM8K test questions in its chat template, 4 samples each, up to 64 new tokens, T = 0.8,
top-p 0.95 (``--prompts/--samples/--max-tokens`` change the size; a GPU needs far more work to be busy). Each engine
runs in its own fresh process (no shared memory or thread state); we time ``generate`` only (engine start reported
separately) after one small warm-up call, and count the tokens actually generated.

    python bench/bench_sample.py [--dtype bfloat16] [--model smollm2-135m-instruct]
                                 [--runs transformers,vllm/inproc,vllm/mp]
    python bench/bench_sample.py --device cuda --prompts 128 --samples 8 --max-tokens 256 --runs transformers,vllm/mp

``vllm/inproc`` runs vLLM's engine core in the calling process (``VLLMEngine(in_process=True)``), ``vllm/mp`` in its
own process (vLLM's default), to show what that setting costs or buys. Runs go one after another, in the order
given; ratios are against the transformers run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources

from common import random_weight_copy, run_worker

PROMPTS, SAMPLES, MAX_TOKENS = 8, 4, 64


def _prompt_ids(model_dir: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from infifpo.logprobs import encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    lines = resources.files("data_prep").joinpath("gsm8k/test.jsonl").read_text().splitlines()[:n]
    return [encode_prompt(tok, [{"role": "user", "content": json.loads(line)["question"]}]) for line in lines]


def worker(backend: str, mode: str, args: argparse.Namespace) -> dict:
    """Run in a child process: build one engine, warm it up, time one generate call. Returns the measurement."""
    from infifpo.backends import SamplingSpec, load_engine
    from infifpo.models.resolve import resolve_model

    model_dir = resolve_model(args.model)
    prompts = _prompt_ids(model_dir, args.prompts)
    t0 = time.perf_counter()
    kwargs = {"dtype": args.dtype}
    if backend == "vllm":
        from infifpo.shards import engine_args

        kwargs.update(max_model_len=1024, in_process=(mode == "inproc"), **engine_args(args.engine_arg))
    else:
        kwargs.update(device=args.device, token_budget=args.token_budget)
    engine = load_engine(backend, model_dir, **kwargs)
    start_s = time.perf_counter() - t0
    spec = SamplingSpec(n=args.samples, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    engine.generate(prompts[:1], SamplingSpec(n=1, temperature=0.8, top_p=0.95, max_tokens=4, seed=0))  # warm-up
    t0 = time.perf_counter()
    gens = engine.generate(prompts, spec)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for gs in gens for g in gs)
    engine.close()
    return {"backend": backend, "mode": mode, "dtype": args.dtype, "start_s": round(start_s, 1),
            "generate_s": round(gen_s, 2), "tokens": tokens, "tok_per_s": round(tokens / gen_s, 1)}


def run_child(backend: str, mode: str, args: argparse.Namespace) -> dict:
    argv = ["--worker", backend, "--mode", mode, "--model", args.model, "--dtype", args.dtype, "--device", args.device,
            "--prompts", str(args.prompts), "--samples", str(args.samples), "--max-tokens", str(args.max_tokens)]
    if args.token_budget:
        argv += ["--token-budget", str(args.token_budget)]
    for item in args.engine_arg:
        argv += ["--engine-arg", item]
    return run_worker(__file__, argv, f"{backend}/{mode}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--runs", default="transformers,vllm/inproc,vllm/mp")
    p.add_argument("--prompts", type=int, default=PROMPTS, help="GSM8K test questions (the first N)")
    p.add_argument("--samples", type=int, default=SAMPLES, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--device", default="cpu", help="transformers backend: cpu | cuda (vLLM picks its own platform)")
    p.add_argument("--token-budget", type=int, default=None, help="transformers backend: tokens per generate batch "
                   "(prompt + max new tokens, times samples); default: the engine's")
    p.add_argument("--random-weights", metavar="DIR", default=None, help="sample from a random-weight copy of the "
                   "model (its config and tokenizer) saved under DIR, e.g. on a GPU box without the checkpoint")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE", help="vLLM runs: an extra "
                   "engine argument, e.g. attention_backend=FLASH_ATTN on a GPU without flashinfer (repeatable)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="-", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.mode, args)), flush=True)
        return
    if args.random_weights:
        from infifpo.models.resolve import resolve_model

        args.model = random_weight_copy(resolve_model(args.model), args.random_weights)
    results, failed = [], []
    for run in filter(None, args.runs.split(",")):
        try:  # one engine failing (e.g. vLLM missing a kernel package) keeps the others' measurements
            results.append(run_child(*(run.split("/") + ["-"])[:2], args))
        except RuntimeError as e:
            failed.append(run)
            print(e, file=sys.stderr)
    hf = next((r["tok_per_s"] for r in results if r["backend"] == "transformers"), float("nan"))
    print(f"{args.prompts} prompts x {args.samples} samples x <= {args.max_tokens} tokens, {args.model}, "
          f"{args.dtype}, transformers on {args.device}")
    print(f"{'backend':<14}{'start s':>9}{'gen s':>8}{'tokens':>8}{'tok/s':>8}{'vs HF':>8}")
    for r in results:
        name = r["backend"] + ("" if r["mode"] == "-" else f"/{r['mode']}")
        print(f"{name:<14}{r['start_s']:>9}{r['generate_s']:>8}{r['tokens']:>8}{r['tok_per_s']:>8}"
              f"{r['tok_per_s'] / hf:>7.2f}x")
    for run in failed:
        print(f"{run:<14}failed (its error is above)")
    print("JSON " + json.dumps(results))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
