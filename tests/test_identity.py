"""Identity by content (issue "A stage's output is never wrong"): stages that join inputs by id refuse inputs built
from other data, and a model is identified by the bytes of its files, not their sizes.

Each test replays a failure a fault probe found, the way it was found:
(a) samples judged against a prompts file of the same name after a line was inserted or changed got the other
    prompts' answers (exit code 0);
(b) `pair` then paired "What is 10 times 10?" with "The answer is 4.";
(c) a model retrained into the same directory (same file sizes) was not sampled or evaluated again: the old model's
    samples and accuracy came back.
New names are imported inside the tests, so on the code before the change each test fails on its behaviour.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from data_prep import prompts
from infifpo import pair
from infifpo.backends import SamplingSpec
from infifpo.judge import stage as judge
from infifpo.sample import main as sample_main
from infifpo.sample import output_for, sample_prompts
from infifpo.schema import SAMPLE_COLUMNS, sample_id
from infifpo.store import StoreError, read_output
from tests.conftest import make_tiny_model

GREEDY = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=6, seed=0)
QUESTIONS = [("What is 2+2?", "4"), ("What is 3+5?", "8")]


def _write_prompts_file(path: Path, items: list[tuple], ids: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{**({"id": ids[i]} if ids else {}), "prompt": q, "domain": "math", "answer": a}
             for i, (q, a) in enumerate(items)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _build_prompts(path: Path, out: Path, capsys) -> str:
    assert prompts.main(["--source", f"jsonl:{path}", "--out", str(out)]) == 0
    return capsys.readouterr().out.splitlines()[0]


def _age(model_dir: str | Path, seconds: float = 60) -> None:
    """Set every file's mtime ``seconds`` into the past: a model written long before it is used."""
    then = time.time_ns() - int(seconds * 1e9)
    for f in Path(model_dir).iterdir():
        os.utime(f, ns=(then, then))


# -- (a) judge: samples <-> prompts ------------------------------------------------------------------------------
EDITS = {
    "line inserted": lambda v1: ([("What is 10 times 10?", "100"), *QUESTIONS], None),
    "line changed": lambda v1: ([("What is 10 times 10?", "100"), QUESTIONS[1]], None),
    "same ids, other questions": lambda v1: ([("What is 10 times 10?", "100"), ("What is 7-1?", "6")], ["q1", "q2"]),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("where", ["same file", "other file of the same name"])
def test_judging_samples_against_edited_prompts_is_refused(tiny_llama, tmp_path, capsys, edit, where):
    root = tmp_path / "runs"
    ids = ["q1", "q2"] if edit.startswith("same ids") else None
    src = _write_prompts_file(tmp_path / "data" / "prompts.jsonl", QUESTIONS, ids)
    p1 = _build_prompts(src, root, capsys)
    assert sample_main(["--prompts", p1, "--model", tiny_llama, "--name", "m", "--backend", "transformers", "--n", "1",
                        "--temperature", "0", "--top-p", "1", "--max-tokens", "4", "--dtype", "float32",
                        "--out", str(root)]) == 0
    samples_dir = capsys.readouterr().out.strip().splitlines()[-1]
    items, new_ids = EDITS[edit](QUESTIONS)
    dst = src if where == "same file" else tmp_path / "elsewhere" / "prompts.jsonl"
    p2 = _build_prompts(_write_prompts_file(dst, items, new_ids), root, capsys)
    assert p2 != p1
    judged_root = tmp_path / "judged"
    with pytest.raises(StoreError) as err:
        judge.main(["--samples", samples_dir, "--prompts", p2, "--out", str(judged_root), "--workers", "1"])
    assert not judged_root.exists() or not list(judged_root.glob("judged-*")), "nothing may be written"
    from infifpo.provenance import InputMismatchError, prompt_set_digest, recorded

    msg = str(err.value)
    assert type(err.value) is InputMismatchError and "\n" not in msg
    was, now = recorded(samples_dir, "prompts"), prompt_set_digest(read_output(p2))
    assert msg.startswith("prompts changed: ") and f"{samples_dir} was built from prompts {was}" in msg
    assert f"--prompts {p2} holds prompts {now}" in msg and "sample again" in msg
    # The prompts the samples were drawn from are accepted.
    assert judge.main(["--samples", samples_dir, "--prompts", p1, "--out", str(judged_root), "--workers", "1"]) == 0


# -- (b) pair: judged <-> prompts --------------------------------------------------------------------------------
def _judged_from(p1: str, root: Path, model_dir: str, capsys) -> str:
    """Samples with known answers (two per prompt: right and wrong by one) for the prompts of ``p1``, judged."""
    rows = read_output(p1)
    out = output_for(rows, "m", model_dir, GREEDY, "transformers", root)
    samples = []
    for r in rows:
        for k, answer in enumerate((int(r["answer"]), int(r["answer"]) + 1)):
            samples.append(dict(zip(SAMPLE_COLUMNS, [sample_id(r["id"], "m", k), r["id"], "m", k, [1, 2],
                                                     f"The answer is {answer}.", "stop", -1.0, 2, 0], strict=True)))
    out.write_all(samples)
    assert judge.main(["--samples", str(out.path), "--prompts", p1, "--out", str(root), "--workers", "1"]) == 0
    return capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("ids", [None, ["q1", "q2"]], ids=["no ids, line inserted", "same ids, other questions"])
def test_pairing_judged_samples_with_other_prompts_is_refused(tiny_llama, tmp_path, capsys, ids):
    root = tmp_path / "runs"
    src = _write_prompts_file(tmp_path / "prompts.jsonl", QUESTIONS, ids)
    p1 = _build_prompts(src, root, capsys)
    judged_dir = _judged_from(p1, root, tiny_llama, capsys)
    edited = [("What is 10 times 10?", "100"), *QUESTIONS] if ids is None else [("What is 10 times 10?", "100"),
                                                                                  ("What is 7-1?", "6")]
    p2 = _build_prompts(_write_prompts_file(src, edited, ids), root, capsys)
    argv = ["--judged", judged_dir, "--recipe", "infifpo", "--pivot", "m", "--out", str(root)]
    with pytest.raises(StoreError) as err:
        pair.main([*argv, "--prompts", p2])
    assert not list(root.glob("pairs-*")), "nothing may be written"
    from infifpo.provenance import InputMismatchError, output_digest, recorded

    msg = str(err.value)
    assert type(err.value) is InputMismatchError and "\n" not in msg
    assert f"{judged_dir} was built from prompts {recorded(judged_dir, 'prompts')}" in msg
    assert f"--prompts {p2} holds prompts {output_digest(p2)}" in msg and "infifpo judge --prompts" in msg
    # With the prompts it was judged against: every chosen answer is its own question's right answer.
    assert pair.main([*argv, "--prompts", p1]) == 0
    rows = read_output(capsys.readouterr().out.splitlines()[0])
    answers = {q: a for q, a in QUESTIONS}
    assert len(rows) == 2
    assert all(r["chosen"][0]["content"] == f"The answer is {answers[r['prompt'][0]['content']]}." for r in rows)


def test_prompt_ids_come_from_content_so_inserting_a_line_moves_no_id(tmp_path):
    src = _write_prompts_file(tmp_path / "my prompts.jsonl", QUESTIONS)
    before = {r["prompt"][0]["content"]: r["id"] for r in prompts.build_prompts([f"jsonl:{src}"])}
    _write_prompts_file(src, [("What is 10 times 10?", "100"), *reversed(QUESTIONS)])
    after = {r["prompt"][0]["content"]: r["id"] for r in prompts.build_prompts([f"jsonl:{src}"])}
    assert all(after[q] == before[q] for q in before) and len(set(after.values())) == 3
    assert all(i.startswith("my-prompts-") for i in after.values())
    given = _write_prompts_file(tmp_path / "given.jsonl", QUESTIONS, ["a", "b"])
    assert [r["id"] for r in prompts.build_prompts([f"jsonl:{given}"])] == ["a", "b"]


# -- (c) retraining into the same directory ------------------------------------------------------------------------
def _retrain(model_dir: Path) -> None:
    """Overwrite the checkpoint in place with other weights of the same architecture: every file keeps its size."""
    sizes = {f.name: f.stat().st_size for f in model_dir.iterdir() if not f.name.startswith(".")}
    weights = (model_dir / "model.safetensors").read_bytes()
    make_tiny_model(str(model_dir), "llama", seed=7)
    assert {f.name: f.stat().st_size for f in model_dir.iterdir() if not f.name.startswith(".")} == sizes
    assert (model_dir / "model.safetensors").read_bytes() != weights


def test_a_model_retrained_in_place_is_sampled_again(tmp_path):
    ckpt = tmp_path / "checkpoints" / "sft"
    make_tiny_model(str(ckpt), "llama", seed=0)
    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Count to {i}."}]} for i in range(3)]
    kw = {"model": str(ckpt), "name": "sft", "spec": GREEDY, "backend": "transformers", "out_root": tmp_path / "runs",
          "engine_kwargs": {"dtype": "float32"}}
    first = sample_prompts(rows, **kw)
    old = read_output(first)
    _retrain(ckpt)
    second = sample_prompts(rows, **kw)
    assert second != first, "the retrained model got the old model's samples"
    assert [s["text"] for s in read_output(second)] != [s["text"] for s in old]
    assert read_output(first) == old
    assert sample_prompts(rows, **kw) == second  # unchanged since: reused


def test_a_model_retrained_in_place_is_evaluated_again(tmp_path, capsys):
    from infifpo.eval.stage import read_scores
    from infifpo.evaluate import main as eval_main

    ckpt = tmp_path / "checkpoints" / "sft"
    make_tiny_model(str(ckpt), "llama", seed=0)
    argv = ["--model", str(ckpt), "--label", "sft", "--benchmarks", "arithmetic:test:2", "--backend", "transformers",
            "--max_tokens", "4", "--dtype", "float32", "--out", str(tmp_path / "runs")]

    def evaluated() -> Path:
        assert eval_main(argv) == 0
        return Path(capsys.readouterr().out.strip().splitlines()[-1])

    first = evaluated()
    _retrain(ckpt)
    second = evaluated()
    assert second != first, "the retrained model got the old model's accuracy"
    assert read_scores(second)["generation"]["samples"] != read_scores(first)["generation"]["samples"]
    assert evaluated() == second


def test_model_identity_is_one_cached_rule(tmp_path, monkeypatch):
    """Digests are cached by size, mtime and inode: an unchanged model is not read again, a rewritten file is, and
    sample, eval, score and the trainers' pivot check all use the same identity."""
    from infifpo.models import resolve as models

    model = tmp_path / "model"
    make_tiny_model(str(model), "llama", seed=0)
    _age(model)
    reads: list[str] = []
    real = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda p: reads.append(Path(p).name) or real(p))
    identity = models.model_identity(model)
    assert "model.safetensors" in reads and (model / models.IDENTITY_CACHE).is_file()
    reads.clear()
    assert models.model_identity(model) == identity and reads == [], "an unchanged model must not be read again"

    blob = bytearray((model / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF  # one byte of the last tensor: same size, other weights
    (model / "model.safetensors").write_bytes(bytes(blob))
    assert models.model_identity(model) != identity and reads == ["model.safetensors"]

    copy = tmp_path / "elsewhere"
    shutil.copytree(model, copy)  # another directory (and inodes), the same bytes: the same model
    assert models.model_identity(copy) == models.model_identity(model)

    # A directory that cannot hold the cache (here its name is taken): the cache goes under $INFIFPO_CACHE.
    current = models.model_identity(model)
    monkeypatch.setenv("INFIFPO_CACHE", str(tmp_path / "cache"))
    (copy / models.IDENTITY_CACHE).unlink()
    (copy / models.IDENTITY_CACHE).mkdir()
    _age(copy)
    assert models.model_identity(copy) == current
    assert len(list((tmp_path / "cache" / "identity").glob("*.json"))) == 1
    reads.clear()
    assert models.model_identity(copy) == current and reads == []

    # The one rule, wherever a stage asks.
    from infifpo.eval.stage import sampled_model
    from infifpo.provenance import InputMismatchError
    from infifpo.score import stage as score
    from infifpo.score.output import model_key
    from infifpo.trainers.data import same_model

    assert output_for([], "m", str(model), GREEDY, "transformers", tmp_path).key["checkpoint"] == current
    sampled = output_for([], "m", str(model), GREEDY, "transformers", tmp_path)
    sampled.write_all([])  # eval takes --model for the model that wrote these samples only
    assert sampled_model(str(copy), sampled.path) == str(copy)
    job = score.ScoreJob(rows=[], texts={}, pairs_fp="x", out_root=str(tmp_path), backend="transformers",
                         dtype="float32", shard=(0, 1), on_too_long="error", max_length=None, write_every=64,
                         engine_kw={})
    assert score.model_output(str(model), job)[0].key["model"] == current
    assert model_key(str(model))["identity"] == current
    other = make_tiny_model(str(tmp_path / "other"), "llama", seed=3)
    assert same_model(str(model), str(copy)) and not same_model(str(model), other)
    with pytest.raises(InputMismatchError, match="model changed"):
        sampled_model(other, sampled.path)


def test_scored_pairs_follow_the_pairs_rows_not_only_their_texts(tiny_llama, tmp_path):
    """`score` copies every column of the pairs rows into its output: rows with the same texts but another split,
    domain or provenance are another scored output (the per-model scores, keyed by the texts, are reused)."""
    from infifpo.score.stage import score_pairs

    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"{2 * i + 1}."}], "split": "po", "domain": "math",
             "chosen_model": "a"} for i in range(2)]
    kw = {"pivot": tiny_llama, "sources": [tiny_llama], "out_root": tmp_path, "dtype": "float32"}
    first = score_pairs(rows, **kw)
    relabelled = [{**r, "chosen_model": "b"} for r in rows]
    second = score_pairs(relabelled, **kw)
    assert second != first
    assert {r["chosen_model"] for r in read_output(second)} == {"b"}
    assert len(list(tmp_path.glob("score-*"))) == 1  # one per-model output, reused
