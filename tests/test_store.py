"""store: content addressing, crash-safe appends, resume without loss or duplication, checksums."""

import json
import re

import pytest

from infifpo.schema import DataFormatError
from infifpo.store import (
    CorruptOutputError,
    StageOutput,
    StoreError,
    fingerprint,
    in_shard,
    parse_shard,
    read_jsonl,
    read_output,
)


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


def test_every_wedged_state_names_the_directory_and_the_fix(tmp_path):
    """issue "a recovery command or message for every wedged state": each error the store can raise about an output
    on disk names the path and says what to do (resume with the same command, or delete the directory and re-run)."""
    out = StageOutput(tmp_path, "samples-m", {"k": 1})
    path = re.escape(str(out.path))
    with pytest.raises(StoreError, match=f"{path}: does not exist.*run the stage that writes it"):
        read_output(out.path)
    with out.open_shard() as w:
        w.write([{"id": "a"}, {"id": "b"}, {"id": "c"}])
    out.release()  # the writer is gone: nobody is writing it now
    resume = f"{path}: output is incomplete.*stopped before it finished.*re-run `infifpo sample` with the same"
    with pytest.raises(StoreError, match=resume):
        read_output(out.path)

    part = out.shard_files()[0]
    good = part.read_text()
    part.write_text(good.replace('{"id": "b"}', '{"id": "b"'))  # damaged mid-file: no killed writer leaves this
    delete = f"delete {path} and re-run `infifpo sample`"
    for call in (out.done_ids, out.finalize):
        with pytest.raises(CorruptOutputError, match=f"line 2: malformed JSON.*before the end.*{delete}"):
            call()
    with pytest.raises(DataFormatError):  # still the DataFormatError it always was
        out.done_ids()
    part.write_text(good + '{"x": 1}\n')
    with pytest.raises(CorruptOutputError, match=f"line 4: a row without an 'id'.*{delete}"):
        out.done_ids()
    part.write_text(good + '{"id": "d", "tr')  # a killed writer's torn line: finalize says resume, not delete
    assert out.done_ids() == {"a", "b", "c"}
    with pytest.raises(CorruptOutputError, match="line 4: malformed JSON.*torn last line.*Re-run `infifpo sample`"):
        out.finalize()
    part.write_text(good)

    with out.open_shard(0, 2) as w:  # the same row in two shards: two writers
        w.write([{"id": "b"}])
    twice = f"'b' appears twice \\(in part-00000-of-00001.jsonl and part-00000-of-00002.jsonl\\).*Delete {path}"
    with pytest.raises(StoreError, match=twice):
        out.finalize()
    (out.path / "part-00000-of-00002.jsonl").unlink()
    out.finalize()

    (out.path / "_SUCCESS").write_text("{")
    with pytest.raises(StoreError, match=f"_SUCCESS: unreadable.*Delete {path} and re-run `infifpo sample`"):
        read_output(out.path)
    out.finalize()
    part.write_text(good.replace('"c"', '"C"'))
    with pytest.raises(StoreError, match=f"checksum mismatch.*Delete {path} and re-run `infifpo sample`"):
        read_output(out.path)
    part.unlink()
    with pytest.raises(StoreError, match=f"{re.escape(str(part))}: missing.*Delete {path}"):
        read_output(out.path)


def test_meta_json_for_another_key_is_refused_before_writing(tmp_path):
    out = StageOutput(tmp_path, "judged-m", {"k": 1})
    path = re.escape(str(out.path))
    with out.open_shard() as w:
        w.write([{"id": "a"}])
    out.release()
    meta = out.path / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": {"k": 2}}))  # edited, or copied from elsewhere
    before = out.shard_files()[0].read_bytes()
    for call in (out.lock, out.open_shard, lambda: out.write_all([{"id": "b"}])):
        with pytest.raises(StoreError, match=f"meta.json: records a key.*Delete {path} and re-run `infifpo judge`"):
            call()
    meta.write_text("{not json")
    with pytest.raises(StoreError, match=f"meta.json: unreadable.*Delete {path}"):
        out.lock()
    assert out.shard_files()[0].read_bytes() == before and not (out.path / ".lock-part-00000-of-00001").read_text()


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

        def crash_at(real, step=step):
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


def test_a_stage_records_its_outputs_for_the_pipeline_in_its_result_file(tmp_path, monkeypatch):
    from infifpo.store import RESULT_FILE_ENV, SUCCESS, read_recorded_outputs, record_outputs

    done, partial = tmp_path / "a", tmp_path / "b"
    done.mkdir(), partial.mkdir()
    (done / SUCCESS).write_text("{}")
    result = tmp_path / "result.jsonl"
    record_outputs(done)  # no variable: nothing recorded
    assert read_recorded_outputs(result) == []
    monkeypatch.setenv(RESULT_FILE_ENV, str(result))
    record_outputs(done, None)
    record_outputs(done)
    assert read_recorded_outputs(result) == [done.resolve()]  # each once, in order
    record_outputs(partial)
    with pytest.raises(DataFormatError, match="not complete"):
        read_recorded_outputs(result)
