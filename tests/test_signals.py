"""A stage stopped by SIGTERM (a scheduler's preemption, `timeout`) or SIGINT (Ctrl-C) stops its engines and workers
with it, and the same command then resumes it: real `infifpo` processes on the tiny model, signalled while they write.

Each test starts the stage, waits until its engine is up and the first rows are on disk, lists every descendant of
the stage (the spawned per-model process and, with VLLM_ENABLE_V1_MULTIPROCESSING=1, vLLM's engine core and worker),
sends the signal and then finds none of them running: not as a child of the stage and not re-parented to init. The
output has no _SUCCESS; a re-run finishes it with every row exactly once. A SIGKILLed stage (nothing can run in it)
takes its per-model process down too (PR_SET_PDEATHSIG), so the re-run is not locked out by an orphan still writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infifpo.sample import BATCH_SEQUENCES
from infifpo.store import SUCCESS, read_output
from tests.conftest import live_descendants

REPO = Path(__file__).resolve().parents[1]
STOP_S = 90  # the stage's own budget: vLLM's shutdown (20 s) + descendants' grace (10 s), with room on 2 busy cores


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFIFPO_STAGE", "VLLM_ENABLE_V1"))}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as f:
        # A process group of its own, as a shell gives a foreground job: SIGINT goes to the group (Ctrl-C).
        return subprocess.Popen([sys.executable, "-m", "infifpo.cli", *argv], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:]


def _rows_on_disk(root: Path, pattern: str) -> int:
    return sum(len(f.read_text().splitlines()) for f in root.glob(f"{pattern}/part-*.jsonl"))


def _wait_for_rows(proc: subprocess.Popen, root: Path, pattern: str, log: Path, timeout: float = 600) -> None:
    """Until the stage has written its first rows (its engine is up and generating); fails if it exits first."""
    deadline = time.monotonic() + timeout
    while _rows_on_disk(root, pattern) == 0:
        assert proc.poll() is None, f"the stage ended (exit {proc.returncode}) before writing a row:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"no row after {timeout} s:\n{_tail(log)}"
        time.sleep(0.3)


def _running(key: tuple[int, int]) -> bool:
    """Whether process (pid, start time) still runs, wherever it was re-parented; a zombie has ended."""
    try:
        fields = Path(f"/proc/{key[0]}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    return int(fields[19]) == key[1] and fields[0] not in (b"Z", b"X")


def _stop(proc: subprocess.Popen, signum: int, log: Path) -> None:
    """Signal the stage (SIGINT: its whole process group, as Ctrl-C does) and wait for it; none of its descendants
    (listed just before the signal) may still run 5 s later, and it must exit with 128 + the signal, saying how to
    resume."""
    tree = live_descendants(proc.pid)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    try:
        code = proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the stage did not exit {STOP_S} s after {signal.Signals(signum).name}:\n{_tail(log)}")
    deadline = time.monotonic() + 5
    while any(_running(k) for k in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {k: cmd for k, cmd in tree.items() if _running(k)}
    for pid, _ in left:  # no stray process for the rest of the run, whatever the verdict
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after {signal.Signals(signum).name} of the stage: {left}\n{_tail(log)}"
    if signum != signal.SIGKILL:
        assert code == 128 + signum, _tail(log)
        assert "run the same command again to resume" in log.read_text(errors="replace")


def _rerun(argv: list[str]) -> None:
    """The same command again, to the end: it must succeed (it resumes what the stopped run left)."""
    rerun = subprocess.run([sys.executable, "-m", "infifpo.cli", *argv], cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-4000:]


def _prompts(path: Path, n: int) -> Path:
    rows = [{"id": f"q{i:03d}", "prompt": [{"role": "user", "content": f"Count from {i} to {i + 40}, please."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sample_config(path: Path, model: str, prompts: Path, out: Path, backend: str, n: int, max_tokens: int) -> Path:
    model_cfg = {"name": "tiny", "ref": model, "n": n, "max_tokens": max_tokens, "temperature": 1.0,
                 "engine_kwargs": {"dtype": "float32", **({"max_model_len": 512} if backend == "vllm" else {})}}
    path.write_text(json.dumps({"prompts": str(prompts), "out": str(out), "backend": backend, "models": [model_cfg]}))
    return path


def _assert_complete_once(out: Path, pattern: str, prompt_ids: set[str], n: int) -> None:
    """The samples output is finished and holds sample 0..n-1 of every prompt, each exactly once."""
    (sample_dir,) = out.glob(pattern)
    assert (sample_dir / SUCCESS).exists()
    rows = read_output(sample_dir)
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == len({r["id"] for r in rows}), "a row was written twice"
    assert set(keys) == {(p, i) for p in prompt_ids for i in range(n)}


@pytest.mark.vllm
def test_sigterm_stops_eval_with_its_vllm_engine_core_and_worker_then_rerun_completes(tiny_llama, tmp_path):
    """The probe: `infifpo eval` stopped by SIGTERM left its vLLM process orphaned at 100 % CPU. `infifpo eval --model
    M --benchmarks ...` runs the stages in processes of their own; here it is stopped while its `infifpo sample`
    generates, with the engine in vLLM's own processes (VLLM_ENABLE_V1_MULTIPROCESSING=1), so the tree is eval ->
    sample -> engine core -> worker. The re-run keeps the rows written before the stop and completes the eval."""
    pytest.importorskip("vllm")
    # More items than one engine call takes (sample.BATCH_SEQUENCES), so rows are on disk while more are generated.
    items = 2 * BATCH_SEQUENCES + 64
    argv = ["eval", "--model", tiny_llama, "--label", "tiny", "--benchmarks", f"arithmetic:test:{items}", "--backend",
            "vllm", "--max-tokens", "256", "--dtype", "float32", "--max-model-len", "512", "--out", str(tmp_path)]
    log = tmp_path / "first.log"
    proc = _start(argv, log, _env(VLLM_ENABLE_V1_MULTIPROCESSING="1"))
    _wait_for_rows(proc, tmp_path, "samples-eval-*", log)
    tree = live_descendants(proc.pid)
    assert any("infifpo.cli sample" in cmd for cmd in tree.values()), tree  # the sample stage's own process
    assert any("EngineCore" in cmd for cmd in tree.values()), tree  # vLLM's own processes are part of the stop
    _stop(proc, signal.SIGTERM, log)
    written = _rows_on_disk(tmp_path, "samples-eval-*")
    assert 0 < written < items, "the stop must come mid-run for this test to mean anything"
    # Only the prompts are finished; the samples, their verdicts and the eval are not.
    assert {p.parent.name.split("-")[0] for p in tmp_path.glob(f"*/{SUCCESS}")} <= {"prompts"}
    kept = {json.loads(line)["id"]: line for f in tmp_path.glob("samples-eval-*/part-*.jsonl")
            for line in f.read_text().splitlines() if line.endswith("}")}  # complete lines: rows written before

    _rerun(argv)
    (prompts_dir,) = tmp_path.glob("prompts-*")  # one benchmark: its prompts output is the one sampled
    prompt_ids = {r["id"] for r in read_output(prompts_dir)}
    assert len(prompt_ids) == items
    _assert_complete_once(tmp_path, "samples-eval-*", prompt_ids, 1)
    (samples_dir,) = tmp_path.glob("samples-eval-*")
    final = {r["id"]: r for r in read_output(samples_dir)}
    assert kept and all(json.loads(line) == final[i] for i, line in kept.items()), "a kept row was redone"
    (eval_dir,) = tmp_path.glob("eval-tiny-*")
    scores = json.loads((eval_dir / "scores.json").read_text())
    assert scores["benchmarks"]["arithmetic"]["n"] == items and scores["generation"]["samples"] == str(samples_dir)


@pytest.mark.vllm
def test_sigint_stops_sample_and_the_rerun_completes_every_row_once(tiny_llama, tmp_path):
    """Ctrl-C on `infifpo sample --config`: the per-model process (its vLLM engine core in-process on CPU) ends with
    the stage, and the re-run samples only what is missing."""
    pytest.importorskip("vllm")
    prompts = _prompts(tmp_path / "prompts.jsonl", 40)
    cfg = _sample_config(tmp_path / "sample.json", tiny_llama, prompts, tmp_path / "out", "vllm", 2, 200)
    argv = ["sample", "--config", str(cfg), "--batch-prompts", "4"]
    log = tmp_path / "first.log"
    proc = _start(argv, log, _env())
    _wait_for_rows(proc, tmp_path / "out", "samples-*", log)
    _stop(proc, signal.SIGINT, log)
    written = _rows_on_disk(tmp_path / "out", "samples-*")
    assert 0 < written < 80 and not list((tmp_path / "out").glob(f"samples-*/{SUCCESS}"))

    _rerun(argv)
    _assert_complete_once(tmp_path / "out", "samples-*", {f"q{i:03d}" for i in range(40)}, 2)


def test_sigkill_of_the_stage_takes_its_per_model_process_down(tiny_llama, tmp_path):
    """Nothing runs in a SIGKILLed process: its per-model process dies with it (PR_SET_PDEATHSIG), instead of
    sampling on, holding the output's lock, while the re-run starts (transformers backend: no vLLM needed)."""
    prompts = _prompts(tmp_path / "prompts.jsonl", 48)
    cfg = _sample_config(tmp_path / "sample.json", tiny_llama, prompts, tmp_path / "out", "transformers", 2, 128)
    argv = ["sample", "--config", str(cfg), "--batch-prompts", "2"]
    log = tmp_path / "first.log"
    proc = _start(argv, log, _env())
    _wait_for_rows(proc, tmp_path / "out", "samples-*", log)
    assert live_descendants(proc.pid), "the model is sampled in a process of its own"
    _stop(proc, signal.SIGKILL, log)
    assert not list((tmp_path / "out").glob(f"samples-*/{SUCCESS}")), "a process of the killed stage wrote on"
    _rerun(argv)
    _assert_complete_once(tmp_path / "out", "samples-*", {f"q{i:03d}" for i in range(48)}, 2)
