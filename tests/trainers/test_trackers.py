"""`report_to` with the two local experiment trackers (the `tracking` extra): an InfiFPO run through `infifpo train`
logs every step to TensorBoard / Trackio, and what each tracker's own reader gives back is the trainer's
``state.log_history``, value for value and step for step. Offline: the runs write under tmp_path and open no socket.
"""

from __future__ import annotations

import importlib
import math
import socket
import sys

import pytest

from tests.trainers.test_entry import FAST, _train, _yaml, pairs_jsonl  # noqa: F401  (module fixture shared)

STEPS = 3
# InfiFPO's own metrics (infifpo/trainers/infifpo.py `_log_step`) besides TRL's loss; TRL's log has them bare, the
# trackers under the train/ prefix (transformers' rewrite_logs).
INFIFPO_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "fusion/margin", "fusion/clip_rate",
                "fusion/chosen_share/m0")
# The end-of-training summary TrackioCallback does not log per step (transformers' `single_value_scalars`).
RUN_TOTALS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open an internet socket (the hub, a Space, a dashboard) fails the test."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test_trackers: network access to {address!r}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda sock, address: connect(sock, address) or 0)
    yield attempts
    assert not attempts, f"a tracker tried to reach the network: {attempts}"


def _run(tmp_path, tiny_llama, pairs_jsonl, tracker: str, **keys):  # noqa: F811
    cfg = _yaml(tmp_path, model_name_or_path=tiny_llama, dataset_name=pairs_jsonl, output_dir=str(tmp_path / "o"),
                **{**FAST, "max_steps": STEPS, "logging_steps": 1, "report_to": tracker, **keys})
    trainer, losses, _ = _train(["--method", "infifpo", "--config", cfg])
    assert trainer.args.report_to == [tracker]
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    assert all(k in h for h in steps for k in INFIFPO_KEYS), "InfiFPO's metrics are missing from log_history"
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) > 1  # values that tell the steps apart
    return trainer.state.log_history


def _numeric(entry: dict) -> dict[str, float]:
    """The per-step scalars a tracker gets from one log_history entry, under the name it gets them."""
    return {f"train/{k}": float(v) for k, v in entry.items() if k != "step" and isinstance(v, int | float)}


def test_tensorboard_event_files_hold_the_log_history(tiny_llama, pairs_jsonl, tmp_path, monkeypatch,  # noqa: F811
                                                      no_network):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    history = _run(tmp_path, tiny_llama, pairs_jsonl, "tensorboard")

    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    read = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    # Every scalar of every log_history entry (the end-of-training summary too), at the trainer's step; nothing else.
    expected = {}
    for entry in history:
        for tag, value in _numeric(entry).items():
            expected.setdefault(tag, {})[entry["step"]] = value
    assert set(read) == set(expected)
    for tag, by_step in expected.items():
        assert read[tag] == pytest.approx(by_step, rel=1e-6, abs=1e-7), tag  # TensorBoard stores float32
    for key in INFIFPO_KEYS:
        assert sorted(read[f"train/{key}"]) == list(range(1, STEPS + 1)), key


@pytest.fixture
def fresh_trackio(tmp_path, monkeypatch):
    """trackio, imported afresh with ``TRACKIO_DIR`` under tmp_path. trackio reads the variable once, at import
    (``trackio.utils.TRACKIO_DIR``), and TRL imports it as soon as a trainer module loads (trl/extras/profiling.py),
    so the copy already here would write to ``$HF_HOME/trackio``. Modules that hold the old copy as a global (TRL's)
    see the fresh one for the test; the old modules are put back afterwards. No Space or server: their variables
    are cleared."""
    old = pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID",
                "TRACKIO_WRITE_TOKEN", "TRACKIO_WEBHOOK_URL"):
        monkeypatch.delenv(var, raising=False)

    def ours() -> list[str]:
        return [n for n in sys.modules if n == "trackio" or n.startswith("trackio.")]

    def repoint(src, dst) -> None:
        for module in list(sys.modules.values()):  # their own globals only: a lazy module's getattr imports
            if getattr(module, "__dict__", {}).get("trackio") is src:
                module.trackio = dst

    before = {n: sys.modules.pop(n) for n in ours()}
    fresh = None
    try:
        fresh = importlib.import_module("trackio")
        assert fresh is not old and tmp_path / "trackio" == fresh.utils.TRACKIO_DIR
        repoint(old, fresh)
        yield fresh
    finally:
        if fresh is not None:
            repoint(fresh, old)  # also modules first imported during the test
        for n in ours():
            del sys.modules[n]
        sys.modules.update(before)


def test_trackio_database_holds_the_log_history(tiny_llama, pairs_jsonl, tmp_path, fresh_trackio,  # noqa: F811
                                                no_network):
    from trackio.sqlite_storage import SQLiteStorage

    history = _run(tmp_path, tiny_llama, pairs_jsonl, "trackio", project="infifpo-trackers", run_name="tiny-infifpo")

    assert fresh_trackio.context_vars.current_run.get() is None  # the callback finished the run
    assert (tmp_path / "trackio" / "infifpo-trackers.db").is_file()
    assert [r.name for r in fresh_trackio.Api().runs("infifpo-trackers")] == ["tiny-infifpo"]
    logs = SQLiteStorage.get_logs("infifpo-trackers", "tiny-infifpo")
    # One trackio row per log_history entry, in order, with the trainer's step as train/global_step (trackio's own
    # step counts rows from 0); the summary's run totals (train_runtime, train_loss, ...) are left out by
    # transformers' TrackioCallback, its epoch is kept.
    assert [row["train/global_step"] for row in logs] == [h["step"] for h in history]
    assert [row["step"] for row in logs] == list(range(len(history)))
    for row, entry in zip(logs, history, strict=True):
        expected = {k: v for k, v in _numeric(entry).items() if k.removeprefix("train/") not in RUN_TOTALS}
        assert set(row) - {"step", "timestamp", "train/global_step"} == set(expected), entry["step"]
        assert {k: row[k] for k in expected} == expected, entry["step"]  # stored as JSON: float64, exactly
