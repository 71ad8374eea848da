"""Content-addressed, resumable stage outputs on disk.

Owns: where a stage writes (``<root>/<name>-<fingerprint>/``), how rows are appended crash-safely to JSONL shards,
which row ids are already done (so a re-run skips them), and the completion marker with per-shard checksums.
Does not own: what the rows contain (`schema`) or how they are computed (the stages).

Layout of one output directory::

    meta.json                 {"name", "fingerprint", "key": <everything that determines the content>}
    part-00000-of-00001.jsonl one JSON row per line, appended and flushed batch by batch (one file per shard)
    _SUCCESS                  written last: {"num_rows", "files": {name: sha256}}
    .lock-part-00000-of-00001 the advisory lock of one shard's writer: {"pid", "host", "since"} while it is held

A killed writer leaves at most a truncated last line, which is dropped on resume. Rows are keyed by a stable
``id``; readers sort by id, so shard count and merge order never change what a stage hands on.

One writer per (output, shard): ``StageOutput.lock`` takes an exclusive ``flock`` on the shard's lock file before
a stage reads what is done, and holds it until the output is finalized or the process exits (the kernel releases it
when the process dies, even by SIGKILL, so a killed run never leaves a stale lock). A second run on the same shard
(a requeued job while the old one lives, a double launch) fails at once with OutputLockedError and changes nothing;
different shards lock different files, so the local shard workers of `infifpo.shards` run side by side. Every state
the store can detect as wedged raises a StoreError whose message names the directory and the fix.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from infifpo.schema import DataFormatError, InfiFPOError

SUCCESS = "_SUCCESS"
LOCK_PREFIX = ".lock-"
# The command that writes an output, by the start of its directory name (for "re-run ..." messages).
_COMMANDS = {"prompts": "`infifpo prompts` (or the `infifpo eval` that wrote it)", "samples-eval": "`infifpo eval`",
             "samples": "`infifpo sample`", "judged": "`infifpo judge`", "pairs": "`infifpo pair`",
             "scored": "`infifpo score`", "score": "`infifpo score`", "eval": "`infifpo eval`",
             "selector": "`infifpo selector`"}
_HELD: dict[str, int] = {}  # lock file (real path) -> the open descriptor holding its flock, for this process


class StoreError(InfiFPOError, RuntimeError):
    """A stage output on disk is corrupted, incomplete or was written for different inputs."""


class OutputLockedError(StoreError):
    """Another live process is writing the same shard of the same stage output."""


class CorruptOutputError(StoreError, DataFormatError):
    """A stage output's shard file holds a line no writer of this store leaves (edited or damaged on disk)."""


def cache_root() -> Path:
    """infifpo's cache directory (materialised models, machine measurements): ``$INFIFPO_CACHE`` or
    ``~/.cache/infifpo``."""
    return Path(os.environ.get("INFIFPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "infifpo"))


def safe_name(text: str, length: int = 60) -> str:
    """``text`` as a directory-name part: every run of characters outside ``A-Za-z0-9._-`` becomes "_", cut to
    ``length`` characters (model paths, hub ids and run labels in output and checkpoint directory names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:length]


def fingerprint(key: Any, length: int = 12) -> str:
    """A short, stable hex digest of a JSON-serialisable key (dict order does not matter)."""
    blob = json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 of a file's bytes, or of a directory's files (relative paths and bytes; hidden entries left out);
    None when ``path`` is neither."""
    path = Path(path).expanduser()
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    files = sorted(f for f in path.rglob("*")
                   if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
    return hashlib.sha256(json.dumps([[str(f.relative_to(path)), file_sha256(f)] for f in files]).encode()).hexdigest()


def shard_name(shard: int = 0, num_shards: int = 1) -> str:
    """The file name of shard ``shard`` (0-based) of ``num_shards``."""
    return f"part-{shard:05d}-of-{num_shards:05d}.jsonl"


def parse_shard(spec: str | None) -> tuple[int, int]:
    """Parse a ``--shard I/N`` value (I 0-based) into (I, N); None means (0, 1)."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise StoreError(f"--shard {spec!r}: expected I/N with integers, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise StoreError(f"--shard {spec!r}: need 0 <= I < N")
    return i, n


def in_shard(row_id: str, shard: int, num_shards: int) -> bool:
    """Deterministic assignment of a row id to one of ``num_shards`` shards (by hash, not by position)."""
    if num_shards == 1:
        return True
    return int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) % num_shards == shard


class StageOutput:
    """One stage's output directory, keyed by the content that determines it.

    ``StageOutput(root, "samples-smollm2", key)`` maps to ``root/samples-smollm2-<fingerprint(key)>``. A different
    key is a different directory, so changing one model or parameter recomputes only what depends on it.
    """

    def __init__(self, root: str | os.PathLike, name: str, key: dict[str, Any]):
        self.key = key
        self.fingerprint = fingerprint(key)
        self.path = Path(root) / f"{name}-{self.fingerprint}"
        self.name = name

    # -- one writer ----------------------------------------------------------------------------------------------
    def lock(self, shard: int = 0, num_shards: int = 1, *, wait: float = 0.0) -> StageOutput:
        """Become the only writer of shard ``shard`` of ``num_shards`` of this output (for this process's lifetime,
        until ``finalize`` or ``release``); return self. Call it before reading what is done.

        Raises OutputLockedError, having changed nothing on disk, when another live process holds it (after polling
        up to ``wait`` seconds). Idempotent within a process. A finished output is never written again, so it needs
        no lock: then nothing is created. Raises StoreError when the directory's meta.json is for another key.
        """
        if self.is_complete():
            return self
        self.check_meta()
        self.path.mkdir(parents=True, exist_ok=True)
        lock_file = self.path / f"{LOCK_PREFIX}{shard_name(shard, num_shards).removesuffix('.jsonl')}"
        key = os.path.realpath(lock_file)
        if key in _HELD:
            return self
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # O_CREAT alone never truncates
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
                    continue
                holder = _holder_text(fd)
                os.close(fd)
                raise OutputLockedError(
                    f"{self.path}: shard {shard}/{num_shards} of this output is already being written by {holder}; "
                    f"a second writer would write every row twice, so this run stopped before changing anything. "
                    f"Wait for that run to finish, or stop it and re-run this command to resume (lock file "
                    f"{lock_file})."
                ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _HELD[key] = fd
        return self

    def release(self) -> None:
        """Give up every lock this process holds on this output (``finalize`` does; so does the process's exit)."""
        here = os.path.realpath(self.path)
        for key in [k for k in _HELD if os.path.dirname(k) == here]:
            fd = _HELD.pop(key)
            os.ftruncate(fd, 0)  # an empty lock file: nobody holds it
            os.close(fd)  # closing the only descriptor releases the flock

    def check_meta(self) -> None:
        """Raise StoreError if the directory's meta.json is unreadable or records another key than this output's."""
        meta = self.path / "meta.json"
        if not meta.exists():
            return
        fix = f"Delete {self.path} and re-run {_command_of(self.path)} to rebuild it."
        try:
            recorded = json.loads(meta.read_text())["key"]
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{meta}: unreadable ({type(e).__name__}: {e}); the file was edited or damaged. "
                             f"{fix}") from None
        if fingerprint(recorded) != self.fingerprint:
            raise StoreError(f"{meta}: records a key with fingerprint {fingerprint(recorded)}, but this directory is "
                             f"for fingerprint {self.fingerprint}: it was renamed or copied, or meta.json was edited, "
                             f"so its rows may be for other inputs. {fix}")

    # -- state -------------------------------------------------------------------------------------------------
    def is_complete(self) -> bool:
        """Whether the output was finished (its _SUCCESS marker exists)."""
        return (self.path / SUCCESS).exists()

    def shard_files(self) -> list[Path]:
        """The JSONL shard files present, sorted by name."""
        return sorted(self.path.glob("part-*.jsonl")) if self.path.exists() else []

    def done_ids(self) -> set[str]:
        """Ids of every row already written by any shard (complete lines only)."""
        return {row["id"] for f in self.shard_files() for row in _read_jsonl(f, tolerate_partial_tail=True,
                                                                              output=self.path)}

    # -- writing -----------------------------------------------------------------------------------------------
    def open_shard(self, shard: int = 0, num_shards: int = 1) -> ShardWriter:
        """Open (creating the directory and meta.json) the append-only writer of one shard; takes its lock."""
        self.lock(shard, num_shards)
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "meta.json"
        if not meta.exists():
            atomic_write(meta, json.dumps({"name": self.name, "fingerprint": self.fingerprint, "key": self.key},
                                           indent=1, default=str))
        return ShardWriter(self.path / shard_name(shard, num_shards))

    def write_all(self, rows: Iterable[dict[str, Any]]) -> Path:
        """Write a whole (small) output in one go and mark it complete; for stages with no long-running work.

        The rows go to a temporary file that replaces the shard in one rename, so a crash at any instant leaves the
        old shard or the new one, never both: a re-run after a crash before ``_SUCCESS`` rewrites, never appends.
        Takes the output's lock (shard 0 of 1) first: OutputLockedError while another process writes it.
        """
        self.lock()
        self.open_shard().close()  # the directory and meta.json
        target = self.path / shard_name()
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(_row_line(row, target))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        return self.finalize()

    def finalize(self) -> Path:
        """Check ids are unique across shards, then write _SUCCESS with row count and checksums; release the locks
        this process holds on the output (a finished output is never written again)."""
        seen: dict[str, str] = {}
        for f in self.shard_files():
            for row in _read_jsonl(f, tolerate_partial_tail=False, output=self.path):
                if row["id"] in seen:
                    where = f"in {seen[row['id']]}" + ("" if seen[row["id"]] == f.name else f" and {f.name}")
                    raise StoreError(f"{self.path}: row id {row['id']!r} appears twice ({where}): two writers, or a "
                                     f"shard written twice. Delete {self.path} and re-run {_command_of(self.path)}.")
                seen[row["id"]] = f.name
        files = {f.name: file_sha256(f) for f in self.shard_files()}
        atomic_write(self.path / SUCCESS, json.dumps({"num_rows": len(seen), "files": files}, indent=1))
        self.release()
        return self.path


class ShardWriter:
    """Appends rows to one JSONL shard; each ``write`` is flushed and fsynced, so a crash loses at most one batch."""

    def __init__(self, path: Path):
        self.path = path
        _drop_partial_tail(path)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close() / __exit__)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append rows (each must have an ``id``) and make them durable."""
        self._f.write("".join(_row_line(row, self.path) for row in rows))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _row_line(row: dict[str, Any], path: Path) -> str:
    """One JSONL line of ``row``; every row needs an ``id``."""
    if "id" not in row:
        raise StoreError(f"{path}: every row needs an 'id' column, got keys {sorted(row)}")
    return json.dumps(row, ensure_ascii=False, allow_nan=True) + "\n"


def read_output(path: str | os.PathLike, *, verify: bool = True) -> list[dict[str, Any]]:
    """All rows of a finished stage output directory, sorted by id; checksums verified against _SUCCESS."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a stage output directory" if path.exists() else "does not exist"
        raise StoreError(f"{path}: {what}; give the directory a stage printed, or run the stage that writes it.")
    marker = path / SUCCESS
    rerun = f"re-run {_command_of(path)} with the same arguments"
    if not marker.exists():
        holders = _live_holders(path)
        if holders:
            raise StoreError(f"{path}: output is incomplete (no {SUCCESS}): it is being written now by "
                             f"{'; '.join(holders)}. Wait for that run to finish, then read it.")
        raise StoreError(f"{path}: output is incomplete (no {SUCCESS}): the run writing it stopped before it "
                         f"finished. To resume it (rows already written are kept), {rerun}.")
    try:
        info = json.loads(marker.read_text())
        files = dict(info["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{marker}: unreadable ({type(e).__name__}: {e}); the file was edited or damaged. "
                         f"Delete {path} and {rerun} to rebuild it.") from None
    if verify:
        for name, digest in files.items():
            f = path / name
            what = "missing" if not f.exists() else "checksum mismatch" if file_sha256(f) != digest else None
            if what:
                raise StoreError(f"{f}: {what} (listed in {SUCCESS}: the file changed, was removed or corrupted after "
                                 f"the stage finished). Delete {path} and {rerun} to rebuild it.")
    rows = [row for name in sorted(files)
            for row in _read_jsonl(path / name, tolerate_partial_tail=False, output=path)]
    return sorted(rows, key=lambda r: r["id"])


def _stage_of(path: Path) -> str | None:
    """The stage that writes an output, from the start of its directory name (``_COMMANDS``)."""
    for start in sorted(_COMMANDS, key=len, reverse=True):
        if path.name.startswith(start):
            return _COMMANDS[start].split("`")[1].split()[1]
    return None


def _command_of(path: Path) -> str:
    """The command that writes the output directory ``path`` (by its name), in words."""
    return next((cmd for start, cmd in _COMMANDS.items() if path.name.startswith(start)), "the stage that writes it")


def _holder_text(fd: int) -> str:
    """Who holds the lock open as ``fd``, in words, from the pid, host and start time it recorded."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        pid, host, since = info["pid"], info["host"], info["since"]
    except (ValueError, KeyError, TypeError):
        return "another process (it has not recorded its pid yet)"
    text = f"pid {pid} on host {host} (since {since})"
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            text += f"; pid {pid} has exited, so a process it started still holds the lock: stop that one"
        except PermissionError:
            pass
    return text


def _live_holders(path: Path) -> list[str]:
    """Who holds a lock of the output ``path`` now (any process, this one included), in words."""
    holders = []
    for f in sorted(path.glob(f"{LOCK_PREFIX}*")):
        try:
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holders.append(f"{_holder_text(fd)} ({f.name})")
        finally:
            os.close(fd)  # closing releases the shared lock if we got it
    return holders


def describe_output(path: str | os.PathLike) -> dict[str, Any]:
    """What one stage output directory holds, without reading its rows: {"path", "name", "stage", "status"
    ("complete" | "partial" | "writing" | "damaged"), "rows" (the finished count, or complete lines so far),
    "writer" (the live holder, or None), "modified" (ISO time of the newest file), "key" (the inputs and parameters
    that made it, from meta.json)}."""
    path = Path(path)
    out: dict[str, Any] = {"path": str(path), "name": path.name, "stage": None, "status": "partial", "rows": 0,
                           "writer": None, "modified": None, "key": None}
    files = [f for f in path.iterdir() if f.is_file()] if path.is_dir() else []
    if files:
        newest = max(f.stat().st_mtime for f in files)
        out["modified"] = datetime.fromtimestamp(newest).astimezone().isoformat(timespec="seconds")
    try:
        meta = json.loads((path / "meta.json").read_text())
        out["name"], out["key"] = meta["name"], meta["key"]
        out["stage"] = meta["key"].get("stage") if isinstance(meta["key"], dict) else None
        out["stage"] = out["stage"] or _stage_of(path)
    except (OSError, ValueError, KeyError, TypeError):
        out["status"] = "damaged"
        return out
    if (path / SUCCESS).exists():
        try:
            out["rows"], out["status"] = int(json.loads((path / SUCCESS).read_text())["num_rows"]), "complete"
        except (OSError, ValueError, KeyError, TypeError):
            out["status"] = "damaged"
        return out
    for shard in sorted(path.glob("part-*.jsonl")):
        with open(shard, "rb") as f:
            out["rows"] += sum(1 for line in f if line.endswith(b"\n"))
    holders = _live_holders(path)
    if holders:
        out["status"], out["writer"] = "writing", "; ".join(holders)
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a user-supplied JSONL file; a malformed line raises a DataFormatError naming its line number."""
    return list(_read_jsonl(Path(path), tolerate_partial_tail=False))


def _read_jsonl(path: Path, *, tolerate_partial_tail: bool, output: Path | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file. ``output``: the file is a shard of that stage output (not user data), so every error is a
    CorruptOutputError that says how to rebuild it, and every row needs an ``id``."""
    error: type[DataFormatError] = CorruptOutputError if output else DataFormatError
    rebuild = f" This is a stage output's shard: delete {output} and re-run {_command_of(output)}." if output else ""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        fix = rebuild or " Re-encode the file as UTF-8."
        raise error(f"{path}: not valid UTF-8 ({e}).{fix}") from None
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            torn = lineno == len(lines)  # unterminated last line: a writer killed mid-write
            if tolerate_partial_tail and torn:
                return
            where = f"{path}, line {lineno}: malformed JSON ({e.msg} at column {e.colno})"
            if output and torn and not (output / SUCCESS).exists():
                raise error(f"{where}: the torn last line of a killed writer. Re-run {_command_of(output)} with the "
                            f"same arguments: it drops the torn line and redoes that row.") from None
            if output:
                raise error(f"{where}, before the end of the file, where a killed writer never leaves one: the file "
                            f"was edited or damaged.{rebuild}") from None
            raise error(f"{where}.") from None
        if not isinstance(row, dict):
            got = type(row).__name__
            raise error(f"{path}, line {lineno}: expected a JSON object per line, got {got}.{rebuild}")
        if output and "id" not in row:
            raise error(f"{path}, line {lineno}: a row without an 'id'.{rebuild}")
        yield row


def _drop_partial_tail(path: Path) -> None:
    """Truncate an unterminated last line left by a killed writer."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(cut)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the whole new one (temp file of this process,
    then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- stage results ----------------------------------------------------------------------------------------------
RESULT_FILE_ENV = "INFIFPO_RESULT_FILE"  # set by `infifpo pipeline` for each stage process it runs


def record_outputs(*paths: Path | str | None) -> None:
    """Record the finished output directories of this stage process in the result file named by
    ``INFIFPO_RESULT_FILE`` (one JSON line ``{"outputs": [...]}``, absolute paths), which is how `infifpo pipeline`
    learns what a stage produced; without the variable, nothing. Shard workers never record: their launcher does."""
    target = os.environ.get(RESULT_FILE_ENV)
    if not target:
        return
    outputs = [str(Path(p).resolve()) for p in paths if p is not None]
    with open(target, "a") as f:
        f.write(json.dumps({"outputs": outputs}) + "\n")


def announce(*paths: Path | str | None, summary: str | None = None) -> None:
    """How a stage ends: each finished output directory on its own stdout line (all a script captures:
    ``P=$(infifpo prompts ...)``), the human summary on stderr, and the directories in the pipeline's result file."""
    for p in paths:
        if p is not None:
            print(p, flush=True)
    if summary:
        print(summary, file=sys.stderr, flush=True)
    record_outputs(*paths)


def read_recorded_outputs(result_file: Path) -> list[Path]:
    """The output directories recorded in ``result_file`` (``record_outputs``), in order, each once; a directory
    that is not a complete stage output (no ``_SUCCESS``) is a DataFormatError."""
    paths: list[Path] = []
    if not result_file.exists():
        return paths
    for line in result_file.read_text().splitlines():
        for p in map(Path, json.loads(line)["outputs"]):
            if not (p / SUCCESS).exists():
                raise DataFormatError(f"{result_file}: recorded output {p} is not complete (no {SUCCESS}).")
            if p not in paths:
                paths.append(p)
    return paths
