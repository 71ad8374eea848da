"""Sandbox escapes (users.md X1-X5), one per test: each is contained, reported as a failure with a reason, and the
next run still works. Needs root, bubblewrap and user namespaces (the Makefile installs bubblewrap)."""

from __future__ import annotations

import glob
import os
import socket
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infifpo.judge import sandbox
from infifpo.judge.sandbox import SANDBOX_UIDS, run_sandboxed
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


def test_fork_bomb_is_contained_and_cleaned_up() -> None:
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    res = run_sandboxed(program, timeout=3)
    assert not res.ok and res.timed_out, res
    for _ in range(100):  # the pid namespace is torn down asynchronously after bwrap dies
        if not _sandbox_processes():
            break
        time.sleep(0.1)
    assert _sandbox_processes() == []
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
