"""PNG plots of training logs for `infifpo report`: loss and reward margin per method, and fused-reference shares.

Owns: turning TRL ``log_history`` lists (``infifpo_train_log.json``, docs/formats.md "Train log") into PNG files. Does
not own: finding or validating those logs (`report`). Imports matplotlib and the stdlib only, and never pyplot: figures
are built on ``matplotlib.figure.Figure`` with the Agg canvas, so no global backend or GUI state is touched.

Every function returns the written path, or None when the logs lack the keys it plots (the caller notes that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SHARE_PREFIX = {"chosen": "fusion/chosen_share/", "rejected": "fusion/rejected_share/"}


def series(log_history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every training log entry holding ``key`` and ``step``, in step order."""
    points = sorted((float(e["step"]), float(e[key])) for e in log_history
                    if isinstance(e, dict) and isinstance(e.get(key), int | float) and "step" in e)
    return [s for s, _ in points], [v for _, v in points]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_metric(histories: dict[str, list[dict[str, Any]]], key: str, path: Path, *, title: str,
                ylabel: str) -> Path | None:
    """One line per method (``histories``: display name -> log_history) of ``key`` against optimizer step."""
    lines = {name: series(h, key) for name, h in histories.items()}
    lines = {name: xy for name, xy in lines.items() if xy[0]}
    if not lines:
        return None
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for name, (steps, values) in lines.items():
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=name)
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def share_names(log_history: list[dict[str, Any]]) -> list[str]:
    """Candidate names (sources, and "pivot" when included) with a ``fusion/{chosen,rejected}_share/*`` key."""
    names: dict[str, None] = {}
    for entry in log_history:
        for key in entry if isinstance(entry, dict) else ():
            for prefix in SHARE_PREFIX.values():
                if key.startswith(prefix):
                    names[key[len(prefix):]] = None
    return list(names)


def plot_fusion_shares(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """Share (0-1) of pairs whose fused reference came from each candidate model, for y_w and y_l, per step."""
    names = share_names(log_history)
    if not names:
        return None
    fig = Figure(figsize=(10.0, 4.0))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (side, prefix) in zip(axes, SHARE_PREFIX.items(), strict=True):
        for i, name in enumerate(names):  # one colour per model in both panels
            steps, values = series(log_history, prefix + name)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=name,
                        color=f"C{i % 10}")
        if ax.get_lines():
            ax.legend()
        ax.set(title=f"fused reference of y_{'w' if side == 'chosen' else 'l'} ({side})", xlabel="optimizer step",
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of pairs")
    fig.tight_layout()
    return _save(fig, path)
