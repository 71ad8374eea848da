"""Sharded sampling and scoring (issue 6, docs/bad-inputs.md D13 / S5): shards run in any order merge to the
single-process output row for row; `--num_shards N` (a flag or a `--config` key) launches N real worker processes
and equals one process; a worker killed with SIGKILL midway resumes alone on a re-run with no duplicates; the
launcher's argv / device / thread plumbing.

tests/test_sample.py and tests/test_score.py already cover shards run in index order and in-process kill/resume;
this file adds arbitrary finishing orders, real subprocess workers and a real SIGKILL.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from infifpo import shards, store
from infifpo.config import parse_config
from infifpo.sample import SampleOptions
from infifpo.sample import main as sample_main
from infifpo.schema import ConfigError
from infifpo.score.stage import main as score_main
from infifpo.score.stage import score_pairs
from tests.test_sample import GREEDY, assert_same_rows, backend_engine, hf_tiny, prompts, sample  # noqa: F401
from tests.test_score import ENGINE, make_rows
from tests.test_vllm_engine import vllm_tiny  # noqa: F401  (session engine shared with the engine tests)

ORDERS = [order for n in (2, 3) for order in itertools.permutations(range(n))]


def _order_id(order: tuple[int, ...]) -> str:
    return f"{len(order)}shards-" + "".join(map(str, order))


def _rounded(value):
    """``value`` with every float rounded to 4 decimals (nats): equal up to fp32 round-off of the log-prob sums."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


@pytest.mark.parametrize("order", ORDERS, ids=_order_id)
def test_greedy_sample_shards_in_any_order_equal_single_process(backend_engine, tiny_llama, tmp_path,  # noqa: F811
                                                                order):
    backend, engine = backend_engine
    rows = prompts(9)
    single = store.read_output(sample(rows, engine, backend, tmp_path / "one", model=tiny_llama))
    for k, i in enumerate(order):
        path = sample(rows, engine, backend, tmp_path / "sharded", shard=(i, len(order)), model=tiny_llama)
        assert (path / "_SUCCESS").exists() == (k == len(order) - 1), "finalised by whichever shard finishes last"
    assert_same_rows(store.read_output(path), single)


def _score_kw(tiny_llama, tiny_qwen, root):
    return {"pivot": tiny_llama, "sources": [tiny_qwen], "out_root": root, **ENGINE}


@pytest.mark.parametrize("order", ORDERS, ids=_order_id)
def test_score_shards_in_any_order_equal_single_process(tiny_llama, tiny_qwen, tmp_path, order):
    rows = make_rows(7)
    whole = store.read_output(score_pairs(rows, **_score_kw(tiny_llama, tiny_qwen, tmp_path / "whole")))
    for k, i in enumerate(order):
        path = score_pairs(rows, shard=(i, len(order)), **_score_kw(tiny_llama, tiny_qwen, tmp_path / "sharded"))
        assert (path is None) == (k < len(order) - 1), "assembled by whichever shard finishes last"
    # Same rows, ids, texts and counts; log-probs equal to fp32 round-off: a shard batches other rows together, and
    # oneDNN's kernels for other padded widths may round the last bits differently (seen: 3 shards, ~1e-6 nats).
    assert _rounded(store.read_output(path)) == _rounded(whole)
    stats = json.loads((path / "score_stats.json").read_text())
    whole_stats = json.loads(next((tmp_path / "whole").glob("scored-*/score_stats.json")).read_text())
    for a, b in zip(stats["models"], whole_stats["models"], strict=True):  # shard totals add up to one process's
        assert (a["responses"], a["tokens"], a["prompt_tokens"]) == (b["responses"], b["tokens"], b["prompt_tokens"])


# ---------------------------------------------------------------- --num_shards: real worker processes


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sample_args(prompts_file, model, out, max_tokens=12):
    return ["--prompts", prompts_file, "--model", model, "--name", "tiny", "--backend", "transformers", "--dtype",
            "float32", "--n", "1", "--temperature", "0", "--top-p", "1", "--max-tokens", str(max_tokens), "--out",
            str(out)]


def _printed_path(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]  # the output directory, alone on its line


def test_num_shards_cli_equals_single_process(tiny_llama, tiny_qwen, tmp_path, capsys):
    """`infifpo sample --config` with `num_shards: 2` and `infifpo score --num-shards 2`: two worker processes (which
    launch none of their own), one part file each, a log per worker, and the merged output equal to a single-process
    run's."""
    prompts_file = _write_jsonl(tmp_path / "prompts.jsonl", prompts(8))
    assert sample_main(_sample_args(prompts_file, tiny_llama, tmp_path / "one")) == 0
    single = store.read_output(_printed_path(capsys))
    cfg = tmp_path / "sample.yaml"
    cfg.write_text("num_shards: 2\n")
    assert sample_main([*_sample_args(prompts_file, tiny_llama, tmp_path / "two"), "--config", str(cfg)]) == 0
    merged_dir = _printed_path(capsys)
    assert sorted(p.name for p in (tmp_path / "two").glob("*/part-*.jsonl")) == [
        store.shard_name(0, 2), store.shard_name(1, 2)]
    logs = sorted((tmp_path / "two" / "logs").glob("sample-shard-*.log"))
    assert len(logs) == 2
    for i, log in enumerate(logs):  # each worker ran its one shard and launched no workers of its own
        assert log.read_text().splitlines()[0].endswith(f"--num_shards 1 --shard {i}/2")
        assert not re.search(r"shard \d+/\d+: pid \d+", log.read_text())
    assert_same_rows(store.read_output(merged_dir), single)

    pairs = _write_jsonl(tmp_path / "pairs.jsonl", make_rows(7))
    common = ["--pairs", pairs, "--pivot", tiny_llama, "--sources", tiny_qwen, "--dtype", "float32"]
    assert score_main([*common, "--out", str(tmp_path / "s1")]) == 0
    whole = store.read_output(capsys.readouterr().out.strip().splitlines()[-1])
    assert score_main([*common, "--out", str(tmp_path / "s2"), "--num-shards", "2"]) == 0
    merged = store.read_output(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["id"] for r in merged] == [r["id"] for r in whole]
    for a, b in zip(merged, whole, strict=True):  # other batches and 1 thread per worker: last-bit differences only
        assert a["ref_chosen_num_tokens"] == b["ref_chosen_num_tokens"]
        assert a["fuse_rejected_num_tokens"] == b["fuse_rejected_num_tokens"]
        assert a["ref_chosen_logps"] == pytest.approx(b["ref_chosen_logps"], abs=1e-4)
        assert a["fuse_rejected_logps"] == pytest.approx(b["fuse_rejected_logps"], abs=1e-4)


def _wait_for(predicate, what: str, parent: subprocess.Popen):
    while not (found := predicate()):
        if parent.poll() is not None:
            pytest.fail(f"the launcher ended (exit {parent.returncode}) before {what}: {parent.stderr.read()}")
        time.sleep(0.005)
    return found


def _lines(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_sigkilled_shard_resumes_alone_without_duplicates(tiny_llama, hf_tiny, tmp_path):  # noqa: F811
    """SIGKILL shard 0's worker after its first written batch: the launcher names shard 0, its exit and its log;
    re-running the same command leaves shard 1's finished part file untouched, appends only the missing rows to
    shard 0's, and the merged output equals a single-process run's."""
    psutil = pytest.importorskip("psutil")
    rows = prompts(40)
    prompts_file = _write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "runs"
    argv = [*_sample_args(prompts_file, tiny_llama, out, max_tokens=48), "--batch-prompts", "1", "--num-shards", "2"]
    parent = subprocess.Popen([sys.executable, "-m", "infifpo.cli", "sample", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)

    def worker0():
        kids = psutil.Process(parent.pid).children()
        return next((k for k in kids if "0/2" in k.cmdline()), None)

    worker = _wait_for(worker0, "shard 0's worker started", parent)
    part0 = _wait_for(lambda: next(out.glob(f"samples-tiny-*/{store.shard_name(0, 2)}"), None), "a part file", parent)
    _wait_for(lambda: len(_lines(part0)) >= 1, "shard 0 wrote a batch", parent)
    os.kill(worker.pid, signal.SIGKILL)
    _, stderr = parent.communicate()
    assert parent.returncode != 0
    log = shards.log_path(out / "logs", "sample", 0, 2)
    assert "shard 0/2 (killed by signal 9)" in stderr and str(log) in stderr
    before0 = part0.read_text()
    mine = sum(store.in_shard(r["id"], 0, 2) for r in rows)
    assert 1 <= len(_lines(part0)) < mine, "killed midway"
    assert not (part0.parent / "_SUCCESS").exists()
    part1 = part0.parent / store.shard_name(1, 2)
    before1 = part1.read_bytes()

    assert sample_main(argv) == 0
    assert part1.read_bytes() == before1, "the finished shard did no work again"
    after0 = part0.read_text()
    kept = before0[: before0.rfind("\n") + 1]  # a kill mid-write may leave a partial last line; it is dropped
    assert after0.startswith(kept) and len(_lines(part0)) == mine
    resumed = store.read_output(part0.parent)
    assert len({r["id"] for r in resumed}) == len(resumed) == len(rows)
    spec = type(GREEDY)(**{**GREEDY.__dict__, "max_tokens": 48})
    single = store.read_output(sample(rows, hf_tiny, "transformers", tmp_path / "one", model=tiny_llama, spec=spec,
                                      batch_prompts=16))
    assert_same_rows(resumed, single)


# ---------------------------------------------------------------- launcher plumbing


def test_worker_argv_strips_launcher_flags_and_adds_shard():
    worker = ["--pairs", "p", "--dtype", "float32", "--num_shards", "1", "--shard", "2/3"]
    argv = ["--pairs", "p", "--num-shards", "3", "--devices=0,1,2", "--threads-per-shard", "2", "--dtype", "float32"]
    assert shards.worker_argv(argv, 2, 3) == worker
    argv = ["--pairs", "p", "--num_shards=3", "--devices", "0,1,2", "--threads_per_shard", "2", "--dtype", "float32"]
    assert shards.worker_argv(argv, 2, 3) == worker


def test_num_shards_from_the_config_yaml_launches_no_worker_in_a_worker(tmp_path):
    """A worker repeats the launcher's command line, --config included: its own --num_shards 1 wins over the YAML's
    num_shards, so it runs its shard instead of launching workers again."""
    cfg = tmp_path / "sample.yaml"
    cfg.write_text("prompts: p.jsonl\nmodel: m\nnum_shards: 2\ndevices: '0,1'\n")
    argv = ["--config", str(cfg), "--max_tokens", "4"]
    assert parse_config(SampleOptions, argv, prog="infifpo sample").num_shards == 2
    for i in range(2):
        worker = parse_config(SampleOptions, shards.worker_argv(argv, i, 2), prog="infifpo sample")
        assert (worker.num_shards, worker.shard_range(), worker.max_tokens) == (1, (i, 2), 4)
        assert not shards.launch_from_args("sample", argv, worker, tmp_path / "logs")


def test_devices_split_into_equal_groups_per_worker():
    assert shards.device_groups("0,1,2,3", 2) == ["0,1", "2,3"]
    assert shards.device_groups("4,5", 2) == ["4", "5"]
    assert shards.device_groups(None, 2) == [None, None]
    with pytest.raises(ConfigError, match="3 device.*2 shards"):
        shards.device_groups("0,1,2", 2)
    env = shards.worker_env(1, 2, "0,1,2,3", None, base={})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_cpu_workers_split_the_cores(monkeypatch):
    monkeypatch.setattr(shards, "_cores", lambda: [0, 1, 2, 3, 4, 5])
    envs = [shards.worker_env(i, 3, None, None, base={}) for i in range(3)]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["2", "2", "2"]
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == ["0,1", "2,3", "4,5"]
    env = shards.worker_env(1, 2, None, 1, base={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    assert env["OMP_NUM_THREADS"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind", "the user's binding wins"


def test_engine_args_are_parsed_as_yaml_values():
    assert shards.engine_args(["gpu_memory_utilization=0.8", "enable-prefix-caching=true", "data_parallel_size=2"]) \
        == {"gpu_memory_utilization": 0.8, "enable_prefix_caching": True, "data_parallel_size": 2}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        shards.engine_args(["gpu_memory_utilization"])


def test_failed_workers_are_named_with_exit_code_and_log(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    argv = ["--pairs", str(tmp_path / "missing.jsonl"), "--pivot", "x", "--sources", "y"]
    with pytest.raises(shards.ShardError) as err:
        shards.launch("score", argv, 2, log_dir=tmp_path / "logs")
    for i in range(2):
        log = shards.log_path(tmp_path / "logs", "score", i, 2)
        assert f"shard {i}/2 (exit code 2), log {log}" in str(err.value)  # a named error exits 2 (infifpo.cli)
        assert "--shard " + f"{i}/2" in log.read_text().splitlines()[0]
    assert "missing.jsonl" in str(err.value), "the log tail says why"


def test_shard_and_num_shards_together_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        sample_main(["--prompts", "p", "--model", "m", "--shard", "0/2", "--num-shards", "2", "--out", str(tmp_path)])
