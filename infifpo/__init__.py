"""infifpo: fuse heterogeneous LLMs into one pivot model during preference alignment (InfiFPO, WRPO, fused OPD).

The public API is imported lazily so that `import infifpo` stays cheap and never pulls TRL or vLLM by itself.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "InfiFPOConfig": "infifpo.trainers.infifpo",
    "InfiFPOTrainer": "infifpo.trainers.infifpo",
    "WRPOConfig": "infifpo.trainers.wrpo",
    "WRPOTrainer": "infifpo.trainers.wrpo",
    "FusedDistillationConfig": "infifpo.trainers.opd",
    "FusedDistillationTrainer": "infifpo.trainers.opd",
    "resolve_model": "infifpo.models.resolve",
    "score_responses": "infifpo.score.stage",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'infifpo' has no attribute {name!r}")
