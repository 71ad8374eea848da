"""Content-addressed, resumable stage outputs on disk.

Owns: where a stage writes (``<root>/<name>-<fingerprint>/``), how rows are appended crash-safely to JSONL shards,
which row ids are already done (so a re-run skips them), and the completion marker with per-shard checksums.
Does not own: what the rows contain (`schema`) or how they are computed (the stages).

Layout of one output directory::

    meta.json                 {"name", "fingerprint", "key": <everything that determines the content>}
    part-00000-of-00001.jsonl one JSON row per line, appended and flushed batch by batch (one file per shard)
    _SUCCESS                  written last: {"num_rows", "files": {name: sha256}}

A killed writer leaves at most a truncated last line, which is dropped on resume. Rows are keyed by a stable
``id``; readers sort by id, so shard count and merge order never change what a stage hands on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from infifpo.schema import InfiFPOError

SUCCESS = "_SUCCESS"


class StoreError(InfiFPOError, RuntimeError):
    """A stage output on disk is corrupted, incomplete or was written for different inputs."""


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

    # -- state -------------------------------------------------------------------------------------------------
    def is_complete(self) -> bool:
        """Whether the output was finished (its _SUCCESS marker exists)."""
        return (self.path / SUCCESS).exists()

    def shard_files(self) -> list[Path]:
        """The JSONL shard files present, sorted by name."""
        return sorted(self.path.glob("part-*.jsonl")) if self.path.exists() else []

    def done_ids(self) -> set[str]:
        """Ids of every row already written by any shard (complete lines only)."""
        return {row["id"] for f in self.shard_files() for row in _read_jsonl(f, tolerate_partial_tail=True)}

    # -- writing -----------------------------------------------------------------------------------------------
    def open_shard(self, shard: int = 0, num_shards: int = 1) -> ShardWriter:
        """Open (creating the directory and meta.json) the append-only writer of one shard."""
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "meta.json"
        if not meta.exists():
            _atomic_write(meta, json.dumps({"name": self.name, "fingerprint": self.fingerprint, "key": self.key},
                                           indent=1, default=str))
        return ShardWriter(self.path / shard_name(shard, num_shards))

    def write_all(self, rows: Iterable[dict[str, Any]]) -> Path:
        """Write a whole (small) output in one go and mark it complete; for stages with no long-running work.

        The rows go to a temporary file that replaces the shard in one rename, so a crash at any instant leaves the
        old shard or the new one, never both: a re-run after a crash before ``_SUCCESS`` rewrites, never appends.
        """
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
        """Check ids are unique across shards, then write _SUCCESS with row count and checksums."""
        seen: set[str] = set()
        for f in self.shard_files():
            for row in _read_jsonl(f, tolerate_partial_tail=False):
                if row["id"] in seen:
                    raise StoreError(f"{self.path}: row id {row['id']!r} appears twice across shards (two writers, or "
                                     f"a shard written twice). Delete {self.path} and re-run the stage.")
                seen.add(row["id"])
        files = {f.name: file_sha256(f) for f in self.shard_files()}
        _atomic_write(self.path / SUCCESS, json.dumps({"num_rows": len(seen), "files": files}, indent=1))
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
    marker = path / SUCCESS
    if not marker.exists():
        raise StoreError(f"{path}: output is incomplete (no {SUCCESS}); re-run the stage that writes it to resume.")
    info = json.loads(marker.read_text())
    if verify:
        for name, digest in info["files"].items():
            f = path / name
            if not f.exists() or file_sha256(f) != digest:
                raise StoreError(
                    f"{f}: checksum mismatch (file changed or corrupted after the stage finished). "
                    f"Delete {path} and re-run the stage to rebuild it."
                )
    rows = [row for name in sorted(info["files"]) for row in _read_jsonl(path / name, tolerate_partial_tail=False)]
    return sorted(rows, key=lambda r: r["id"])


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a user-supplied JSONL file; a malformed line raises a DataFormatError naming its line number."""
    return list(_read_jsonl(Path(path), tolerate_partial_tail=False))


def _read_jsonl(path: Path, *, tolerate_partial_tail: bool) -> Iterator[dict[str, Any]]:
    from infifpo.schema import DataFormatError

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not valid UTF-8 ({e}); re-encode the file as UTF-8.") from None
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_partial_tail and lineno == len(lines):  # crash mid-write: the unterminated last line
                return
            raise DataFormatError(f"{path}, line {lineno}: malformed JSON ({e.msg} at column {e.colno}).") from None
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}, line {lineno}: expected a JSON object per line, got {type(row).__name__}.")
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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
