"""One writer per (output, shard): a second run on the same shard of the same output fails at once, naming who holds
it, and changes nothing; other shards lock independently; a SIGKILLed holder's lock is gone with its process.

Real second processes throughout (flock excludes processes, not threads), each with a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infifpo.store import OutputLockedError, StageOutput, StoreError, read_output

TIMEOUT = 120  # seconds for any child process: a hang fails the test instead of wedging the run


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _child(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process (StageOutput imported) and wait for it."""
    code = "from infifpo.store import StageOutput\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)


def _partial(root: Path, shard: int = 0, num_shards: int = 1) -> StageOutput:
    """A started, unfinished output with one row in shard ``shard``."""
    out = StageOutput(root, "samples-m", {"k": 1})
    with out.open_shard(shard, num_shards) as w:
        w.write([{"id": f"row-{shard}"}])
    return out


@pytest.fixture
def held(tmp_path):
    """An unfinished output whose shard 0/1 this test process holds (released at the end)."""
    out = _partial(tmp_path).lock()
    yield out
    out.release()


def test_a_second_process_on_the_same_shard_fails_at_once_naming_the_holder_and_changes_nothing(held, tmp_path):
    before = _snapshot(tmp_path)
    start = time.monotonic()
    r = _child(f"""
        out = StageOutput({str(tmp_path)!r}, "samples-m", {{"k": 1}}).lock()  # what every stage does first
        print(sorted(out.done_ids()))
        with out.open_shard() as w:
            w.write([{{"id": "written-twice"}}])
        out.finalize()
    """)
    assert time.monotonic() - start < TIMEOUT / 2, "it must fail at once, not wait"
    assert r.returncode != 0 and r.stdout == "", r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("infifpo.store.OutputLockedError: "), r.stderr
    assert str(held.path) in last and "shard 0/1" in last
    assert f"pid {os.getpid()} on host " in last and "since " in last, "who holds it, where and since when"
    assert "Wait for that run to finish, or stop it" in last and "changing anything" in last
    assert _snapshot(tmp_path) == before, "the locked-out run changed files"

    held.release()  # the holder is done: the next run goes through
    r = _child(f"""
        out = StageOutput({str(tmp_path)!r}, "samples-m", {{"k": 1}}).lock()
        with out.open_shard() as w:
            w.write([{{"id": "b"}}])
        out.finalize()
    """)
    assert r.returncode == 0, r.stderr
    assert [row["id"] for row in read_output(held.path)] == ["b", "row-0"]


def test_different_shards_of_one_output_lock_independently(tmp_path):
    out = _partial(tmp_path, 0, 2).lock(0, 2)
    try:
        r = _child(f"""
            out = StageOutput({str(tmp_path)!r}, "samples-m", {{"k": 1}}).lock(1, 2)
            with out.open_shard(1, 2) as w:
                w.write([{{"id": "row-1"}}])
        """)
        assert r.returncode == 0, r.stderr
        r = _child(f"""StageOutput({str(tmp_path)!r}, "samples-m", {{"k": 1}}).lock(0, 2)""")
        assert r.returncode != 0 and "OutputLockedError" in r.stderr and "shard 0/2" in r.stderr
        assert out.done_ids() == {"row-0", "row-1"}
        assert out.finalize() == out.path
    finally:
        out.release()
    assert (out.path / ".lock-part-00000-of-00002").read_text() == "", "a released lock records no holder"


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path):
    out = _partial(tmp_path)
    out.release()  # _partial's open_shard took the lock in this process; the child takes it now
    code = textwrap.dedent(f"""
        import time
        from infifpo.store import StageOutput
        StageOutput({str(tmp_path)!r}, "samples-m", {{"k": 1}}).lock()
        time.sleep({TIMEOUT})
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        lock_file = out.path / ".lock-part-00000-of-00001"
        deadline = time.monotonic() + TIMEOUT
        while f'"pid": {child.pid},' not in (lock_file.read_text() if lock_file.exists() else ""):
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the child never took the lock"
            time.sleep(0.02)
        with pytest.raises(OutputLockedError, match=f"pid {child.pid} on host"):
            StageOutput(tmp_path, "samples-m", {"k": 1}).lock()
        with pytest.raises(StoreError, match=f"being written now by pid {child.pid}.*Wait for that run to finish"):
            read_output(out.path)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=TIMEOUT)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    again = StageOutput(tmp_path, "samples-m", {"k": 1})
    try:
        assert again.lock() is again and again.lock() is again  # taken at once; idempotent in one process
        assert f'"pid": {os.getpid()},' in lock_file.read_text()
        assert again.done_ids() == {"row-0"}
    finally:
        again.release()
    with pytest.raises(StoreError, match="incomplete.*stopped before it finished.*re-run `infifpo sample` with the"):
        read_output(out.path)  # nobody writes it now: the message says how to resume, not to wait


def test_a_finished_output_needs_no_lock_and_gets_no_lock_file(tmp_path):
    out = StageOutput(tmp_path, "prompts", {"k": 1})
    out.write_all([{"id": "a"}])
    before = _snapshot(tmp_path)
    r = _child(f"""StageOutput({str(tmp_path)!r}, "prompts", {{"k": 1}}).lock()""")
    assert r.returncode == 0, r.stderr
    assert out.lock() is out and _snapshot(tmp_path) == before


def test_the_prompts_stage_refuses_an_output_another_process_writes(tmp_path):
    """Through a real stage command: the lock is this test's; `infifpo prompts` on the same --out exits non-zero with
    the named error as its last stderr line and leaves every file as it was; once released, the same command runs."""
    from data_prep.prompts import prompts_key

    sources = ["arithmetic:train:8"]
    out = StageOutput(tmp_path, "prompts", prompts_key(sources, 0)).lock()
    cmd = [sys.executable, "-m", "infifpo.cli", "prompts", "--source", sources[0], "--out", str(tmp_path)]
    try:
        before = _snapshot(tmp_path)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("infifpo prompts: OutputLockedError: ") and str(out.path) in last, r.stderr
        assert f"pid {os.getpid()}" in last and "Wait for that run to finish" in last
        assert _snapshot(tmp_path) == before
    finally:
        out.release()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(out.path) and len(read_output(out.path)) == 8
