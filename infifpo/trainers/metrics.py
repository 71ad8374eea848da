"""The fusion diagnostics every fused-reference trainer logs: which candidate f(y) came from, per method.

Owns: the candidate names of a fusion (the sources, then "pivot" when it is a candidate) and the per-pair share
metrics ``<prefix>/<name>``: the weight of each candidate in f(y), averaged over the logging window, so a source
that never wins a max-margin selection, or gets little confidence or uncertainty weight, shows as a share near 0 for
every fusion method alike. Does not own: the fusion itself (``infifpo.fusion``) or gathering across ranks
(``forward``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from infifpo.fusion import FusionInfo


def candidate_names(source_names: Sequence[str], include_pivot: bool, num_candidates: int) -> list[str]:
    """The names of a fusion's K' candidates: the source names (``src<i>`` when their count does not match), then
    "pivot" when the initial pivot is a candidate."""
    k = num_candidates - (1 if include_pivot else 0)
    names = list(source_names) if len(source_names) == k else [f"src{i}" for i in range(k)]
    return names + (["pivot"] if include_pivot else [])


def share_metrics(info: FusionInfo, names: Sequence[str], prefix: str, batch_size: int,
                  sides: Sequence[str] = ("chosen",)) -> dict[str, torch.Tensor]:
    """{f"{prefix}/{name}": (B,) weight of that candidate in f(y)} for each side; with two sides the keys are
    ``{prefix}/{side}_share/{name}`` (fractions in [0, 1] that sum to 1 over the candidates)."""
    out = {}
    for side in sides:
        shares = info.shares(side, batch_size)
        key = prefix if len(sides) == 1 else f"{prefix}/{side}_share"
        for k, name in enumerate(names):
            out[f"{key}/{name}"] = shares[:, k]
    return out
