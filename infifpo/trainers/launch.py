"""Relaunching ``infifpo train`` under ``accelerate launch``: the scale-out flags of the train stage.

Owns: ``--num_processes N`` and ``--accelerate_config FILE|NAME`` (NAME: one of the configs TRL ships in
``trl/accelerate_configs``, as TRL's own CLI resolves them: ``zero1``-``zero3``, ``fsdp1``, ``fsdp2``, ``multi_gpu``,
``single_gpu``; ``ddp`` and ``single`` are aliases of the last two) taken out of the command line, the ``accelerate
launch`` command that reruns the same ``infifpo train`` on every rank (as TRL's CLI does) with the train config's
precision as ``--mixed_precision``, and telling a launched rank from the launcher, and waiting for the launch: a rank
still running ``RANK_EXIT_TIMEOUT_S`` after another rank exited is hung, so its stacks are printed and it is killed,
with an error naming it (``run_launcher``); an interrupted ``infifpo train`` takes the launcher and every rank down
with it, and the launcher dies with ``infifpo train`` even when that is SIGKILLed (PR_SET_PDEATHSIG). Does not own:
parsing the train config or training (``trainers.entry``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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
# After the first rank exits, the others have this long to exit too (they leave together after the final barrier, or
# torchrun stops them when one fails); one still running is hung. INFIFPO_RANK_EXIT_TIMEOUT_S overrides it.
RANK_EXIT_TIMEOUT_S = 300.0
RANK_EXIT_TIMEOUT_ENV = "INFIFPO_RANK_EXIT_TIMEOUT_S"
STOP_GRACE_S = 30.0  # SIGTERM -> SIGKILL for the launcher and its ranks (torchrun gives its workers 30 s too)
STACKS_S = 3.0  # SIGUSR1 (a rank prints its stacks, ``entry.run_rank``) -> SIGKILL for a hung rank
POLL_S = 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


ACCELERATE_ALIASES = {"ddp": "multi_gpu", "single": "single_gpu"}


def resolve_accelerate_config(name: str) -> Path:
    """A config file path, or the name of one of TRL's shipped accelerate configs (``trl/accelerate_configs``; ``ddp``
    and ``single`` name ``multi_gpu`` and ``single_gpu``). Their ``mixed_precision`` is overridden by the train
    config's precision (``accelerate_launch_command``)."""
    from importlib import resources

    shipped = resources.files("trl.accelerate_configs")
    candidate = Path(name)
    if candidate.is_file():
        return candidate.resolve()
    packaged = shipped.joinpath(f"{ACCELERATE_ALIASES.get(name, name)}.yaml")
    if packaged.is_file():
        return Path(str(packaged))
    names = sorted([*(Path(str(p)).stem for p in shipped.iterdir() if str(p).endswith(".yaml")), *ACCELERATE_ALIASES])
    raise ConfigError(f"--accelerate_config {name!r} is neither a file nor one of TRL's shipped configs {names}; "
                      "pass a path to an `accelerate config` YAML.")


def _launch_plan(launch: dict[str, str]) -> tuple[Path | None, dict[str, Any], int]:
    """(accelerate config path or None, its YAML, number of processes) for the launch flags."""
    path, config = None, {}
    if "accelerate_config" in launch:
        path = resolve_accelerate_config(launch["accelerate_config"])
        config = yaml.safe_load(path.read_text()) or {}
    try:
        one = str(config.get("distributed_type", "")) == "NO"  # a one-process config's num_processes is moot
        n = int(launch.get("num_processes", 1 if one else config.get("num_processes", 1)))
    except ValueError:
        raise ConfigError(f"--num_processes {launch['num_processes']!r} is not an integer.") from None
    if n < 1:
        raise ConfigError(f"--num_processes {n}: need at least 1.")
    if str(config.get("distributed_type", "")) == "NO" and n > 1:
        raise ConfigError(f"{launch['accelerate_config']} has distributed_type NO (one process) but --num_processes "
                          f"{n}; use --accelerate_config multi_gpu (or zero3 / fsdp2) for several processes.")
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
    cmd += ["--num_processes", str(n)]  # explicit: TRL's single_gpu.yaml says 8 for a one-process launch
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
    timeout = float(os.environ.get(RANK_EXIT_TIMEOUT_ENV) or RANK_EXIT_TIMEOUT_S)
    return run_launcher(cmd, env, rank_exit_timeout_s=timeout)


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child PR_SET_PDEATHSIG, SIGTERM (kept across exec), or None off Linux. The libc
    function is looked up here, in the parent, so the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _running(proc: Any) -> bool:
    """Whether ``proc`` still runs (an exited process's zombie does not: a container's init may never reap it)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Wait up to ``timeout`` seconds for ``procs`` to stop running; returns those still running."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def launched_ranks(root: Any) -> dict[int, Any]:
    """{RANK: psutil.Process} of the ranks under ``root`` (the launcher): descendants whose environment has RANK and
    whose parent's has not (a rank's own children inherit it)."""
    import psutil

    with_rank: dict[int, tuple[int, Any]] = {}
    with contextlib.suppress(psutil.Error):
        for p in root.children(recursive=True):
            with contextlib.suppress(psutil.Error, ValueError):
                rank = p.environ().get("RANK")
                if rank is not None:
                    with_rank[p.pid] = (int(rank), p)
    return {rank: p for rank, p in with_rank.values() if p.ppid() not in with_rank}


class RankWatch:
    """Remembers every rank seen under the launcher; ``hung`` names the ranks still running ``timeout_s`` after the
    first rank exited. A rank is known once seen by a poll (every ``POLL_S``); one that ends before (a rank that
    fails at once) is torchrun's to handle: it stops the others when a rank fails."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.ranks: dict[int, Any] = {}
        self.first_exit: float | None = None

    def hung(self, root: Any) -> tuple[list[int], list[int]]:
        """(hung ranks, exited ranks) now."""
        for rank, p in launched_ranks(root).items():
            self.ranks.setdefault(rank, p)
        exited = sorted(r for r, p in self.ranks.items() if not _running(p))
        if exited and self.first_exit is None:
            self.first_exit = time.monotonic()
        running = sorted(r for r in self.ranks if r not in exited)
        late = self.first_exit is not None and time.monotonic() - self.first_exit >= self.timeout_s
        return (running if late else []), exited


def _stop_tree(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM ``proc`` and all its descendants (listed first: torchrun puts its ranks in sessions of their own),
    SIGKILL whatever is alive ``grace_s`` later, and reap ``proc``."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    for p in _wait_gone(procs, grace_s):
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


def _kill_hung(watch: RankWatch, hung: list[int], exited: list[int]) -> None:
    import psutil

    procs = [watch.ranks[r] for r in hung]
    logger.error("rank(s) %s (pid %s) still running %.0f s after rank(s) %s exited: hung; printing their stacks "
                 "(SIGUSR1) and killing them", hung, [p.pid for p in procs], watch.timeout_s, exited)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGUSR1)
    for p in _wait_gone(procs, STACKS_S):
        with contextlib.suppress(psutil.Error):
            p.kill()


def run_launcher(cmd: list[str], env: dict[str, str], *, rank_exit_timeout_s: float = RANK_EXIT_TIMEOUT_S,
                 poll_s: float = POLL_S) -> int:
    """Run the launcher command ``cmd`` and wait for it; its exit code (128 + N when killed by signal N).

    The launcher dies with this process (PR_SET_PDEATHSIG). A rank still running ``rank_exit_timeout_s`` after
    another exited is hung: it is sent SIGUSR1 (its stacks go to stderr), then SIGKILL, and the run fails (exit
    code 1 at least) with a message naming the rank. Interrupted (infifpo.cli turns SIGTERM / SIGINT into an
    exception), the launcher and every rank get SIGTERM and, ``STOP_GRACE_S`` later, SIGKILL; then it re-raises."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent_preexec())
    watch, hung, deadline = RankWatch(rank_exit_timeout_s), [], None
    try:
        root = psutil.Process(proc.pid)
        while True:
            try:
                rc = proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if not hung:
                hung, exited = watch.hung(root)
                if hung:
                    _kill_hung(watch, hung, exited)
                    deadline = time.monotonic() + STOP_GRACE_S
            elif deadline is not None and time.monotonic() > deadline:  # the launcher did not end with its ranks
                _stop_tree(proc)
    except BaseException:
        _stop_tree(proc)
        raise
    rc = rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's 128 + signal number
    if hung:
        print(f"infifpo train: rank(s) {hung} did not exit within {rank_exit_timeout_s:.0f} s of rank(s) "
              f"{sorted(set(watch.ranks) - set(hung))} and were killed (their stacks are above); the run failed. "
              f"Set {RANK_EXIT_TIMEOUT_ENV} to wait longer.", file=sys.stderr)
        return rc or 1
    return rc
