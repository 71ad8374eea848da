"""Relaunching ``infifpo train`` under ``accelerate launch``: the scale-out flags of the train stage.

Owns: ``--num_processes N`` and ``--accelerate_config FILE|NAME`` (``configs/accelerate/{single,ddp,zero3,fsdp2}.yaml``)
taken out of the command line, the ``accelerate launch`` command that reruns the same ``infifpo train`` on every rank
(as TRL's CLI does) with the train config's precision as ``--mixed_precision``, and telling a launched rank from the
launcher. Does not own: parsing the train config or training (``trainers.entry``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from infifpo.schema import ConfigError

logger = logging.getLogger(__name__)
LAUNCH_FLAGS = ("--num_processes", "--accelerate_config")
LAUNCHED_ENV = "INFIFPO_ACCELERATE_LAUNCHED"  # set in the child's env so a launched process never relaunches
# Set by torchrun / accelerate / deepspeed / mpirun in every launched rank.
RANK_ENV = ("LOCAL_RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
ACCELERATE_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def split_launch_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Pull ``--num_processes N`` and ``--accelerate_config FILE`` (or ``--flag=value``) out of ``argv``."""
    launch, rest, i = {}, [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in LAUNCH_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{flag} needs a value.")
                value, i = argv[i + 1], i + 1
            launch[flag[2:]] = value
        else:
            rest.append(argv[i])
        i += 1
    return launch, rest


def in_launched_process() -> bool:
    """Whether this process is a rank started by a launcher (ours, accelerate, torchrun, deepspeed, mpirun)."""
    return any(os.environ.get(k) for k in (LAUNCHED_ENV, *RANK_ENV))


def resolve_accelerate_config(name: str) -> Path:
    """A config file path, or a name of ``configs/accelerate/<name>.yaml`` (in the working dir or this checkout)."""
    for candidate in (Path(name), Path("configs/accelerate") / f"{name}.yaml", ACCELERATE_CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    shipped = sorted(p.stem for p in ACCELERATE_CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"--accelerate_config {name!r} is neither a file nor one of {shipped} "
                      f"(configs/accelerate/); pass a path to an `accelerate config` YAML.")


def _launch_plan(launch: dict[str, str]) -> tuple[Path | None, dict[str, Any], int]:
    """(accelerate config path or None, its YAML, number of processes) for the launch flags."""
    path, config = None, {}
    if "accelerate_config" in launch:
        path = resolve_accelerate_config(launch["accelerate_config"])
        config = yaml.safe_load(path.read_text()) or {}
    try:
        n = int(launch.get("num_processes", config.get("num_processes", 1)))
    except ValueError:
        raise ConfigError(f"--num_processes {launch['num_processes']!r} is not an integer.") from None
    if n < 1:
        raise ConfigError(f"--num_processes {n}: need at least 1.")
    if str(config.get("distributed_type", "")) == "NO" and n > 1:
        raise ConfigError(f"{launch['accelerate_config']} has distributed_type NO (one process) but --num_processes "
                          f"{n}; use configs/accelerate/ddp.yaml (or zero3 / fsdp2) for several processes.")
    return path, config, n


def accelerate_launch_command(launch: dict[str, str], train_argv: list[str], *, mixed_precision: str) -> list[str]:
    """The ``accelerate launch`` command line that reruns ``infifpo train <train_argv>`` on every rank.

    ``mixed_precision`` ("no" | "bf16" | "fp16") is the train config's precision: passed explicitly so an accelerate
    config's ``mixed_precision`` cannot silently turn on autocast for a run configured as fp32. Without a config,
    N > 1 processes use ``--multi_gpu`` (torchrun): on a CPU-only machine each rank then trains on CPU with gloo
    (accelerate's MULTI_CPU; ``--cpu`` would start one process). A single-machine run without a configured port
    takes a free one (port 0).
    """
    path, config, n = _launch_plan(launch)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if path is not None:
        cmd += ["--config_file", str(path)]
    if "num_processes" in launch:
        cmd += ["--num_processes", str(n)]
    if path is None and n > 1:
        cmd.append("--multi_gpu")
    if int(config.get("num_machines", 1)) <= 1 and "main_process_port" not in config:
        cmd += ["--main_process_port", "0"]  # a free port: concurrent runs on one machine do not collide on 29500
    cmd += ["--mixed_precision", mixed_precision, "--module", "infifpo.cli", "train", *train_argv]
    return cmd


def relaunch(launch: dict[str, str], train_argv: list[str], train_args: Any) -> int:
    """Run ``infifpo train`` under ``accelerate launch`` in a child process (same env); its exit code."""
    precision = "fp16" if train_args.fp16 else "bf16" if train_args.bf16 else "no"
    cmd = accelerate_launch_command(launch, train_argv, mixed_precision=precision)
    env = {**os.environ, LAUNCHED_ENV: "1"}
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:
        # torchrun would pin every CPU rank to 1 thread; split the cores between the ranks instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _launch_plan(launch)[2]))
    logger.info("relaunching under accelerate: %s", " ".join(cmd))
    rc = subprocess.run(cmd, env=env, check=False).returncode
    return rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's 128 + signal number
