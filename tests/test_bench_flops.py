"""The scorer benchmark's FLOP count for attention (bench/bench_score.py), against pairs counted from explicit
masks."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_score import attention_flops  # noqa: E402


def _pairs(width: int, window: int | None) -> int:
    """Query-key pairs a causal (optionally sliding-window) mask keeps, counted from the mask itself."""
    q, k = torch.arange(width)[:, None], torch.arange(width)[None, :]
    keep = k <= q
    if window is not None:
        keep &= q - k < window
    return int(keep.sum())


@pytest.mark.parametrize("width", [1, 3, 7, 12])
def test_attention_flops_counts_causal_and_sliding_window_pairs(width: int) -> None:
    config = SimpleNamespace(num_attention_heads=3, head_dim=8, hidden_size=99, num_hidden_layers=3, sliding_window=4,
                             layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    pairs = 2 * _pairs(width, 4) + _pairs(width, None)
    assert attention_flops(config, batch=5, width=width) == 4 * 3 * 8 * pairs * 5


def test_attention_flops_without_layer_types_or_head_dim_is_full_causal() -> None:
    # Llama-style config: no layer_types, head_dim = hidden_size / heads; 6 positions keep 21 pairs per layer.
    config = SimpleNamespace(num_attention_heads=4, hidden_size=64, num_hidden_layers=2)
    assert attention_flops(config, batch=1, width=6) == 4 * 4 * 16 * 21 * 2
