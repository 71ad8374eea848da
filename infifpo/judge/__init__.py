"""Judges: math answer checking, sandboxed code tests, reward-model scoring (the `infifpo judge` stage is `stage`).

Public API: ``check_math`` / ``judge_math``, ``check_code`` / ``judge_code``, ``run_sandboxed``,
``score_with_reward_model``. Imports are lazy so that ``check_math`` does not import torch and the math helper
process (``python -m infifpo.judge.math``) starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "check_math": "infifpo.judge.math",
    "judge_math": "infifpo.judge.math",
    "MathVerdict": "infifpo.judge.math",
    "check_code": "infifpo.judge.code",
    "judge_code": "infifpo.judge.code",
    "CodeVerdict": "infifpo.judge.code",
    "extract_program": "infifpo.judge.code",
    "run_sandboxed": "infifpo.judge.sandbox",
    "SandboxResult": "infifpo.judge.sandbox",
    "score_with_reward_model": "infifpo.judge.reward_model",
    "judge_rows": "infifpo.judge.stage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'infifpo.judge' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
