"""Helpers shared by the benchmarks: device-aware timing, the matmul peak and memory bandwidth, random-weight model
copies, random prompts, and running a benchmark's worker in a fresh process.

Imports only the standard library at module level (torch and transformers inside the functions), so a benchmark's
parent process and the GPU path without infifpo can use it."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Files copied beside a random-weight checkpoint, so sampling benchmarks keep the model's tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock timings cover it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def best_seconds(fn: Callable[[], object], device: str = "cpu", reps: int = 3) -> float:
    """Best of ``reps`` wall-clock seconds of ``fn()`` after one warm-up call, synchronising the device around each."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _square(device: str, size: int | None, dtype: str = "bfloat16") -> tuple[int, object, object]:
    """Two random (size x size) matrices of ``dtype`` on ``device``: 4096 on CPU, 8192 on a GPU unless ``size`` is
    given."""
    import torch

    size = size or (8192 if device.startswith("cuda") else 4096)
    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype), device=device) for _ in range(2))
    return size, a, b


def bf16_peak_flops(device: str = "cpu", size: int | None = None, reps: int = 6) -> float:
    """Best-of-``reps`` FLOP/s of a (size x size) @ (size x size) bf16 torch.matmul: 4096 on CPU, 8192 on a GPU."""
    size, a, b = _square(device, size)
    return 2 * size**3 / best_seconds(lambda: a @ b, device, reps)


def matmul_rate(device: str = "cpu", dtype: str = "bfloat16", size: int | None = None, reps: int = 3) -> float:
    """Sustained FLOP/s of ``reps`` back-to-back ``size``^3 matmuls in ``dtype`` after a warm-up (total FLOPs / total
    seconds): the machine's matmul speed now, where ``bf16_peak_flops`` takes the fastest single product. On a GPU,
    fp32 products may run on TF32 tensor cores if torch allows it (``torch.backends.cuda.matmul.allow_tf32``; off by
    default), as they would in a model's forward."""
    size, a, b = _square(device, size, dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return reps * 2 * size**3 / (time.perf_counter() - t0)


def bf16_matmul_rate(device: str = "cpu", size: int | None = None, reps: int = 3) -> float:
    """``matmul_rate`` in bf16."""
    return matmul_rate(device, "bfloat16", size, reps)


def memory_bandwidth(device: str = "cpu", mib: int | None = None, reps: int = 5) -> dict[str, float]:
    """Bytes/s the machine moves between memory and the cores (CPU) or HBM and the SMs (GPU), best of ``reps``
    after a warm-up, on fp32 tensors of ``mib`` MiB (512 on CPU, 2048 on a GPU: far beyond any cache):
    ``read``: ``x.sum()``, counting the bytes of ``x`` read; ``copy``: ``y.copy_(x)``, counting the bytes read plus
    the bytes written (2x the tensor; the cache's write-allocate read of ``y``, if any, is not counted, so this
    understates the traffic rather than overstating it). A decode step mostly reads (weights, KV cache), so the
    roofline takes the larger of the two as the bandwidth."""
    import torch

    mib = mib or (2048 if device.startswith("cuda") else 512)
    x = torch.rand(mib * 2**18, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    read = nbytes / best_seconds(lambda: x.sum(), device, reps)
    copy = 2 * nbytes / best_seconds(lambda: y.copy_(x), device, reps)
    return {"read": read, "copy": copy}


def random_prompts(vocab: int, n: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``tokens`` random token ids each, drawn away from both ends of the vocabulary (where special
    tokens sit)."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(tokens)] for _ in range(n)]


def run_worker(script: str, argv: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    """Run ``python script argv...`` in a fresh process (no shared memory, threads or allocator state with the other
    measurements) and return the JSON of the last stdout line starting with ``RESULT ``. RuntimeError naming
    ``what`` with the child's first ``Error:`` line (an engine core's, if it died first) and its stderr tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        cause = next((ln for ln in proc.stderr.splitlines() if "Error:" in ln), "")
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {cause}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def random_weight_copy(src: str, dst_root: str | Path, seed: int = 0) -> str:
    """Save a model with ``src``'s config (a checkpoint directory or just its config.json) and random weights (fp32,
    seeded) under ``dst_root``, with ``src``'s tokenizer files; returns its directory. Speed does not depend on the
    weights, so a GPU machine without the checkpoints (or a hub connection) can still time the real architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src_dir = Path(src)
    dst = Path(dst_root) / src_dir.name
    if (dst / "config.json").is_file() and any(dst.glob("*.safetensors")):
        return str(dst)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src_dir), dtype=torch.float32)
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dst / name)
    return str(dst)
