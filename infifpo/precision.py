"""Precision by measurement on CPU: "auto" means whichever of bf16 and fp32 multiplies the model's own matrices
faster on this machine, timed once and cached.

A CPU that reports native bf16 (oneDNN's flag: AVX512-BF16 or AMX) is not always faster in bf16: with AMX bf16
matmuls run ~2x fp32, with AVX512-BF16 alone (no AMX) they ran at 0.3-0.7x fp32 on the 2-core CI machine. So the
flag decides nothing here; a timing does. ``auto_cpu_dtype`` times one (tokens x hidden) @ (hidden x intermediate)
product, the model's MLP up-projection, in both precisions, alternating them ``rounds`` times so that a machine whose
speed moves under shared load affects both alike, and takes the precision with the higher median rate. The choice,
both rates (GFLOP/s) and the shape are cached in ``$INFIFPO_CACHE/precision.json`` (default
``~/.cache/infifpo``), keyed by the CPU model and flags, the torch version, the thread count and the shape, and
logged. ``INFIFPO_CPU_DTYPE=bfloat16|float32`` overrides the measurement. ``infifpo env`` prints the cache.

Used by the transformers scorer and sampler (``backends.hf_engine.resolve_dtype``), the vLLM engine on CPU and the
trainers' bf16 default on CPU. On a GPU, bf16 is native where supported and nothing is measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from infifpo.store import atomic_write, cache_root

logger = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")
OVERRIDE_ENV = "INFIFPO_CPU_DTYPE"
CACHE_FILE = "precision.json"
DEFAULT_SHAPE = (64, 576, 1536)  # tokens, hidden, intermediate: SmolLM2-135M's MLP at a batch of 64 tokens
ROUNDS = 5  # alternations of fp32 and bf16 timings
MIN_TIME_S = 0.05  # each timing repeats the product until this long has passed


def _cpu_id() -> str:
    """The CPU model and its flags (hashed), from /proc/cpuinfo where there is one."""
    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith("flags")), "")
    return f"{model} flags:{hashlib.sha256(' '.join(sorted(flags.split())).encode()).hexdigest()[:12]}"


def cache_key(shape: tuple[int, int, int], threads: int) -> str:
    """The cache entry a measurement is stored under: CPU, torch version, threads and shape."""
    import torch

    return f"{_cpu_id()}|torch {torch.__version__}|threads {threads}|shape {'x'.join(map(str, shape))}"


def matmul_rates(shape: tuple[int, int, int] = DEFAULT_SHAPE, *, rounds: int = ROUNDS) -> dict[str, float]:
    """{"bfloat16": GFLOP/s, "float32": GFLOP/s}: the median over ``rounds`` alternating timings of an (m, k) @ (k, n)
    product in each precision."""
    import torch

    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    mats = {dt: (torch.randn(m, k, generator=gen).to(getattr(torch, dt)),
                 torch.randn(k, n, generator=gen).to(getattr(torch, dt))) for dt in DTYPES}
    rates: dict[str, list[float]] = {dt: [] for dt in DTYPES}
    for a, b in mats.values():  # warm-up: oneDNN picks and caches its kernels on the first call
        torch.matmul(a, b)
    for _ in range(rounds):
        for dt, (a, b) in mats.items():
            calls, start = 0, time.perf_counter()
            while True:
                torch.matmul(a, b)
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= MIN_TIME_S:
                    break
            rates[dt].append(2 * m * k * n * calls / elapsed / 1e9)
    return {dt: round(statistics.median(r), 3) for dt, r in rates.items()}


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def auto_cpu_dtype(shape: tuple[int, int, int] = DEFAULT_SHAPE, *, refresh: bool = False) -> str:
    """"bfloat16" or "float32": the faster on this CPU for ``shape`` (tokens, hidden, intermediate), measured once
    per machine and cached (see the module docstring); ``INFIFPO_CPU_DTYPE`` overrides it."""
    import torch

    forced = os.environ.get(OVERRIDE_ENV)
    if forced:
        if forced not in DTYPES:
            from infifpo.schema import ConfigError

            raise ConfigError(f"{OVERRIDE_ENV}={forced!r}: use one of {DTYPES}, or unset it to measure.")
        return forced
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return "float32"  # bf16 would be emulated: always slower, nothing to measure
    shape = tuple(int(x) for x in shape)
    key, path = cache_key(shape, torch.get_num_threads()), cache_root() / CACHE_FILE
    cached = _read_cache(path).get(key)
    if cached and not refresh and cached.get("dtype") in DTYPES:
        return cached["dtype"]
    rates = matmul_rates(shape)
    choice = max(DTYPES, key=rates.__getitem__)
    logger.info("CPU precision: %s (bf16 %.1f vs fp32 %.1f GFLOP/s on a %s matmul; cached in %s)", choice,
                rates["bfloat16"], rates["float32"], "x".join(map(str, shape)), path)
    data = _read_cache(path)
    data[key] = {"dtype": choice, "gflops": rates, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1))
    return choice


def model_dir_shape(model_dir: str | os.PathLike) -> tuple[int, int, int]:
    """(tokens, hidden, intermediate) from the config.json of a checkpoint directory (its text config for multimodal
    ones); the default shape if it cannot be read."""
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return DEFAULT_SHAPE
    text = raw.get("text_config") or raw
    hidden = text.get("hidden_size") or DEFAULT_SHAPE[1]
    return DEFAULT_SHAPE[0], int(hidden), int(text.get("intermediate_size") or 4 * hidden)


def cached_choices() -> dict[str, Any]:
    """Every cached measurement: {cache key: {"dtype", "gflops", "measured"}} (for ``infifpo env``)."""
    return _read_cache(cache_root() / CACHE_FILE)
