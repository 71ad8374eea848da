"""store: content addressing, crash-safe appends, resume without loss or duplication, checksums."""

import json

import pytest

from infifpo.schema import DataFormatError
from infifpo.store import StageOutput, StoreError, fingerprint, in_shard, parse_shard, read_jsonl, read_output


def test_fingerprint_ignores_dict_order_and_changes_with_content():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_key_change_maps_to_a_new_directory(tmp_path):
    a = StageOutput(tmp_path, "samples-m", {"model": "x", "n": 4})
    b = StageOutput(tmp_path, "samples-m", {"model": "x", "n": 8})
    assert a.path != b.path and a.path.parent == b.path.parent


def test_partial_tail_from_a_crash_is_dropped_and_resume_skips_done_ids(tmp_path):
    out = StageOutput(tmp_path, "s", {"k": 1})
    with out.open_shard() as w:
        w.write([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    # A killed writer leaves an unterminated line.
    f = out.shard_files()[0]
    with open(f, "a") as fh:
        fh.write('{"id": "c", "v"')
    assert out.done_ids() == {"a", "b"}
    with out.open_shard() as w:  # reopening truncates the partial line
        w.write([{"id": r, "v": 0} for r in ["c", "d"] if r not in out.done_ids()])
    out.finalize()
    rows = read_output(out.path)
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]


def test_duplicate_ids_across_shards_refuse_to_finalize(tmp_path):
    out = StageOutput(tmp_path, "s", {})
    with out.open_shard(0, 2) as w:
        w.write([{"id": "a"}])
    with out.open_shard(1, 2) as w:
        w.write([{"id": "a"}])
    with pytest.raises(StoreError, match="appears twice"):
        out.finalize()


def test_read_output_detects_corruption_and_incompleteness(tmp_path):
    out = StageOutput(tmp_path, "s", {})
    with out.open_shard() as w:
        w.write([{"id": "a", "x": 1}])
    with pytest.raises(StoreError, match="incomplete"):
        read_output(out.path)
    out.finalize()
    f = out.shard_files()[0]
    f.write_text(f.read_text().replace('"x": 1', '"x": 2'))
    with pytest.raises(StoreError, match="checksum mismatch"):
        read_output(out.path)


def test_rows_without_id_are_rejected(tmp_path):
    with StageOutput(tmp_path, "s", {}).open_shard() as w, pytest.raises(StoreError, match="'id'"):
        w.write([{"x": 1}])


def test_sharding_is_a_partition_by_hash():
    ids = [f"p{i}" for i in range(200)]
    for n in (2, 3):
        parts = [{i for i in ids if in_shard(i, s, n)} for s in range(n)]
        assert set().union(*parts) == set(ids)
        assert sum(len(p) for p in parts) == len(ids)
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) == (0, 1)
    for bad in ("3/3", "x/2", "1"):
        with pytest.raises(StoreError):
            parse_shard(bad)


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"id": 1}) + "\n" + '{"id": 2,}\n')
    with pytest.raises(DataFormatError, match="line 2"):
        read_jsonl(p)
    p.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(DataFormatError, match="UTF-8"):
        read_jsonl(p)
    p.write_text("[1, 2]\n")
    with pytest.raises(DataFormatError, match="JSON object"):
        read_jsonl(p)


class _Crash(BaseException):
    """An injected crash (BaseException, like the SystemExit/KeyboardInterrupt of a killed process)."""


def test_write_all_crash_at_every_step_of_finalize_reruns_to_the_identical_output(tmp_path, monkeypatch):
    """issue: prompts / pair / score's assembled output appended their rows and then wrote _SUCCESS; a crash between
    the two made the re-run append every row again. Inject a crash at each file operation of write_all (every
    fsync, rename and marker write), re-run, and the output equals a clean run's, byte for byte."""
    import infifpo.store as store

    rows = [{"id": f"r{i}", "x": i} for i in range(5)]
    clean = StageOutput(tmp_path / "clean", "out", {"k": 1}).write_all(rows)
    expected = {p.name: p.read_bytes() for p in clean.iterdir()}
    real_replace, real_fsync = store.os.replace, store.os.fsync
    step = 0
    while True:
        calls = 0

        def crash_at(real):
            def wrapped(*args):
                nonlocal calls
                calls += 1
                if calls == step + 1:
                    raise _Crash
                return real(*args)
            return wrapped

        monkeypatch.setattr(store.os, "replace", crash_at(real_replace))
        monkeypatch.setattr(store.os, "fsync", crash_at(real_fsync))
        out = StageOutput(tmp_path / f"crash{step}", "out", {"k": 1})
        try:
            out.write_all(rows)
            crashed = False
        except _Crash:
            crashed = True
        monkeypatch.setattr(store.os, "replace", real_replace)
        monkeypatch.setattr(store.os, "fsync", real_fsync)
        if not crashed:
            break
        assert not out.is_complete() or read_output(out.path) == rows  # old state or the new one
        out.write_all(rows)  # the re-run
        got = {p.name: p.read_bytes() for p in out.path.iterdir() if not p.name.endswith(".tmp")}
        assert got == expected, f"crash at step {step}"
        assert read_output(out.path) == rows
        step += 1
    assert step >= 3  # the shard's fsync and rename, the marker's rename were all crash points
