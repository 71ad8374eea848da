"""`infifpo runs`: every stage output under a directory, with its stage, state, row count and the key that made it."""

from __future__ import annotations

import json
import os

from infifpo import runs
from infifpo.store import StageOutput


def _outputs(root):
    done = StageOutput(root / "data", "pairs-infifpo", {"stage": "pair", "recipe": "infifpo", "seed": 0})
    done.write_all([{"id": "a"}, {"id": "b"}, {"id": "c"}])
    partial = StageOutput(root / "data", "samples-m", {"stage": "sample", "model": "m"})
    with partial.open_shard() as writer:
        writer.write([{"id": "x"}, {"id": "y"}])
    partial.release()
    scored = StageOutput(root / "data", "scored", {"pivot": "p"})  # a key without "stage": named by its directory
    scored.write_all([{"id": "s"}])
    damaged = root / "data" / "judged-zzz"
    damaged.mkdir()
    (damaged / "meta.json").write_text("{not json")
    (root / "data" / "not-an-output").mkdir()
    return done, partial, scored, damaged


def test_runs_lists_each_output_with_its_state_rows_and_key(tmp_path, capsys):
    done, partial, scored, damaged = _outputs(tmp_path)
    assert runs.main(["--dir", str(tmp_path), "--json"]) == 0
    records = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(records) == {str(done.path), str(partial.path), str(scored.path), str(damaged)}
    assert (records[str(done.path)]["status"], records[str(done.path)]["rows"]) == ("complete", 3)
    assert records[str(done.path)]["key"] == {"stage": "pair", "recipe": "infifpo", "seed": 0}
    assert (records[str(partial.path)]["status"], records[str(partial.path)]["rows"]) == ("partial", 2)
    assert records[str(scored.path)]["stage"] == "score"
    assert records[str(damaged)]["status"] == "damaged"

    assert runs.main(["--dir", str(tmp_path), "--stage", "pair"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].split()[:3] == ["pair", "complete", "3"]
    assert "recipe=infifpo" in lines[1]


def test_runs_shows_a_live_writer(tmp_path, capsys):
    out = StageOutput(tmp_path, "samples-m", {"stage": "sample"}).lock()
    with out.open_shard() as writer:
        writer.write([{"id": "x"}])
    assert runs.main(["--dir", str(out.path), "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["status"] == "writing" and str(os.getpid()) in record["writer"]
    out.release()
