"""Multi-process training is the same optimisation as one process: InfiFPO and WRPO under a real 2-rank
`accelerate launch` (gloo on CPU, through `infifpo train --num_processes 2`) match a single process with the same
global batch of 4, and a single process with gradient accumulation (2 x 2), step by step.

Why the rows agree: every run samples the same seeded permutation of the 12 rows (accelerate's seedable sampler,
seed 0); one process takes rows [0:4] of it per step, two ranks take [0:2] and [2:4] (accelerate hands out whole
per-device batches round-robin), and accumulation takes [0:2] then [2:4]. Losses are batch means, DDP averages the
ranks' gradients and the Trainer divides each micro-batch loss by the accumulation steps, so all three compute the
mean over the same 4 pairs. The per-pair metrics (rewards/*, logps/*, fusion/*) are gathered over ranks with
``collate.gather_means`` (one ``accelerator.gather_for_metrics`` of a (B, n_metrics) tensor per micro-step, then the
mean), and TRL's ``log`` averages the micro-steps: with equal micro-batches every logged value is the mean over the
global batch, so a rank-0-only value (2 of the 4 pairs) would not match run (a).
Everything runs in fp32 on CPU; the tiny Llama has no dropout. Tolerance: 1e-5 absolute on every logged number and
every final weight (measured: ~1e-6 on losses/metrics, a few 1e-6 on weights after 3 AdamW steps).
Every rank must exit: a rank that saved everything could deadlock in gloo's teardown at exit (about 1 run in 10 on 2
cores) while torchrun waited for it; ranks now leave through ``entry.exit_rank``, the launcher kills and names a rank
still running 60 s after another exited, and a run is bounded by ``TRAIN_TIMEOUT_S``. tests/conftest.py fails a test
that leaves any process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from infifpo.trainers import entry
from infifpo.trainers import launch as launcher
from tests.trainers.conftest import make_scored_rows

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5
NOT_COMPARED = {"epoch", "step", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}
TRAIN_TIMEOUT_S = 600  # one run takes ~20 s alone on 2 cores; a hang fails here with its output, not at pytest's 900 s
RANK_EXIT_TIMEOUT_S = "60"  # a rank still running 60 s after the other exited is killed and named (trainers.launch)


@pytest.fixture(scope="module")
def scored_jsonl(tmp_path_factory, tiny_tok) -> str:
    """12 scored rows (InfiFPO and WRPO columns): 3 steps of a global batch of 4 see every row exactly once."""
    path = tmp_path_factory.mktemp("dist") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_scored_rows(tiny_tok, 12, k=2, wrpo=True)))
    return str(path)


def _config(tmp_path: Path, model: str, data: str) -> str:
    cfg = dict(model_name_or_path=model, dataset_name=data, bf16=False, report_to="none", max_steps=3,
               logging_steps=1, save_strategy="no", learning_rate=1e-3, max_length=128, seed=0,
               dataloader_num_workers=0, disable_tqdm=True)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _clean_env() -> dict[str, str]:
    """This process's env without any launcher variables (so the child decides for itself whether to launch)."""
    drop = {launcher.LAUNCHED_ENV, *launcher.RANK_ENV, "RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "HF_HUB_OFFLINE": "1",
            launcher.RANK_EXIT_TIMEOUT_ENV: RANK_EXIT_TIMEOUT_S}


def _infifpo_train(*argv: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "infifpo.cli", "train", *argv], cwd=REPO, env=_clean_env(),
                              capture_output=True, text=True, check=False, timeout=TRAIN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # killed; its launcher and ranks die with it (PR_SET_PDEATHSIG)
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"`infifpo train {' '.join(argv)}` did not end within {TRAIN_TIMEOUT_S} s:\n{err[-5000:]}")


def _run(tmp_path: Path, name: str, method: str, cfg: str, *extra: str) -> tuple[dict, dict]:
    out = tmp_path / name
    proc = _infifpo_train("--method", method, "--config", cfg, "--output_dir", str(out), *extra)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((out / entry.TRAIN_LOG).read_text()), load_file(str(out / "model.safetensors"))


def _steps(log: dict) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in NOT_COMPARED} for h in log["log_history"] if "loss" in h]


def max_log_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest |a - b| over every logged number of every step, and where; the steps must log the same keys."""
    steps_a, steps_b = _steps(a), _steps(b)
    assert len(steps_a) == len(steps_b) == 3
    worst = (0.0, "")
    for i, (ha, hb) in enumerate(zip(steps_a, steps_b, strict=True)):
        assert set(ha) == set(hb), set(ha) ^ set(hb)
        worst = max([worst, *((abs(ha[k] - hb[k]), f"step {i + 1} {k}") for k in ha)])
    return worst


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize(("method", "metric"), [("infifpo", "fusion/chosen_share/m0"), ("wrpo", "rewards/margins")])
def test_two_ranks_and_accumulation_match_one_process(tiny_llama, scored_jsonl, tmp_path, method, metric):
    cfg = _config(tmp_path, tiny_llama, scored_jsonl)
    single, w_single = _run(tmp_path, "single", method, cfg, "--per_device_train_batch_size", "4")
    ddp, w_ddp = _run(tmp_path, "ddp", method, cfg, "--per_device_train_batch_size", "2", "--num_processes", "2")
    accum, w_accum = _run(tmp_path, "accum", method, cfg, "--per_device_train_batch_size", "2",
                          "--gradient_accumulation_steps", "2")
    assert (single["world_size"], ddp["world_size"], accum["world_size"]) == (1, 2, 1)
    assert single["global_batch_size"] == ddp["global_batch_size"] == accum["global_batch_size"] == 4
    assert single["num_train_rows"] == 12 and single["precision"] == ddp["precision"] == "fp32"

    initial = load_file(str(Path(tiny_llama) / "model.safetensors"))
    assert max_weight_diff(w_single, initial) > 1e-4  # the runs trained, so agreeing weights are not vacuous
    losses = [h["loss"] for h in _steps(single)]
    assert len(set(losses)) == 3  # three different batches
    for other, w_other, label in ((ddp, w_ddp, "2 ranks"), (accum, w_accum, "grad accumulation")):
        diff, where = max_log_diff(single, other)
        w_diff = max_weight_diff(w_single, w_other)
        print(f"{method} {label} vs 1 process: max |logged diff| {diff:.2e} ({where}), max |weight diff| {w_diff:.2e}")
        assert diff <= TOL, f"{label}: {where} differs by {diff}"
        assert w_diff <= TOL, f"{label}: final weights differ by {w_diff}"
        assert all(metric in h for h in _steps(other))  # the gathered metric was logged at every step


def test_a_failing_rank_fails_the_command(tiny_llama, tiny_tok, tmp_path):
    rows = make_scored_rows(tiny_tok, 4, k=2)
    rows[3]["rejected"] = rows[3]["chosen"]  # ScoredPairsError, raised inside every launched rank
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(tmp_path, tiny_llama, str(data))
    proc = _infifpo_train("--method", "infifpo", "--config", cfg, "--output_dir", str(tmp_path / "o"),
                          "--per_device_train_batch_size", "2", "--num_processes", "2")
    assert proc.returncode == 1
    assert "ScoredPairsError" in proc.stderr and "chosen == rejected" in proc.stderr
    assert not (tmp_path / "o" / entry.TRAIN_LOG).exists()
