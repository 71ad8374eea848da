"""Trainers on TRL 1.16: InfiFPO (``trainers.infifpo``), WRPO (``trainers.wrpo``) and the `infifpo train` entry point.

Import the classes from their modules (or lazily from ``infifpo``); this package imports nothing heavy so that
`import infifpo.trainers.data` stays cheap. The packaged train YAMLs (one per method, the papers' settings) live in
``configs/`` beside this file and ship with the package; the accelerate launch configs are TRL's own
(``trl/accelerate_configs``, ``trainers.launch``).
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def packaged_config(method: str) -> Path:
    """The packaged train YAML of ``method`` (``infifpo/trainers/configs/<method>.yaml``), wherever infifpo is
    installed; `infifpo train` uses it when no ``--config`` is given."""
    return CONFIG_DIR / f"{method}.yaml"
