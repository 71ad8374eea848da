"""Run an untrusted Python program (model-written code) in an OS-level sandbox, or refuse to run it at all.

Owns: the isolation command line, resource limits (per process and for the program's whole process tree), the
wall-clock timeout, and turning the outcome into a ``SandboxResult`` with a human-readable reason. Does not own:
building the program from a chat answer or deciding pass/fail of tests (`code`).

How (verified as root on the 2-core CI machine): ``setpriv`` drops to an unprivileged uid *before* ``bwrap``
builds its namespaces (bwrap's own ``--uid`` inside a user namespace did not enforce the process limit), ``prlimit``
sets the limits, then ``bwrap`` runs the system ``/usr/bin/python3 -I`` on ``/sandbox/prog.py``::

    [sh: wait until moved into the program's cgroup] setpriv --reuid=U --regid=U --clear-groups \\
      prlimit --nproc --as --cpu --fsize --core=0 \\
      bwrap --ro-bind /usr /usr (+ /bin /lib /lib64 symlinks) --proc /proc --dev /dev (read-only)
            --tmpfs /dev/shm, /tmp, /sandbox (each size-capped) --file FD /sandbox/NAME (the program, extra files)
            --remount-ro / --chdir /sandbox --unshare-user --disable-userns --unshare-net --unshare-pid
            --unshare-ipc --unshare-uts --unshare-cgroup-try --die-with-parent --new-session --clearenv

The program's ceiling (memory and processes of its whole process tree), strongest first; which one applies is
decided once per process and logged (``program_ceiling()`` says it):

- "cgroup v2" / "cgroup v1": a child cgroup per program, made under this process's own cgroup (never above it), or
  under the cgroup v2 directory named by $INFIFPO_SANDBOX_CGROUP (one an administrator delegated), and removed
  afterwards, with ``memory.max`` / ``memory.limit_in_bytes`` = ``memory_mb`` for all its processes
  together (swap included: ``memory.swap.max`` 0 / ``memory.memsw.limit_in_bytes``; tmpfs pages count too) and
  ``pids.max`` = ``max_procs``. The kernel OOM-kills inside the cgroup when the program crosses the ceiling; any
  such kill fails the run (``oom_killed``). The launcher is moved in before it execs, so every descendant is in.
  Needs write access to that cgroup in the memory hierarchy; under v2 ``memory`` must already be enabled in its
  ``cgroup.subtree_control``, which the kernel allows only in a cgroup without processes of its own (the root
  cgroup, or a directory an administrator made for this, hence $INFIFPO_SANDBOX_CGROUP). infifpo never changes its
  own cgroup or moves itself.
- "rlimit" (fallback, logged as a warning): RLIMIT_AS = ``memory_mb`` per process and RLIMIT_NPROC =
  ``max_procs`` for the run's own uid, so the program can hold up to ``max_procs`` x ``memory_mb`` MiB plus its
  tmpfs mounts (3 x ``work_mb``) at once. That is a bound, not a small one.

Covered: no network (a fresh network namespace with only a down loopback; the host's 127.0.0.1 is unreachable);
no view of the host file system except read-only /usr (the project, /root, /home, /etc and /work are absent);
nothing the program writes reaches the host disk: /sandbox (the work dir), /tmp and /dev/shm are tmpfs mounts of
``work_mb`` MiB each, the root and /dev are read-only, and only stdout / stderr / the report go to host files,
capped by RLIMIT_FSIZE (``max_file_mb``); an unprivileged uid with no groups; a scrubbed environment; per-process
limits on address space, CPU seconds, file size and no core dumps; the ceiling above; a wall-clock timeout that
kills the whole process group (and, through ``--die-with-parent``, the pid namespace and the cgroup, every
descendant). Each concurrent run gets its own uid from ``SANDBOX_UIDS``: RLIMIT_NPROC counts processes per real
uid, so runs sharing one uid would share one process budget and a fork bomb in one would starve the others.
The program's stdin is /dev/null (bwrap's pid-1 reaper, which it can read through /proc, holds a copy of it);
a caller's private input goes in through a file descriptor only the program's first process holds
(``private_input``), and ``report=True`` gives that process a descriptor whose text comes back as
``SandboxResult.report`` (`code` uses both so that the program under test cannot see its tests or fake a verdict).

Not covered: kernel exploits (no seccomp filter, no VM); CPU shares between concurrent runs; disk or page-cache
traffic from reading /usr; programs that need packages outside the system Python. Requires root (``setpriv``
must change uid) and unprivileged user namespaces; otherwise ``SandboxUnavailableError`` (fail closed, never a
fallback to running on the host).
"""

from __future__ import annotations

import contextlib
import itertools
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
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from infifpo.schema import SandboxUnavailableError

logger = logging.getLogger(__name__)

BWRAP = "/usr/bin/bwrap"
SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
PYTHON = "/usr/bin/python3"  # the system Python: a venv under /root would be unreadable to the sandbox uid
SH = "/bin/sh"
CGROUP_FS = "/sys/fs/cgroup"
CGROUP_ENV = "INFIFPO_SANDBOX_CGROUP"  # a delegated cgroup v2 directory to make per-program cgroups in
WORK_DIR = "/sandbox"
SANDBOX_UIDS = range(61000, 61064)  # unprivileged uids with no files on the host; one per concurrent run
MAX_OUTPUT_CHARS = 100_000
INPUT_FD_ENV = "INFIFPO_INPUT_FD"  # names, inside the sandbox, the descriptor holding ``private_input``
REPORT_FD_ENV = "INFIFPO_REPORT_FD"  # names the descriptor whose text becomes ``SandboxResult.report``
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    returncode: exit status of the program (128 + N when killed by signal N), None if it never ran.
    stdout / stderr: captured output; beyond MAX_OUTPUT_CHARS bytes only the head and the tail are kept.
    timed_out: whether the wall-clock timeout killed it.
    reason: "ok", or why it failed ("timeout after 2.0 s (wall clock)", "exit code 1: MemoryError", ...).
    report: what the program wrote to its report descriptor (``report=True``), else None.
    oom_killed: whether the cgroup ceiling killed one of its processes (a failure even if the exit status is 0).
    memory_peak_mb / procs_peak: the cgroup's peak memory (MiB) and process count, None where not measured.
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    reason: str
    report: str | None = None
    oom_killed: bool = False
    memory_peak_mb: float | None = None
    procs_peak: int | None = None

    @property
    def ok(self) -> bool:
        """Whether the program exited with status 0 within the time and memory limits."""
        return self.returncode == 0 and not self.timed_out and not self.oom_killed


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


# --- the program's cgroup ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CgroupLayout:
    """Where per-program cgroups are made: v2 (one directory holds both limits) or v1 (one per hierarchy)."""

    version: int
    memory: Path  # the parent of each program's memory cgroup (this process's own cgroup)
    pids: Path | None  # the parent in the pids hierarchy (v2: same as memory), None if pids is unavailable

    def describe(self) -> str:
        procs = "pids.max = max_procs" if self.pids else "no pids controller: RLIMIT_NPROC per run uid"
        return (f"cgroup v{self.version} under {self.memory}: memory_mb for all the program's processes together "
                f"(swap and tmpfs included), {procs}")


_cgroup_lock = threading.Lock()
_cgroup_layouts: dict[tuple[str, str], tuple[_CgroupLayout | None, str]] = {}
_cgroup_names = itertools.count()


def _own_cgroups(text: str) -> dict[str, str]:
    """controller -> this process's cgroup path, from /proc/self/cgroup ("" is the cgroup v2 entry)."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                own[controller] = parts[2]
    return own


def _v2_layout(base: Path, label: str, why: list[str]) -> _CgroupLayout | None:
    """The cgroup v2 layout rooted at ``base`` when its children may use the memory controller; else None, with
    the reason appended to ``why`` under ``label``."""
    try:
        enabled = set((base / "cgroup.subtree_control").read_text().split())
    except OSError as e:
        why.append(f"{label}: cannot read {base}/cgroup.subtree_control ({e})")
        return None
    if "memory" in enabled:
        return _CgroupLayout(2, base, base if "pids" in enabled else None)
    why.append(f"{label}: memory is not enabled in {base}/cgroup.subtree_control")
    return None


def _find_layout(root: Path, own: dict[str, str], configured: str = "") -> tuple[_CgroupLayout | None, str]:
    """The strongest usable cgroup layout (``configured`` v2 directory, then this process's own cgroup under v2,
    then under v1), or None and why not. Changes nothing."""
    why: list[str] = []
    if configured:
        layout = _v2_layout(Path(configured), f"{CGROUP_ENV}={configured}", why)
        if layout is not None:
            return layout, ""
    mount = root if (root / "cgroup.controllers").is_file() else root / "unified"
    if "" in own and (mount / "cgroup.controllers").is_file():
        layout = _v2_layout(mount / own[""].lstrip("/"), "v2", why)
        if layout is not None:
            return layout, ""
    if "memory" in own and (root / "memory" / "cgroup.procs").is_file():
        base = root / "memory" / own["memory"].lstrip("/")
        pids = root / "pids" / own.get("pids", "/").lstrip("/") if "pids" in own else None
        if pids is not None and not (pids / "cgroup.procs").is_file():
            pids = None
        return _CgroupLayout(1, base, pids), ""
    why.append("v1: no memory hierarchy")
    return None, "; ".join(why)


def _write(path: Path, value: object) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def _read_int(path: Path, key: str | None = None) -> int | None:
    """An integer cgroup file, or the ``key N`` line of a flat-keyed one; None if absent or unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if key is None:
        return int(text.split()[0]) if text.split() and text.split()[0].isdigit() else None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return None


class _ProgramCgroup:
    """One program's cgroup (one directory per hierarchy): made with its limits, joined by the launcher, read, then
    emptied and removed."""

    def __init__(self, layout: _CgroupLayout, memory_bytes: int, max_procs: int) -> None:
        self.layout = layout
        self.dirs: list[Path] = []
        self.pids_dir: Path | None = None
        name = f"infifpo-sandbox-{os.getpid()}-{next(_cgroup_names)}"
        try:
            mem = layout.memory / name
            mem.mkdir()
            self.dirs.append(mem)
            if layout.version == 2:
                _write(mem / "memory.max", memory_bytes)
                if (mem / "memory.swap.max").exists():
                    _write(mem / "memory.swap.max", 0)
                if layout.pids is not None:
                    _write(mem / "pids.max", max_procs)
                    self.pids_dir = mem
            else:
                _write(mem / "memory.limit_in_bytes", memory_bytes)
                if (mem / "memory.memsw.limit_in_bytes").exists():  # memory + swap; only with swap accounting
                    _write(mem / "memory.memsw.limit_in_bytes", memory_bytes)
                if layout.pids is not None:
                    self.pids_dir = layout.pids / name
                    self.pids_dir.mkdir()
                    self.dirs.append(self.pids_dir)
                    _write(self.pids_dir / "pids.max", max_procs)
        except OSError as e:
            self.close()
            raise SandboxUnavailableError(
                f"cannot set up the program's cgroup under {layout.memory} ({e}); refusing to run it without the "
                "memory ceiling that was detected at start-up."
            ) from e

    def add(self, pid: int) -> None:
        for d in self.dirs:
            _write(d / "cgroup.procs", pid)

    def stats(self) -> tuple[int | None, int | None, int | None]:
        """(OOM kills, peak memory bytes, peak process count), None for what this kernel does not report."""
        mem = self.dirs[0]
        if self.layout.version == 2:
            oom, peak = _read_int(mem / "memory.events", "oom_kill"), _read_int(mem / "memory.peak")
        else:
            oom, peak = _read_int(mem / "memory.oom_control", "oom_kill"), _read_int(mem / "memory.max_usage_in_bytes")
        procs = _read_int(self.pids_dir / "pids.peak") if self.pids_dir is not None else None
        return oom, peak, procs

    def _members(self) -> set[int]:
        pids: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return pids

    def close(self) -> None:
        """Kill what is left in the cgroup (normally nothing: the pid namespace is gone), then remove it."""
        deadline = time.monotonic() + 10.0
        while (members := self._members()) and time.monotonic() < deadline:
            for pid in members:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for d in reversed(self.dirs):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    last = e
                    time.sleep(0.1)
            else:
                logger.warning("sandbox: could not remove the cgroup %s (%s)", d, last)
        self.dirs = []


def _remove_stale_cgroups(layout: _CgroupLayout) -> None:
    """Remove empty per-program cgroups left by infifpo processes that died before cleaning up."""
    for parent in {p for p in (layout.memory, layout.pids) if p is not None}:
        for d in parent.glob("infifpo-sandbox-*-*"):
            try:
                os.kill(int(d.name.split("-")[2]), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    d.rmdir()
            except (OSError, ValueError):
                pass


def _cgroup_layout() -> _CgroupLayout | None:
    """The layout for per-program cgroups (found and tried once per CGROUP_FS and $INFIFPO_SANDBOX_CGROUP), or None
    (the rlimit fallback)."""
    key = (CGROUP_FS, os.environ.get(CGROUP_ENV, ""))
    with _cgroup_lock:
        if key not in _cgroup_layouts:
            try:
                own = _own_cgroups(Path("/proc/self/cgroup").read_text())
            except OSError:
                own = {}
            layout, why = _find_layout(Path(key[0]), own, key[1])
            if layout is not None:
                try:
                    _remove_stale_cgroups(layout)
                    probe = _ProgramCgroup(layout, 64 * 2**20, 8)  # can we make one, set limits, remove it?
                    probe.close()
                except SandboxUnavailableError as e:
                    layout, why = None, str(e.__cause__)
            _cgroup_layouts[key] = (layout, why)
            if layout is not None:
                logger.info("sandbox: per-program ceiling by %s", layout.describe())
            else:
                logger.warning(
                    "sandbox: no usable cgroup (%s); the per-program ceiling is RLIMIT_AS memory_mb per process x "
                    "RLIMIT_NPROC max_procs processes (per run uid), i.e. up to max_procs x memory_mb MiB plus 3 x "
                    "work_mb MiB of tmpfs, not memory_mb for the whole program", why)
        return _cgroup_layouts[key][0]


def program_ceiling() -> str:
    """Which whole-program bound applies here: "cgroup v2", "cgroup v1" or "rlimit" (see the module docstring)."""
    layout = _cgroup_layout()
    return f"cgroup v{layout.version}" if layout is not None else "rlimit"


# --- the run -------------------------------------------------------------------------------------------------------


def _command(
    uid: int, *, memory_mb: int, max_procs: int, cpu_s: int, max_file_mb: int, work_mb: int, place: list[str],
    env: Mapping[str, str],
) -> list[str]:
    """The full isolation command line running /sandbox/prog.py (see the module docstring); ``place`` are bwrap
    arguments placing files, ``env`` more variables for the program."""
    env_args = [a for name, value in {"PATH": "/usr/bin:/bin", "HOME": WORK_DIR, "LANG": "C.UTF-8", **env}.items()
                for a in ("--setenv", name, value)]
    work = str(work_mb * 2**20)
    return [
        SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        PRLIMIT, f"--nproc={max_procs}", f"--as={memory_mb * 2**20}", f"--cpu={cpu_s}",
        f"--fsize={max_file_mb * 2**20}", "--core=0",
        BWRAP, "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--size", work, "--tmpfs", "/dev/shm",
        "--remount-ro", "/dev", "--size", work, "--tmpfs", "/tmp", "--size", work, "--perms", "0700", "--tmpfs",
        WORK_DIR, *place, "--remount-ro", "/", "--chdir", WORK_DIR,
        "--unshare-user", "--disable-userns", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--die-with-parent", "--new-session",
        "--clearenv", *env_args, PYTHON, "-I", f"{WORK_DIR}/prog.py",
    ]


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


def _host_file(outdir: str, name: str, data: str | None, fds: list[int]) -> int:
    """A host-side file in ``outdir`` (root-only, invisible to the sandbox): written with ``data`` and opened for
    reading, or (``data`` None) created empty and opened for writing; its descriptor is added to ``fds``."""
    path = Path(outdir) / name
    if data is None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    else:
        path.write_bytes(data.encode("utf-8"))
        fd = os.open(path, os.O_RDONLY)
    fds.append(fd)
    return fd


def _execute(
    program: str, *, timeout: float, memory_mb: int, max_procs: int, max_file_mb: int, work_mb: int,
    files: Mapping[str, str] | None = None, private_input: str | None = None, report: bool = False,
) -> SandboxResult:
    """Run ``program`` once in the sandbox (no availability checks)."""
    for name in files or {}:
        if not _FILE_NAME_RE.fullmatch(name) or name == "prog.py":
            raise ValueError(f"sandbox file name {name!r}: use a plain file name other than prog.py")
    layout = _cgroup_layout()
    uid = _acquire_uid()
    outdir = tempfile.mkdtemp(prefix="infifpo-sandbox-out-")  # host side: the program cannot see or change it
    fds: list[int] = []
    gate: tuple[int, int] | None = None
    cgroup = None
    try:
        place: list[str] = []
        for i, (name, text) in enumerate({"prog.py": program, **(files or {})}.items()):
            fd = _host_file(outdir, f"file{i}", text, fds)
            place += ["--perms", "0644", "--file", str(fd), f"{WORK_DIR}/{name}"]
        env = {}
        if private_input is not None:
            env[INPUT_FD_ENV] = str(_host_file(outdir, "input", private_input, fds))
        if report:
            env[REPORT_FD_ENV] = str(_host_file(outdir, "report", None, fds))
        cmd = _command(uid, memory_mb=memory_mb, max_procs=max_procs, cpu_s=math.ceil(timeout) + 1,
                       max_file_mb=max_file_mb, work_mb=work_mb, place=place, env=env)
        if layout is not None:
            cgroup = _ProgramCgroup(layout, memory_mb * 2**20, max_procs)
            # The launcher waits on a pipe until we have moved it into the cgroup; everything it starts is inside.
            cmd = [SH, "-c", 'read -r _ && exec "$@" </dev/null', "sh", *cmd]
            gate = os.pipe()
        out_path, err_path = Path(outdir) / "stdout", Path(outdir) / "stderr"
        # Output goes to files, not pipes: RLIMIT_FSIZE then caps it, and a chatty program cannot fill our memory.
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL if gate is None else gate[0], stdout=out,
                                    stderr=err, env={}, start_new_session=True, cwd="/", pass_fds=fds)
            if gate is not None and cgroup is not None:
                try:
                    cgroup.add(proc.pid)
                except OSError as e:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise SandboxUnavailableError(f"cannot move the program into its cgroup ({e})") from e
                os.write(gate[1], b"go\n")
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap dies; --die-with-parent takes the pid namespace down
                proc.wait()
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
        report_text = _read_capped(Path(outdir) / "report") if report else None
        oom = peak = procs = None
        if cgroup is not None:
            oom, peak, procs = cgroup.stats()
        oom_killed = bool(oom)
        if timed_out:
            reason = f"timeout after {timeout:g} s (wall clock)"
        else:
            reason = "ok" if proc.returncode == 0 else _failure_reason(proc.returncode, stderr)
        if oom_killed:
            reason = (f"memory ceiling of {memory_mb} MiB for the whole program exceeded ({oom} process(es) killed)"
                      + ("" if reason == "ok" else f"; {reason}"))
        return SandboxResult(proc.returncode, stdout, stderr, timed_out, reason, report_text, oom_killed,
                             None if peak is None else peak / 2**20, procs)
    finally:
        for fd in fds + list(gate or ()):
            os.close(fd)
        if cgroup is not None:
            cgroup.close()
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
    """Check once per process that the sandbox tools exist and isolation works; else raise SandboxUnavailableError."""
    tools = (BWRAP, SETPRIV, PRLIMIT, PYTHON, SH)
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
            res = _execute(_SELFTEST % probe, timeout=30.0, memory_mb=1024, max_procs=16, max_file_mb=1, work_mb=1)
            info = json.loads(res.stdout) if res.ok else None
        except (OSError, ValueError) as e:
            res, info = None, None
            logger.debug("sandbox self-test raised", exc_info=e)
        isolated = (
            info is not None and info["uid"] in SANDBOX_UIDS and info["pid"] < 10 and info["net"] == "blocked"
            and set(info["ifaces"]) <= {"lo"} and not info["host_visible"]
        )
        if not isolated:
            detail = "could not start" if res is None else f"{res.reason}; stderr: {res.stderr.strip()[-300:]!r}"
            raise SandboxUnavailableError(
                f"the sandbox self-test failed ({detail}; probe said {info}). It needs root, "
                "unprivileged user namespaces and bubblewrap; infifpo refuses to run model-written code unisolated."
            )
        _selftest_passed.add(tools)


def run_sandboxed(
    program: str, *, timeout: float = 10.0, memory_mb: int = 2048, max_procs: int = 64, max_file_mb: int = 64,
    work_mb: int = 64, files: Mapping[str, str] | None = None, private_input: str | None = None, report: bool = False,
) -> SandboxResult:
    """Run the Python source ``program`` (as /sandbox/prog.py) in the sandbox and report how it ended.

    timeout: wall-clock seconds before the whole process tree is killed (the CPU-time limit is ceil(timeout) + 1 s).
    memory_mb: memory ceiling of the whole program (cgroup; see ``program_ceiling()``) and address-space limit of
    each process, MiB. max_procs: process ceiling of the program. max_file_mb: largest file it may write, MiB
    (also caps its stdout, stderr and report). work_mb: size of each of its writable tmpfs mounts (/sandbox,
    /tmp, /dev/shm), MiB. files: more files to place in /sandbox (name -> text). private_input: text readable only
    through the descriptor named by $INFIFPO_INPUT_FD (not in any file, not in bwrap's pid 1). report: give the
    program a descriptor ($INFIFPO_REPORT_FD) whose text comes back as ``SandboxResult.report``.
    Raises SandboxUnavailableError if isolation is unavailable (never runs unsandboxed). A crash, a limit or the
    timeout is a failed ``SandboxResult``, never an exception.
    """
    ensure_sandbox()
    return _execute(program, timeout=timeout, memory_mb=memory_mb, max_procs=max_procs, max_file_mb=max_file_mb,
                    work_mb=work_mb, files=files, private_input=private_input, report=report)
