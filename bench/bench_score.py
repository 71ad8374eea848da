"""Scoring benchmark: our transformers scorer (HFEngine: length-sorted token-budget batches, bf16 streamed load,
LM head in vocabulary tiles, eager and torch.compile'd) against a naive scorer (pad to the batch's longest, fp32,
full-vocabulary log_softmax), on the same requests.

Each scorer runs in its own subprocess, so peak RSS (``ru_maxrss`` of that process, model load included) belongs to
it alone; the RSS after the imports (torch + transformers, the same in every worker) and the bf16 weights are printed
as the floor under it. Also reports our forward FLOP/s as a fraction of the machine's bf16 matmul peak, both measured
in the same run, and the ceiling on that fraction: the model's own GEMM shapes timed alone.
By default (``--compile both``) our scorer runs twice: eager (what a short score run uses) and torch.compile'd (what
a long one switches to); the one-off compile is timed apart (warm-up) and tokens/s is printed both without it (a score
run of thousands of responses, the compile amortised) and with it.

    python bench/bench_score.py                     # Gemma-3-270M and SmolLM2-135M, 48 responses of 32-384 tokens
    python bench/bench_score.py --models smollm2-135m-instruct --n 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import best_seconds, bf16_matmul_rate, bf16_peak_flops, random_weight_copy, sync


def make_requests(vocab: int, n: int, prompt_tokens: int, lo: int, hi: int, seed: int):
    """``n`` (prompt, completion) pairs of random token ids: prompts of ``prompt_tokens``, completions lo..hi."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, vocab - 1000) for _ in range(prompt_tokens)] for _ in range(n)]
    completions = [[rng.randrange(1000, vocab - 1000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return prompts, completions


def naive_score(model, prompts, completions, batch_size: int, device: str = "cpu",
                pad_to: int | None = None, keep_previous: bool = False) -> tuple[list[float], int]:
    """Requests in given order, ``batch_size`` at a time, right-padded to the batch's longest (or to ``pad_to``
    tokens); fp32 logits over the whole vocabulary at every position, log_softmax, gather. ``keep_previous`` leaves
    out the ``del`` of the last batch's log-probs, as the loop is often written: they stay alive while the next batch
    runs. Returns (summed log-probs, tokens processed)."""
    import torch

    sums, processed = [], 0
    for s in range(0, len(prompts), batch_size):
        seqs = [p + c for p, c in zip(prompts[s : s + batch_size], completions[s : s + batch_size], strict=True)]
        width = pad_to or max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, seq in enumerate(seqs):
            ids[b, : len(seq)], mask[b, : len(seq)] = torch.tensor(seq), 1
        processed += ids.numel()
        with torch.no_grad():
            logp = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         use_cache=False).logits.float().log_softmax(-1)
        for b, (p, c) in enumerate(zip(prompts[s : s + batch_size], completions[s : s + batch_size], strict=True)):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=device)
            sums.append(logp[b, pos, torch.tensor(c, device=device)].sum().item())
        if not keep_previous:
            del logp
    return sums, processed


def worker(args: argparse.Namespace) -> dict:
    """Load one scorer, score the requests once (timed, peak RSS), then again batch by batch between probes of the
    machine's matmul speed (``interleaved_peak_probes``); report seconds, tokens, FLOP counts and the peak RSS."""
    import torch

    from infifpo.backends.hf_engine import HFEngine, token_budget_batches
    from infifpo.models.resolve import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    import_rss_gb = _rss_gb("VmRSS")
    # The matmul peak where and when this scorer runs, before its load (its buffers must not raise the peak RSS).
    dev = args.device
    peak_flops = bf16_peak_flops(dev) if args.worker == "ours" else 0.0
    path = resolve_model(args.model)
    t0 = time.perf_counter()
    if args.worker == "ours":
        engine = HFEngine(path, dtype=args.dtype, token_budget=args.token_budget, head_chunk=args.head_chunk,
                          compile_head=args.compile_head, compile={"on": True, "off": False}.get(args.compile),
                          device=dev)
        model = engine.model
        args.token_budget = engine.token_budget  # None -> the engine's default (4096 on CPU; from free memory on CUDA)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(dev)
    load_s = time.perf_counter() - t0
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts, completions = make_requests(vocab, args.n, args.prompt_tokens, args.min_len, args.max_len, args.seed)
    t0 = time.perf_counter()  # warm-up on two short requests (oneDNN kernel selection; the torch.compile)
    if args.worker == "ours":  # a batch of 2: batches of 1 stay eager, and dynamic shapes cover every later batch
        engine.score(prompts[:2], [completions[0][:8], completions[1][:8]])
    else:
        naive_score(model, prompts[:1], [completions[0][:8]], 1, dev)
    warmup_s = time.perf_counter() - t0
    load_rss_gb = _rss_gb("VmRSS")
    _reset_peak_rss()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    pad_to = max(lengths) if args.naive_pad == "longest" else None
    t0 = time.perf_counter()
    if args.worker == "ours":
        sums = [sum(x) for x in engine.score(prompts, completions)]
        batches = list(token_budget_batches(lengths, args.token_budget))
        processed = sum(len(b) * lengths[b[0]] for b in batches)
    else:
        sums, processed = naive_score(model, prompts, completions, args.naive_batch, dev, pad_to,
                                      args.naive_keep_previous)
        batches = [list(range(s, min(s + args.naive_batch, args.n))) for s in range(0, args.n, args.naive_batch)]
    seconds = time.perf_counter() - t0
    peak_rss_gb, scoring_peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, _rss_gb("VmHWM")
    # On a GPU the memory that matters is the device's: the allocator's peak while scoring (weights included).
    peak_gpu_gb = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    non_embedding = params - embed if head.data_ptr() == model.get_input_embeddings().weight.data_ptr() \
        else params - embed - head.numel()

    def batch_flops(batch: list[int]) -> float:  # our forward's count (each batch padded to its longest request)
        width = max(lengths[i] for i in batch)
        return (2 * non_embedding * len(batch) * width + 2 * head.numel() * sum(len(completions[i]) for i in batch)
                + attention_flops(model.config, len(batch), width))

    def score_batch(batch: list[int]) -> None:
        ps, cs = [prompts[i] for i in batch], [completions[i] for i in batch]
        engine.score(ps, cs) if args.worker == "ours" else naive_score(model, ps, cs, len(batch), dev, pad_to)

    ceiling = None
    if args.worker == "ours":  # after the RSS readings: these matmuls allocate
        ceiling = gemm_ceiling(model, args.token_budget, sum(map(len, completions)) / processed, dev)
        peak_flops = max(peak_flops, bf16_peak_flops(dev))
    interleaved = interleaved_peak_probes(score_batch, batches, lambda b: sum(lengths[i] for i in b),
                                          batch_flops if args.worker == "ours" else lambda b: 0.0, dev)
    return {
        "scorer": args.worker, "model": args.model, "dtype": str(next(model.parameters()).dtype), "load_s": load_s,
        "seconds": seconds, "real_tokens": sum(lengths),
        "response_tokens": sum(map(len, completions)), "processed_tokens": processed, "params": params,
        "non_embedding_params": non_embedding, "interleaved": interleaved,
        "attention_flops": sum(attention_flops(model.config, len(b), max(lengths[i] for i in b)) for b in batches),
        "head_flops_per_position": 2 * head.numel(), "sums": sums,
        "peak_rss_gb": peak_rss_gb, "peak_gpu_gb": peak_gpu_gb, "device": dev, "threads": torch.get_num_threads(),
        "warmup_s": warmup_s, "compiled": args.worker == "ours" and engine._compiled_backbone is not None
        and not engine._compile_failed, "rss_after_load_gb": load_rss_gb, "scoring_peak_rss_gb": scoring_peak_rss_gb,
        "peak_flops": peak_flops, "import_rss_gb": import_rss_gb, "naive_batch": args.naive_batch,
        "naive_keep_previous": args.naive_keep_previous, "naive_pad": args.naive_pad,
        "token_budget": args.token_budget, "gemm_ceiling_flops": ceiling,
        "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
    }


def attention_flops(config, batch: int, width: int) -> float:
    """FLOPs of the attention products (Q K^T and A V) in one forward of ``batch`` sequences of ``width`` positions
    (padding included), counting only the query-key pairs a causal mask keeps (and a sliding window, on the layers
    that have one): 4 x heads x head_dim per pair per layer."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    window = getattr(text, "sliding_window", None) or width
    pairs = 0
    for kind in layer_types:
        w = min(window, width) if kind == "sliding_attention" else width
        pairs += w * (w + 1) // 2 + (width - w) * w  # query i sees min(i + 1, w) keys
    return 4 * heads * head_dim * pairs * batch


def interleaved_peak_probes(score_batch, batches: list[list[int]], batch_tokens, batch_flops, device: str) -> dict:
    """Score the requests again, one batch of the timed run at a time (``score_batch``), with a probe of the machine's
    bf16 matmul speed (``bf16_matmul_rate``: three 4096^3 products back to back, ~0.5 s) before the first batch and
    after each one. Returns the tokens, forward FLOPs and seconds, and the FLOPs the matmuls would have done in those
    seconds (each batch's seconds x the mean of the probes on either side of it). Shares and speeds are then taken
    against the machine's speed at the moment each batch ran: this 2-core machine's matmul throughput moved between
    ~400 and ~1400 GFLOP/s from one minute to the next. A sustained rate, not the best single product, which catches
    short bursts: in one run best-of-three probes averaged 1030 GFLOP/s around SmolLM2's compiled batches (431 GFLOP/s)
    and 543 around its eager ones (321 GFLOP/s)."""
    before = bf16_matmul_rate(device)
    tokens = flops = seconds = peak_work = 0.0
    for batch in batches:
        sync(device)
        t0 = time.perf_counter()
        score_batch(batch)
        sync(device)
        dt = time.perf_counter() - t0
        after = bf16_matmul_rate(device)
        tokens, flops, seconds = tokens + batch_tokens(batch), flops + batch_flops(batch), seconds + dt
        peak_work += dt * (before + after) / 2
        before = after
    return {"tokens": tokens, "flops": flops, "seconds": seconds, "peak_work": peak_work}


def gemm_ceiling(model, tokens: int, scored_fraction: float, device: str = "cpu") -> float:
    """FLOP/s of the model's own matmuls alone, in its dtype, for one forward of ``tokens`` positions: every nn.Linear
    of the backbone as (tokens x in) @ (in x out), and the LM head as our scorer runs it (vocabulary tiles over the
    ``scored_fraction`` of positions that are scored). Each shape is timed best-of-3, without attention, norms or
    activations: a forward of this model at this batch size cannot run its FLOPs faster."""
    import torch

    from infifpo.logprobs import HEAD_TILE_ELEMENTS

    shapes: dict[tuple[int, int], int] = {}
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            shapes[tuple(module.weight.shape)] = shapes.get(tuple(module.weight.shape), 0) + 1
    dtype = next(model.parameters()).dtype
    flops = seconds = 0.0
    with torch.inference_mode():
        x = torch.randn(tokens, max(i for _, i in shapes), dtype=dtype, device=device)
        for (out_f, in_f), count in shapes.items():
            a, w = x[:, :in_f].contiguous(), torch.randn(out_f, in_f, dtype=dtype, device=device)
            seconds += count * best_seconds(lambda a=a, w=w: torch.nn.functional.linear(a, w), device)
            flops += count * 2 * tokens * in_f * out_f
        scored = max(1, int(tokens * scored_fraction))
        vocab, hidden = head.weight.shape
        tile = min(vocab, max(256, HEAD_TILE_ELEMENTS // scored // 256 * 256))
        h, w = torch.randn(scored, hidden, dtype=dtype, device=device), head.weight

        def tiles() -> None:
            for v in range(0, vocab, tile):
                h @ w[v : v + tile].T

        seconds += best_seconds(tiles, device)
        flops += 2 * scored * hidden * vocab
    return flops / seconds


def _rss_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so the scoring phase's peak is measurable."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_worker(kind: str, model: str, args: argparse.Namespace, compile: str = "off") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", model, "--compile", compile]
    for k in ("n", "prompt_tokens", "min_len", "max_len", "seed", "token_budget", "naive_batch", "naive_pad", "dtype",
              "threads", "device"):
        if getattr(args, k) is not None:
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += ["--compile-head"] * args.compile_head + ["--naive-keep-previous"] * args.naive_keep_previous
    if args.head_chunk:
        cmd += ["--head-chunk", str(args.head_chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker on {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tokens_per_peak(run: dict) -> float:
    """A scorer's tokens/s over the matmul peak at the moments it ran (tokens per peak FLOP, from its probed pass)."""
    return run["interleaved"]["tokens"] / run["interleaved"]["peak_work"]


def report(model: str, runs: list[dict], naive: dict | None, peak: float) -> list[dict]:
    """Print one model's comparison (every run of our scorer against the naive one) and return its summary rows."""
    first = runs[0]
    gpu = first["device"].startswith("cuda")
    mem, mem_name = ("peak_gpu_gb", "peak GPU memory") if gpu else ("peak_rss_gb", "peak RSS")
    floor = first["weights_gb"] + (0 if gpu else first["import_rss_gb"])  # on a GPU the imports stay on the host
    print(f"\n== {model}: {len(first['sums'])} responses, {first['response_tokens']} response + "
          f"{first['real_tokens'] - first['response_tokens']} prompt tokens; {first['threads']} threads")
    if naive:
        ntps = naive["real_tokens"] / naive["seconds"]
        pad = "the set's longest" if naive["naive_pad"] == "longest" else "their longest"
        pad += ", the previous batch's log-probs kept alive" if naive["naive_keep_previous"] else ""
        print(f"naive ({naive['dtype']}, batches of {naive['naive_batch']} padded to {pad}): {ntps:8.1f} tok/s  "
              f"{mem_name} {naive[mem]:.2f} GB; padding {naive['processed_tokens'] / naive['real_tokens'] - 1:.1%}")
        naive_per_peak = _tokens_per_peak(naive)
    rows = []
    for ours in runs:
        tps = ours["real_tokens"] / ours["seconds"]
        brief_flops = 2 * ours["params"] * ours["processed_tokens"] / ours["seconds"]
        matmul_flops = (2 * ours["non_embedding_params"] * ours["processed_tokens"] + ours["attention_flops"]
                        + ours["head_flops_per_position"] * ours["response_tokens"]) / ours["seconds"]
        inter = ours["interleaved"]
        with_compile = ours["real_tokens"] / (ours["seconds"] + ours["warmup_s"])
        mode = "compiled" if ours["compiled"] else "eager"
        print(f"ours  ({ours['dtype']}, {mode}): {tps:8.1f} tok/s ({with_compile:.1f} counting the "
              f"{ours['warmup_s']:.0f} s warm-up/compile)  {mem_name} {ours[mem]:.2f} GB (RSS after load "
              f"{ours['rss_after_load_gb']:.2f}, while scoring {ours['scoring_peak_rss_gb']:.2f}); load "
              f"{ours['load_s']:.1f} s, padding {ours['processed_tokens'] / ours['real_tokens'] - 1:.1%}")
        row = {"model": model, "mode": mode, "device": first["device"], "ours_tok_s": tps, "ours_peak_gb": ours[mem],
               "ours_scoring_peak_gb": ours["scoring_peak_rss_gb"], "bf16_peak_tflops": peak / 1e12,
               "flops_frac_2PT": brief_flops / peak, "flops_frac_matmul": matmul_flops / peak,
               "flops_frac_interleaved": inter["flops"] / inter["peak_work"],
               "gemm_ceiling_frac": ours["gemm_ceiling_flops"] / peak, "floor_gb": floor}
        if naive:
            diff = [abs(a - b) for a, b in zip(ours["sums"], naive["sums"], strict=True)]
            print(f"   ratio vs naive: {tps / ntps:.2f}x tokens/s ({with_compile / ntps:.2f}x with the compile), "
                  f"{ours[mem] / naive[mem]:.3f}x {mem_name}; |ours - naive fp32| = "
                  f"{sum(diff) / ours['response_tokens']:.4f} nats/token (max per sequence {max(diff):.3f} nats)")
            at_equal_speed = _tokens_per_peak(ours) / naive_per_peak
            print(f"   at equal machine speed: {at_equal_speed:.2f}x tokens/s (both scored again batch by batch, each "
                  f"one's tokens/s divided by the matmul speed probed around its batches)")
            row.update(naive_tok_s=ntps, naive_peak_gb=naive[mem], speedup=tps / ntps,
                       speedup_at_equal_peak=at_equal_speed, speedup_with_compile=with_compile / ntps,
                       memory_ratio=ours[mem] / naive[mem], floor_ratio=floor / naive[mem])
        print(f"   forward: {matmul_flops / 1e9:.0f} GFLOP/s = {matmul_flops / peak:.1%} of the run's best bf16 "
              f"matmul peak, counting 2 x non-embedding params per token the backbone processes (padding included) "
              f"+ 2 x head params per scored position (the only ones that go through the head) + the causal attention "
              f"products ({ours['attention_flops'] / (matmul_flops * ours['seconds']):.1%} of the count). As 2 x "
              f"all params x processed tokens: {brief_flops / peak:.1%}")
        print(f"   batch by batch, against the matmul speed probed before and after each batch: "
              f"{inter['flops'] / inter['seconds'] / 1e9:.0f} GFLOP/s = {inter['flops'] / inter['peak_work']:.1%} of "
              f"the matmul speed at those moments (mean {inter['peak_work'] / inter['seconds'] / 1e9:.0f} GFLOP/s)")
        rows.append(row)
    print(f"ceiling: this model's own GEMM shapes alone (forwards of {first['token_budget']} tokens,"
          f" no attention/norms/activations) run at {first['gemm_ceiling_flops'] / 1e9:.0f} GFLOP/s = "
          f"{first['gemm_ceiling_flops'] / peak:.1%} of the peak")
    imports = "" if gpu else f"{first['import_rss_gb']:.2f} GB RSS after importing torch + transformers (both " \
        "scorers pay it) + "
    print(f"memory floor: {imports}{first['weights_gb']:.2f} GB of {first['dtype']} weights = {floor:.2f} GB"
          + (f" = {floor / naive[mem]:.3f}x the naive peak" if naive else ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by the worker subprocesses
    os.environ.setdefault("TQDM_DISABLE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m-instruct"])
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-budget", type=int, default=None, help="tokens per scoring forward; default: the "
                   "engine's (4096 on CPU, what fits a share of the free memory on CUDA)")
    p.add_argument("--head-chunk", type=int, default=None, help="ours: positions per LM-head chunk (the autograd "
                   "path) instead of vocabulary tiles")
    p.add_argument("--naive-batch", type=int, default=8)
    p.add_argument("--naive-pad", choices=("batch", "longest"), default="batch", help="naive: pad each batch to its "
                   "own longest request (default), or every batch to the longest request of the whole set")
    p.add_argument("--naive-keep-previous", action="store_true", help="naive: without the del of the last batch's "
                   "log-probs, so they stay alive while the next batch runs (a common way to write the loop; its peak "
                   "is near the issue's anchor of 12.5 GB on Gemma-3-270M)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile-head", action="store_true", help="ours: torch.compile the head's log-sum-exp only")
    p.add_argument("--compile", choices=("both", "on", "off", "auto"), default="both",
                   help="ours: torch.compile backbone + head (both: one eager and one compiled run; auto: the "
                   "engine's default policy, eager for this size)")
    p.add_argument("--device", default="cpu", help="cpu | cuda: where both scorers run (on cuda the memory compared "
                   "is the GPU allocator's peak, and the matmul peak is an 8192^3 bf16 product)")
    p.add_argument("--random-weights", metavar="DIR", default=None, help="score with random-weight copies of the "
                   "models (their config and tokenizer, weights seeded), saved under DIR: for a machine without the "
                   "checkpoints, e.g. a GPU box without a hub connection; --models may then name config directories")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--json", default=None, help="also write the summary rows to this file")
    p.add_argument("--worker", choices=("ours", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    peak = bf16_peak_flops(args.device)
    modes = ["off", "on"] if args.compile == "both" else [args.compile]
    results = []
    for model in args.models:
        if args.random_weights:
            from infifpo.models.resolve import resolve_model

            model = random_weight_copy(resolve_model(model), args.random_weights)
        naive = None if args.skip_naive else run_worker("naive", model, args)
        results.append((Path(model).name, [run_worker("ours", model, args, mode) for mode in modes], naive))
    # The best of the measurements before and after all scorers and inside each of ours, right before and after it
    # scores: this machine's matmul throughput varied 2x within minutes (557-1338 GFLOP/s), and a peak taken in a
    # slow moment would flatter the fraction.
    peak = max([peak, bf16_peak_flops(args.device)] + [run["peak_flops"] for _, runs, _ in results for run in runs])
    rows = [row for model, runs, naive in results for row in report(model, runs, naive, peak)]
    size = 8192 if args.device.startswith("cuda") else 4096
    print(f"\nbf16 matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s ({size}^3 torch.matmul, best of 6, "
          "before and after all scorers and inside each of ours, before its load and after it scores; the best)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
