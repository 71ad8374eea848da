"""Run an untrusted Python program (model-written code) in an OS-level sandbox, or refuse to run it at all.

Owns: the isolation command line, resource limits, the wall-clock timeout, and turning the outcome into a
``SandboxResult`` with a human-readable reason. Does not own: building the program from a chat answer or deciding
pass/fail of tests (`code`).

How (stack-notes.md, "Sandboxing model-written code"): ``setpriv`` drops to an unprivileged uid *before* ``bwrap``
builds its namespaces (bwrap's own ``--uid`` inside a user namespace did not enforce the process limit), ``prlimit``
sets the limits, then ``bwrap`` runs the system ``/usr/bin/python3 -I`` on ``/sandbox/prog.py``::

    setpriv --reuid=U --regid=U --clear-groups prlimit --nproc --as --cpu --fsize --core=0 \\
      bwrap --ro-bind /usr /usr (+ /bin /lib /lib64 symlinks) --proc /proc --dev /dev --tmpfs /tmp (size-capped)
            --bind WORKDIR /sandbox --chdir /sandbox --unshare-user --disable-userns --unshare-net --unshare-pid
            --unshare-ipc --unshare-uts --unshare-cgroup-try --die-with-parent --new-session --clearenv

Covered: no network (a fresh network namespace with only a down loopback; the host's 127.0.0.1 is unreachable);
no view of the host file system except read-only /usr (the project, /root, /home, /etc and /work are absent);
writes only to a fresh per-run work dir (bound at /sandbox, deleted afterwards) and a size-capped /tmp tmpfs;
an unprivileged uid with no groups; a scrubbed environment; per-run limits on processes (``max_procs``), address
space (``memory_mb``), CPU seconds, file size (``max_file_mb``) and no core dumps; a wall-clock timeout that kills the
whole process group (and, through ``--die-with-parent`` and the pid namespace, every descendant).
Each concurrent run gets its own uid from ``SANDBOX_UIDS``: RLIMIT_NPROC counts processes per real uid, so runs
sharing one uid (e.g. 65534) would share one process budget and a fork bomb in one would starve the others.

Not covered: kernel exploits (no seccomp filter, no VM); total disk use of the work dir beyond the per-file cap; a
memory ceiling across processes (RLIMIT_AS is per process, so up to ``max_procs`` x ``memory_mb`` in theory); CPU
shares between concurrent runs; programs that need packages outside the system Python. Requires root (``setpriv``
must change uid) and unprivileged user namespaces; otherwise ``SandboxUnavailableError`` (fail closed, never a
fallback to running on the host).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from infifpo.schema import SandboxUnavailableError

logger = logging.getLogger(__name__)

BWRAP = "/usr/bin/bwrap"
SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
PYTHON = "/usr/bin/python3"  # the system Python: a venv under /root would be unreadable to the sandbox uid
SANDBOX_UIDS = range(61000, 61064)  # unprivileged uids with no files on the host; one per concurrent run
MAX_OUTPUT_CHARS = 100_000


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    returncode: exit status of the program (128 + N when killed by signal N), None if it never ran.
    stdout / stderr: captured output; beyond MAX_OUTPUT_CHARS bytes only the head and the tail are kept.
    timed_out: whether the wall-clock timeout killed it.
    reason: "ok", or why it failed ("timeout after 2.0 s (wall clock)", "exit code 1: MemoryError", ...).
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    reason: str

    @property
    def ok(self) -> bool:
        """Whether the program exited with status 0 within the time limit."""
        return self.returncode == 0 and not self.timed_out


_uid_lock = threading.Lock()
_free_uids: list[int] = list(SANDBOX_UIDS)
_selftest_lock = threading.Lock()
_selftest_passed: set[tuple[str, ...]] = set()


def _acquire_uid() -> int:
    with _uid_lock:
        if not _free_uids:
            raise SandboxUnavailableError(
                f"more than {len(SANDBOX_UIDS)} sandboxed programs at once; lower the number of judge workers."
            )
        return _free_uids.pop(0)  # least recently used first: a just-killed run's uid gets time to drain


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _free_uids.append(uid)


def _command(uid: int, workdir: str, *, memory_mb: int, max_procs: int, cpu_s: int, max_file_mb: int) -> list[str]:
    """The full isolation command line running /sandbox/prog.py (see the module docstring)."""
    limit_bytes = str(max_file_mb * 2**20)
    return [
        SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        PRLIMIT, f"--nproc={max_procs}", f"--as={memory_mb * 2**20}", f"--cpu={cpu_s}", f"--fsize={limit_bytes}",
        "--core=0",
        BWRAP, "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--size", limit_bytes, "--tmpfs", "/tmp",
        "--bind", workdir, "/sandbox", "--chdir", "/sandbox",
        "--unshare-user", "--disable-userns", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--die-with-parent", "--new-session",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/sandbox", "--setenv", "LANG", "C.UTF-8",
        PYTHON, "-I", "/sandbox/prog.py",
    ]  # fmt: skip


def _failure_reason(returncode: int, stderr: str) -> str:
    """A short explanation of a non-zero exit: the signal (limits) or the last line of the traceback."""
    if returncode > 128 and returncode - 128 in signal.valid_signals():
        sig = signal.Signals(returncode - 128)
        hint = {
            signal.SIGKILL: " (killed: memory, CPU or process limit)",
            signal.SIGXCPU: " (CPU-time limit exceeded)",
            signal.SIGXFSZ: " (file-size limit exceeded)",
            signal.SIGSEGV: " (crashed; often the memory limit)",
        }.get(sig, "")
        return f"killed by {sig.name}{hint}"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    # The exception line, not a traceback frame (forked processes interleave their tracebacks).
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", ln)]
    last = (errors or lines or [""])[-1]
    return f"exit code {returncode}" + (f": {last[:300]}" if last else "")


def _read_capped(path: Path) -> str:
    """The file's text; if longer than MAX_OUTPUT_CHARS, its head and tail (the end holds the verdict lines)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= MAX_OUTPUT_CHARS:
            return f.read().decode("utf-8", errors="replace")
        head = f.read(MAX_OUTPUT_CHARS // 2)
        f.seek(size - MAX_OUTPUT_CHARS // 2)
        tail = f.read()
    return (head + b"\n...[truncated]...\n" + tail).decode("utf-8", errors="replace")


def _execute(program: str, *, timeout: float, memory_mb: int, max_procs: int, max_file_mb: int) -> SandboxResult:
    """Run ``program`` once in the sandbox (no availability checks)."""
    uid = _acquire_uid()
    workdir = tempfile.mkdtemp(prefix="infifpo-sandbox-")
    outdir = tempfile.mkdtemp(prefix="infifpo-sandbox-out-")  # host side: the program cannot see or change it
    try:
        os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        prog = Path(workdir) / "prog.py"
        prog.write_text(program, encoding="utf-8")
        os.chown(prog, uid, uid)
        cmd = _command(uid, workdir, memory_mb=memory_mb, max_procs=max_procs, cpu_s=math.ceil(timeout) + 1,
                       max_file_mb=max_file_mb)
        out_path, err_path = Path(outdir) / "stdout", Path(outdir) / "stderr"
        # Output goes to files, not pipes: RLIMIT_FSIZE then caps it, and a chatty program cannot fill our memory.
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env={},
                                    start_new_session=True, cwd=workdir)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap dies; --die-with-parent takes the pid namespace down
                proc.wait()
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
        if timed_out:
            reason = f"timeout after {timeout:g} s (wall clock)"
        else:
            reason = "ok" if proc.returncode == 0 else _failure_reason(proc.returncode, stderr)
        return SandboxResult(proc.returncode, stdout, stderr, timed_out, reason)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outdir, ignore_errors=True)
        _release_uid(uid)


_SELFTEST = """
import json, os, socket
try:
    socket.create_connection(("127.0.0.1", 22), timeout=2).close(); net = "open"
except OSError:
    net = "blocked"
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(), "net": net,
                  "ifaces": [n for _, n in socket.if_nameindex()], "host_visible": os.path.exists(%r)}))
"""


def ensure_sandbox() -> None:
    """Check once per process that the sandbox tools exist and isolation works; raise SandboxUnavailableError if not."""
    tools = (BWRAP, SETPRIV, PRLIMIT, PYTHON)
    if tools in _selftest_passed:
        return
    missing = [t for t in tools if not (os.path.isfile(t) and os.access(t, os.X_OK))]
    if missing:
        raise SandboxUnavailableError(
            f"sandbox tools missing: {missing}. Install them (Debian/Ubuntu: `apt-get install bubblewrap util-linux "
            "python3`); infifpo refuses to run model-written code without isolation."
        )
    with _selftest_lock:
        if tools in _selftest_passed:
            return
        probe = str(Path(__file__).resolve())  # a host file the sandbox must not see
        try:
            res = _execute(_SELFTEST % probe, timeout=30.0, memory_mb=1024, max_procs=16, max_file_mb=1)
            info = json.loads(res.stdout) if res.ok else None
        except (OSError, ValueError) as e:
            res, info = None, None
            logger.debug("sandbox self-test raised", exc_info=e)
        isolated = (
            info is not None and info["uid"] in SANDBOX_UIDS and info["pid"] < 10 and info["net"] == "blocked"
            and set(info["ifaces"]) <= {"lo"} and not info["host_visible"]
        )  # fmt: skip
        if not isolated:
            detail = "could not start" if res is None else f"{res.reason}; stderr: {res.stderr.strip()[-300:]!r}"
            raise SandboxUnavailableError(
                f"the sandbox self-test failed ({detail}; probe said {info}). It needs root, "
                "unprivileged user namespaces and bubblewrap; infifpo refuses to run model-written code unisolated."
            )
        _selftest_passed.add(tools)


def run_sandboxed(
    program: str, *, timeout: float = 10.0, memory_mb: int = 2048, max_procs: int = 64, max_file_mb: int = 64
) -> SandboxResult:
    """Run the Python source ``program`` in the sandbox and report how it ended.

    timeout: wall-clock seconds before the whole process tree is killed (the CPU-time limit is ceil(timeout) + 1 s).
    memory_mb: address-space limit per process, MiB. max_procs: process limit for the run. max_file_mb: largest file
    (and /tmp size) it may write, MiB. Raises SandboxUnavailableError if isolation is unavailable (never runs
    unsandboxed). A crash, a limit or the timeout is a failed ``SandboxResult``, never an exception.
    """
    ensure_sandbox()
    return _execute(program, timeout=timeout, memory_mb=memory_mb, max_procs=max_procs, max_file_mb=max_file_mb)
