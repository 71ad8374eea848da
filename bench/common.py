"""Helpers shared by the benchmarks: device-aware timing, the bf16 matmul peak, random-weight model copies."""

from __future__ import annotations

import shutil
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


def _square_bf16(device: str, size: int | None) -> tuple[int, object, object]:
    """Two random bf16 (size x size) matrices on ``device``: 4096 on CPU, 8192 on a GPU unless ``size`` is given."""
    import torch

    size = size or (8192 if device.startswith("cuda") else 4096)
    a, b = (torch.randn(size, size, dtype=torch.bfloat16, device=device) for _ in range(2))
    return size, a, b


def bf16_peak_flops(device: str = "cpu", size: int | None = None, reps: int = 6) -> float:
    """Best-of-``reps`` FLOP/s of a (size x size) @ (size x size) bf16 torch.matmul: 4096 on CPU, 8192 on a GPU."""
    size, a, b = _square_bf16(device, size)
    return 2 * size**3 / best_seconds(lambda: a @ b, device, reps)


def bf16_matmul_rate(device: str = "cpu", size: int | None = None, reps: int = 3) -> float:
    """Sustained FLOP/s of ``reps`` back-to-back bf16 ``size``^3 matmuls after a warm-up (total FLOPs / total seconds):
    the machine's matmul speed now, where ``bf16_peak_flops`` takes the fastest single product."""
    size, a, b = _square_bf16(device, size)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return reps * 2 * size**3 / (time.perf_counter() - t0)


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
