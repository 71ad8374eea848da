"""Sandbox escapes (docs/bad-inputs.md X1-X5), one per test: each is contained, reported as a failure with a reason,
and the next run still works; the whole-program ceiling (memory, processes, written bytes). Needs root, bubblewrap and
user namespaces (the Makefile installs bubblewrap); the ceiling tests use a cgroup where this machine allows one."""

from __future__ import annotations

import glob
import logging
import os
import socket
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infifpo.judge import sandbox
from infifpo.judge.sandbox import SANDBOX_UIDS, program_ceiling, run_sandboxed
from infifpo.schema import SandboxUnavailableError

PROJECT = Path(__file__).resolve().parents[2]


def _assert_still_works() -> None:
    res = run_sandboxed("print(6 * 7)", timeout=10)
    assert res.ok and res.stdout == "42\n", res


@pytest.fixture
def host_server() -> Iterator[socket.socket]:
    """A TCP server on the host's loopback; the sandbox must not reach it."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    yield srv
    srv.close()


def _connections(srv: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = srv.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def test_correct_program_passes_and_output_is_captured() -> None:
    res = run_sandboxed("import sys\nprint('hello')\nprint('world')\nprint('warn', file=sys.stderr)")
    assert res.ok and res.returncode == 0 and not res.timed_out
    assert res.stdout == "hello\nworld\n" and res.stderr == "warn\n" and res.reason == "ok"


def test_nonzero_exit_and_crash_are_failures_with_reason() -> None:
    res = run_sandboxed("raise ValueError('boom')")
    assert not res.ok and res.returncode == 1 and res.reason == "exit code 1: ValueError: boom"


def test_network_socket_to_host_loopback_is_blocked(host_server: socket.socket) -> None:
    port = host_server.getsockname()[1]
    res = run_sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).send(b'x')")
    assert not res.ok and ("ConnectionRefused" in res.reason or "unreachable" in res.reason), res
    assert _connections(host_server) == 0
    _assert_still_works()


def test_curl_via_os_system_is_blocked(host_server: socket.socket) -> None:
    port = host_server.getsockname()[1]
    program = f"import os, sys\nrc = os.system('curl -sS -m 3 http://127.0.0.1:{port}/')\nsys.exit(1 if rc else 0)"
    res = run_sandboxed(program)
    assert not res.ok and res.returncode == 1, res
    assert _connections(host_server) == 0
    _assert_still_works()


def test_write_outside_work_dir_is_blocked(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"  # exists on the host, /tmp inside the sandbox is a private tmpfs
    res = run_sandboxed(f"open({str(target)!r}, 'w').write('pwned')")
    assert not res.ok and "FileNotFoundError" in res.reason, res
    assert not target.exists()
    res = run_sandboxed("open('/usr/pwned', 'w').write('x')")
    assert not res.ok and ("Read-only" in res.reason or "PermissionError" in res.reason), res
    assert not Path("/usr/pwned").exists()
    _assert_still_works()


def test_project_files_and_root_home_are_invisible() -> None:
    res = run_sandboxed(f"print(open({str(PROJECT / 'pyproject.toml')!r}).read())")
    assert not res.ok and "FileNotFoundError" in res.reason and "infifpo" not in res.stdout, res
    res = run_sandboxed("import os\nprint(os.listdir('/root'))")
    assert not res.ok and "FileNotFoundError" in res.reason, res
    res = run_sandboxed("import os\nprint(sorted(os.listdir('/')))")
    assert res.ok and eval(res.stdout) == ["bin", "dev", "lib", "lib64", "proc", "sandbox", "tmp", "usr"]


def test_environment_is_scrubbed_and_uid_unprivileged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFIFPO_TEST_SECRET", "hunter2")
    res = run_sandboxed("import os\nprint(os.getuid(), os.getgid(), os.getgroups())\nprint(dict(os.environ))")
    assert res.ok, res
    ids, env = res.stdout.splitlines()
    uid, gid, groups = ids.split(" ", 2)
    assert int(uid) in SANDBOX_UIDS and int(gid) == int(uid) and groups == "[]"
    assert "hunter2" not in env and "INFIFPO_TEST_SECRET" not in env and "HF_" not in env


def test_infinite_loop_times_out() -> None:
    res = run_sandboxed("while True:\n    pass", timeout=2)
    assert res.timed_out and not res.ok and res.reason.startswith("timeout after 2 s"), res
    _assert_still_works()


def _sandbox_processes() -> list[int]:
    pids = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            text = Path(status).read_text()
        except OSError:
            continue
        uid_line = next((ln for ln in text.splitlines() if ln.startswith("Uid:")), "Uid: -1")
        if int(uid_line.split()[1]) in SANDBOX_UIDS:
            pids.append(int(status.split("/")[2]))
    return pids


def test_process_limit_is_enforced() -> None:
    program = textwrap.dedent("""
        import os, time
        made = 0
        for _ in range(100):
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                made += 1
            except OSError:
                break
        print(made)
        raise SystemExit(3 if made >= 100 else 1)
    """)
    res = run_sandboxed(program, max_procs=16)
    assert res.returncode == 1 and int(res.stdout) < 16, res


def _leftover_cgroups() -> list[Path]:
    """Per-program cgroups of this test process that still exist (they are removed after each run)."""
    layout = sandbox._cgroup_layout()
    parents = [] if layout is None else [p for p in (layout.memory, layout.pids) if p is not None]
    return [d for p in parents for d in p.glob(f"infifpo-sandbox-{os.getpid()}-*")]


def test_fork_bomb_is_contained_and_cleaned_up() -> None:
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    res = run_sandboxed(program, timeout=3, max_procs=16)
    assert not res.ok and res.timed_out, res
    if res.procs_peak is not None:  # the cgroup's pids.peak: launcher, bwrap's reaper and the bomb, together
        assert res.procs_peak <= 16, res.procs_peak
    for _ in range(100):  # the pid namespace is torn down asynchronously after bwrap dies
        if not _sandbox_processes():
            break
        time.sleep(0.1)
    assert _sandbox_processes() == []
    assert _leftover_cgroups() == []
    _assert_still_works()


def test_10_gib_allocation_fails_with_memory_error() -> None:
    res = run_sandboxed("x = bytearray(10 * 2**30)\nprint(len(x))")
    assert not res.ok and "MemoryError" in res.reason and res.stdout == "", res
    _assert_still_works()


def test_work_dirs_are_removed() -> None:
    pattern = os.path.join(tempfile.gettempdir(), "infifpo-sandbox-*")
    before = set(glob.glob(pattern))
    res = run_sandboxed("open('/sandbox/big.txt', 'w').write('x' * 1000)\nimport os\nprint(os.listdir('/sandbox'))")
    assert res.ok and "big.txt" in res.stdout
    assert set(glob.glob(pattern)) <= before


def test_missing_bwrap_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailableError, match="bwrap"):
        run_sandboxed("print('must not run')")


def test_failing_isolation_self_test_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "SETPRIV", "/usr/bin/false")  # present and executable, but isolates nothing
    with pytest.raises(SandboxUnavailableError, match="self-test failed"):
        run_sandboxed("print('must not run')")


class _Sampler(threading.Thread):
    """Samples, every 50 ms until stopped, the anonymous memory (RssAnon, MiB) of all descendants of this test
    process (the sandboxed programs) and the free space of the temp-dir file system (MiB); keeps the extremes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak_mb = 0.0
        self.start_free_mb = self.min_free_mb = self._free_mb()

    @staticmethod
    def _free_mb() -> float:
        st = os.statvfs(tempfile.gettempdir())
        return st.f_bavail * st.f_frsize / 2**20

    def _descendants_mb(self) -> float:
        parent, anon = {}, {}
        for status in glob.glob("/proc/[0-9]*/status"):
            try:
                fields = dict(ln.split(":", 1) for ln in Path(status).read_text().splitlines() if ":" in ln)
            except (OSError, ValueError):
                continue
            pid = int(status.split("/")[2])
            parent[pid] = int(fields.get("PPid", "0"))
            anon[pid] = int(fields.get("RssAnon", "0 kB").split()[0]) / 1024
        me, total = os.getpid(), 0.0
        for pid, mb in anon.items():
            p, seen = parent.get(pid, 0), 0
            while p > 1 and p != me and seen < 64:
                p, seen = parent.get(p, 0), seen + 1
            total += mb if p == me and pid != me else 0.0
        return total

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_mb = max(self.peak_mb, self._descendants_mb())
            self.min_free_mb = min(self.min_free_mb, self._free_mb())
            time.sleep(0.05)

    def __enter__(self) -> _Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(timeout=10)


# 4 children, each touching 200 MiB in 10 MiB steps and holding it for 2 s; exit 0 only if all 4 forked and did.
_FOUR_CHILDREN = textwrap.dedent("""
    import os, sys, time
    kids = []
    for _ in range(4):
        try:
            pid = os.fork()
        except OSError as e:
            print("fork failed:", e, flush=True)
            break
        if pid == 0:
            chunks = [b"\\x01" * (10 * 2**20) for _ in range(20)]
            time.sleep(2)
            os._exit(0)
        kids.append(pid)
    statuses = [os.waitpid(k, 0)[1] for k in kids]
    print(statuses, flush=True)
    sys.exit(0 if len(kids) == 4 and not any(statuses) else 1)
""")


def test_memory_ceiling_covers_the_whole_process_tree() -> None:
    """Probe case: before, memory_mb bounded each process only (4 children x 1.5 GB under 2048 MB raised host memory
    by 5.2 GB). Scaled down: 4 children x 200 MiB under a 256 MiB program ceiling."""
    if program_ceiling() == "rlimit":
        pytest.skip("no writable cgroup with the memory controller here: see the fallback test")
    with _Sampler() as sampler:
        res = run_sandboxed(_FOUR_CHILDREN, memory_mb=256, timeout=30)
    assert not res.ok and res.oom_killed and "memory ceiling of 256 MiB" in res.reason, res
    assert res.memory_peak_mb is not None and res.memory_peak_mb <= 256, res.memory_peak_mb
    # The cgroup's own peak (above) is the guarantee. Sampled host RSS counts pages shared after fork once per process
    # and lags the OOM kill: seen up to 336 MiB on a loaded machine, and 636 MiB under a load average of 5. It must
    # still stay below the 4 x 200 MiB the children ask for, which they reach without a ceiling.
    assert sampler.peak_mb < 4 * 200, sampler.peak_mb
    assert _leftover_cgroups() == []
    _assert_still_works()


def test_without_a_cgroup_the_fallback_bound_is_processes_times_memory(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No usable cgroup: RLIMIT_NPROC x RLIMIT_AS bounds the program (stated in the log), it still runs isolated."""
    monkeypatch.setattr(sandbox, "CGROUP_FS", "/nonexistent/cgroup")
    monkeypatch.delenv(sandbox.CGROUP_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="infifpo.judge.sandbox"):
        assert program_ceiling() == "rlimit"
    assert "max_procs x memory_mb" in caplog.text and "not memory_mb for the whole program" in caplog.text
    max_procs, memory_mb = 4, 256  # bwrap, its reaper, the program and one child
    with _Sampler() as sampler:
        res = run_sandboxed(_FOUR_CHILDREN, memory_mb=memory_mb, max_procs=max_procs, timeout=30)
    assert not res.ok and "fork failed" in res.stdout and res.memory_peak_mb is None, res
    assert sampler.peak_mb <= max_procs * memory_mb, sampler.peak_mb
    _assert_still_works()


@pytest.mark.parametrize("directory", ["/sandbox", "/tmp", "/dev/shm"])
def test_writing_1_gib_fails_and_reaches_no_host_disk(directory: str) -> None:
    """Probe case: the work dir had no size cap (only a per-file one). 32 files x 32 MiB into each writable place."""
    program = textwrap.dedent(f"""
        chunk = b"x" * 2**20
        for i in range(32):
            with open("{directory}/f%d" % i, "wb") as f:
                for _ in range(32):
                    f.write(chunk)
        print("wrote 1 GiB")
    """)
    with _Sampler() as sampler:
        res = run_sandboxed(program, timeout=60)
    assert not res.ok and "No space left on device" in res.reason and res.stdout == "", res
    # Other jobs share this disk: allow them a little; the program alone would have taken 1024 MiB.
    assert sampler.start_free_mb - sampler.min_free_mb < 256, (sampler.start_free_mb, sampler.min_free_mb)
    _assert_still_works()


def test_root_and_dev_are_read_only() -> None:
    for path in ("/evil", "/dev/evil", "/bin2"):
        res = run_sandboxed(f"open({path!r}, 'w').write('x')")
        assert not res.ok and "Read-only file system" in res.reason, (path, res)


def test_private_input_and_report_reach_only_the_first_process() -> None:
    """The private input is in no file and not held by bwrap's pid 1 (which any process in the sandbox may read);
    the report comes back. (Shielding the first process itself is the code judge's test process's job.)"""
    program = textwrap.dedent("""
        import glob, os, sys
        data = os.read(int(os.environ["INFIFPO_INPUT_FD"]), 100)
        if os.fork() == 0:
            os.closerange(3, 1024)  # a process that did not inherit the descriptor
            found = []
            for path in glob.glob("/proc/1/fd/*") + glob.glob("/sandbox/*") + glob.glob("/tmp/*"):
                try:
                    with open(path, "rb") as f:
                        found.append(f.read(100))
                except OSError:
                    pass
            print(any(b"s3cret" in x for x in found), flush=True)
            os._exit(0)
        os.wait()
        os.write(int(os.environ["INFIFPO_REPORT_FD"]), data.upper())
    """)
    res = run_sandboxed(program, private_input="s3cret", report=True)
    assert res.ok and res.report == "S3CRET", res
    assert res.stdout == "False\n", res


def test_find_layout_prefers_cgroup_v2_and_falls_back_to_v1(tmp_path: Path) -> None:
    """Layout detection on fake cgroup trees (the enforcement itself is tested above on this machine's cgroups)."""
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    (v2 / "job" / "cgroup.controllers").write_text("memory pids\n")
    (v2 / "job" / "cgroup.subtree_control").write_text("memory pids\n")
    layout, _ = sandbox._find_layout(v2, sandbox._own_cgroups("0::/job\n"))
    assert layout is not None and layout.version == 2 and layout.memory == layout.pids == v2 / "job"
    (v2 / "job" / "cgroup.subtree_control").write_text("pids\n")  # memory not delegated to children: unusable
    layout, why = sandbox._find_layout(v2, sandbox._own_cgroups("0::/job\n"))
    assert layout is None and "memory is not enabled" in why
    delegated = tmp_path / "delegated"  # $INFIFPO_SANDBOX_CGROUP: an administrator's cgroup v2 directory
    delegated.mkdir()
    (delegated / "cgroup.subtree_control").write_text("memory\n")
    layout, _ = sandbox._find_layout(v2, sandbox._own_cgroups("0::/job\n"), str(delegated))
    assert layout is not None and layout.version == 2 and layout.memory == delegated and layout.pids is None
    hybrid = tmp_path / "hybrid"
    for d in ("unified", "memory/a", "pids"):
        (hybrid / d).mkdir(parents=True)
    (hybrid / "unified" / "cgroup.controllers").write_text("")
    (hybrid / "unified" / "cgroup.subtree_control").write_text("")
    (hybrid / "memory" / "cgroup.procs").write_text("")
    (hybrid / "pids" / "cgroup.procs").write_text("")
    layout, _ = sandbox._find_layout(hybrid, sandbox._own_cgroups("5:pids:/\n4:memory:/a\n0::/\n"))
    assert layout is not None and layout.version == 1
    assert layout.memory == hybrid / "memory" / "a" and layout.pids == hybrid / "pids"
