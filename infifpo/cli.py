"""`infifpo <command> [args]`: dispatches to one stage module, importing only that module.

So `infifpo score` never imports TRL and `infifpo train` never imports vLLM. Each target exposes
``main(argv: list[str]) -> int | None``.

Stopping (SIGTERM from a scheduler's preemption or `timeout`, SIGINT from Ctrl-C, SIGHUP): the first signal sends
SIGTERM to every descendant of the stage (a spawned per-model process, vLLM's engine core and workers, shard workers,
the accelerate launcher and its ranks) and raises ``Stopped`` (a KeyboardInterrupt) in the main thread, so every
``finally`` runs (engines close, shards stay resumable). When the stage has unwound, a descendant still alive after
``STOP_GRACE_S`` is SIGKILLed. The exit code is 128 + the signal number; unfinished outputs get no ``_SUCCESS`` and
the same command resumes them. A repeat of the signal within ``REPEAT_S`` (Ctrl-C reaches the whole process group
and the parent stage forwards it too) counts as the same stop; a later one kills the whole tree at once. A process
started by an infifpo stage (``STAGE_PID_ENV`` names its parent) or by its accelerate launch also dies with its
parent (PR_SET_PDEATHSIG), so even a SIGKILLed stage leaves no worker behind. On any exit, descendants still alive are
stopped the same way (helpers that end with this process, ``HELPER_MARKERS``, are left alone).

Errors: a named infifpo error (``InfiFPOError`` and its subclasses: a user mistake, a bad input, a missing model) and
a missing input file end the stage with ONE line on stderr, ``infifpo <stage>: <ErrorName>: <message>``, and exit
code 2. ``infifpo --debug <stage> ...`` (or ``INFIFPO_DEBUG=1``, which the stage's own child processes inherit)
prints the traceback first.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

from infifpo.schema import InfiFPOError

logger = logging.getLogger(__name__)

# command -> (module, help): dispatch from one dict literal, in one place.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("infifpo.models.resolve", "list / fetch the packaged model pool"),
    "prompts": ("data_prep.prompts", "build a prompt dataset from named sources"),
    "sample": ("infifpo.sample", "sample responses from every model in the pool"),
    "judge": ("infifpo.judge.stage", "label samples: verifiers and reward models"),
    "pair": ("infifpo.pair", "build preference rows by a recipe"),
    "score": ("infifpo.score.stage", "score every response under the pivot and each source"),
    "selector": ("infifpo.trainers.selector", "train the ASN selector of learned fusion on a slice of scored pairs"),
    "train": ("infifpo.trainers.entry", "train: sft | dpo | infifpo | wrpo | opd"),
    "merge": ("infifpo.merge.stage", "merge checkpoints of one base: rsaf | ties | task_arithmetic | dare_ties | sce"),
    "eval": ("infifpo.evaluate", "evaluate a model: GSM8K, arithmetic, HumanEval (+ lm-eval tasks)"),
    "report": ("infifpo.report.stage", "the paper-style table, cost accounting and plots of a pipeline run"),
    "runs": ("infifpo.runs", "list the stage outputs under a directory: stage, state, rows, what made them"),
    "plan": ("infifpo.plan", "memory and time estimates per stage for a pipeline config"),
    "pipeline": ("infifpo.pipeline", "run every stage in order (what `make fpo` runs)"),
    "env": ("infifpo.env", "print versions of the stack, for bug reports"),
}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 10.0  # how long descendants get between SIGTERM and SIGKILL once the stage has unwound
REPEAT_S = 2.0  # a stop signal this soon after the first is the same stop
STAGE_PID_ENV = "INFIFPO_STAGE_PID"  # pid of the infifpo stage process; inherited by everything it starts
LAUNCHED_ENV = "INFIFPO_ACCELERATE_LAUNCHED"  # trainers.launch sets it for the ranks of `infifpo train`
# Helpers that end when this process does (their pipe from it closes), matched on the command line: the stdlib's
# multiprocessing resource tracker and forkserver, and the judge's pool of math-verify workers (judge/math.py).
HELPER_MARKERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "-m infifpo.judge.math")
DEBUG_ENV = "INFIFPO_DEBUG"  # "1": a named error's traceback is printed too (``--debug`` sets it)
USER_ERROR_EXIT = 2  # a named error or a missing input: the command line or its inputs need fixing
# Raised by the OS for a path the user gave that is not there (or not what the stage expects).
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class InputPathError(InfiFPOError, FileNotFoundError):
    """An input path does not exist (or is a file where a directory is expected, or the reverse)."""


class Stopped(KeyboardInterrupt):
    """The process got ``signum`` (SIGTERM, SIGINT or SIGHUP); raised in the main thread to unwind the stage."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def descendants(spare: frozenset = frozenset()) -> list[Any]:
    """This process's descendants that are running (psutil.Process), parents before children; zombies, helper
    processes (``HELPER_MARKERS``) and the processes in ``spare`` left out."""
    import psutil

    procs = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            helper = any(m in " ".join(p.cmdline()) for m in HELPER_MARKERS)
            if p not in spare and not helper and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
    return procs


def describe(procs: list[Any]) -> str:
    """'pid (command line)' for each process, for messages."""
    import psutil

    names = []
    for p in procs:
        try:
            names.append(f"{p.pid} ({' '.join(p.cmdline())[:120] or p.name()})")
        except psutil.Error:
            names.append(f"{p.pid} (exited)")
    return ", ".join(names)


def signal_descendants(signum: int, spare: frozenset = frozenset()) -> list[Any]:
    """Send ``signum`` to every running descendant not in ``spare``, all listed first (a grandchild whose parent
    exits on the signal would be lost otherwise); returns them."""
    import psutil

    procs = descendants(spare)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signum)
    return procs


def stop_descendants(grace_s: float = STOP_GRACE_S, *, why: str = "", spare: frozenset = frozenset()) -> list[Any]:
    """SIGTERM every running descendant not in ``spare``, SIGKILL those alive ``grace_s`` later, reap the ones that
    are this process's children. Returns the processes that needed SIGKILL."""
    import psutil

    from infifpo.backends.vllm_engine import wait_gone

    procs = signal_descendants(signal.SIGTERM, spare)
    if not procs:
        return []
    logger.warning("%s: stopping %d process(es) still running: %s", why or "infifpo", len(procs), describe(procs))
    alive = wait_gone(procs, grace_s)
    if alive:
        logger.warning("%s: SIGKILL after %.0f s: %s", why or "infifpo", grace_s, describe(alive))
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    wait_gone(alive, 5)
    return alive


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = STOP_SIGNALS, *, spare: frozenset = frozenset()) -> Iterator[None]:
    """Within: the first of ``signums`` sends SIGTERM to every descendant not in ``spare`` (those that were running
    before) and raises ``Stopped`` in the main thread; a repeat within ``REPEAT_S`` is ignored, a later one SIGKILLs
    the tree and exits at once. Signals set to be ignored (nohup's SIGHUP, a background job's SIGINT) stay ignored;
    the previous handlers come back on exit. A no-op off the main thread (Python handles signals there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first: list[float] = []

    def on_signal(signum: int, frame: object) -> None:
        if first:
            if time.monotonic() - first[0] < REPEAT_S:
                return
            signal_descendants(signal.SIGKILL, spare)
            os._exit(128 + signum)
        first.append(time.monotonic())
        signal_descendants(signal.SIGTERM, spare)
        raise Stopped(signum)

    previous = {s: signal.getsignal(s) for s in signums}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _usage() -> str:
    lines = ["usage: infifpo [--debug] <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", f"--debug (or {DEBUG_ENV}=1): print the traceback of an error, not only its one-line message"]
    return "\n".join(lines)


def debug_enabled() -> bool:
    """Whether ``--debug`` / ``INFIFPO_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(name: str, error: BaseException) -> str:
    """``infifpo <name>: <ErrorName>: <message>`` on one line (the message's whitespace and newlines collapsed). A
    missing path becomes an ``InputPathError`` naming it."""
    if isinstance(error, PATH_ERRORS) and not isinstance(error, InfiFPOError):
        what = {FileNotFoundError: "does not exist", NotADirectoryError: "is not a directory",
                IsADirectoryError: "is a directory, not a file"}[type(error)]
        path = error.filename if error.filename is not None else str(error)
        error = InputPathError(f"{path} {what} (a relative path is read from {os.getcwd()}); check the path.")
    return f"infifpo {name}: {type(error).__name__}: {' '.join(str(error).split())}"


def report_error(name: str, error: BaseException) -> int:
    """Print ``error`` as one line on stderr (after its traceback with ``--debug``); returns the exit code, 2."""
    if debug_enabled():
        traceback.print_exception(error)
    print(error_line(name, error), file=sys.stderr)
    return USER_ERROR_EXIT


def run_stage(name: str, rest: list[str]) -> int:
    """Run command ``name`` under ``stop_on_signals``; when it returns, no process it started is left (processes
    that were running before, as when a test calls ``main``, are spared)."""
    started, spare = time.monotonic(), frozenset(descendants())
    parent_stage = os.environ.get(STAGE_PID_ENV)
    if parent_stage == str(os.getppid()) or (os.environ.get(LAUNCHED_ENV) and os.environ.get("LOCAL_RANK")):
        from infifpo.backends.vllm_engine import die_with_parent

        die_with_parent()  # a shard worker, a pipeline stage, a training rank: it ends with what started it
    os.environ[STAGE_PID_ENV] = str(os.getpid())
    try:
        with stop_on_signals(spare=spare):
            try:
                module = importlib.import_module(COMMANDS[name][0])
                return int(module.main(rest) or 0)
            except (InfiFPOError, *PATH_ERRORS) as e:
                return report_error(name, e)
            except BrokenPipeError:  # stdout's reader went away (`infifpo runs --json | head`): stop quietly
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 1
            except Stopped as e:
                print(f"infifpo {name}: {e} after {time.monotonic() - started:.0f} s. Finished work is kept and "
                      "unfinished outputs have no _SUCCESS: run the same command again to resume.", file=sys.stderr)
                return 128 + e.signum
            finally:
                stop_descendants(why=f"infifpo {name}", spare=spare)
    finally:
        if parent_stage is None:
            os.environ.pop(STAGE_PID_ENV, None)
        else:
            os.environ[STAGE_PID_ENV] = parent_stage


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    while argv and argv[0] == "--debug":  # global flag, before the command; the stage's children inherit it
        os.environ[DEBUG_ENV] = "1"
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from infifpo import __version__

        print(f"infifpo {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from infifpo.config import suggest
        print(f"infifpo: unknown command {name!r}.{suggest(name, COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_stage(name, rest)


if __name__ == "__main__":
    sys.exit(main())
