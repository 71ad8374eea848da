"""Checks of the stage config convention (`infifpo.config`) that each stage's tests run on its options class:
``--help`` lists every option with its help, a misspelt ``--config`` key is named with its suggestion, flags override
the YAML, dashed flags parse as the underscored ones, and the options class imports without torch, transformers, TRL
or vLLM.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infifpo.config import parse_config
from infifpo.schema import ConfigError

HEAVY = ("torch", "transformers", "trl", "vllm")


def help_lists_every_option(main: Callable[[list[str]], Any], options: type, capsys: pytest.CaptureFixture) -> None:
    """``main(["--help"])`` exits 0 and lists ``--config`` and every field of ``options`` (but yaml-only ones) with
    its help text."""
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    flat = "".join(out.split())  # help text is wrapped (at spaces and hyphens)
    fields = [f for f in dataclasses.fields(options) if f.init and not f.metadata.get("yaml_only")]
    assert fields
    for name in ["config", *(f.name for f in fields)]:
        assert re.search(rf"^\s+--{name}(?=[\s,])", out, re.M), f"--{name} not in --help:\n{out}"
    for f in fields:
        assert f.metadata.get("help") and "".join(f.metadata["help"].split()) in flat, f.name


def misspelt_key_is_named(main: Callable[[list[str]], Any], tmp_path: Path, wrong: str, right: str) -> None:
    """A ``--config`` YAML with the key ``wrong`` is a ConfigError naming it and suggesting ``right``, raised before
    the stage reads anything."""
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({wrong: 1}))
    named = rf"unknown key\(s\) in .*typo\.yaml: '{wrong}' \(did you mean '{right}'\?\)"
    with pytest.raises(ConfigError, match=named):
        main(["--config", str(path)])


def parse_with_yaml(options: type, tmp_path: Path, config: dict[str, Any], argv: list[str]) -> Any:
    """``options`` parsed from ``--config`` (a YAML of ``config``) followed by ``argv``."""
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(config))
    return parse_config(options, ["--config", str(path), *argv], prog="test")


def dashed_flags_parse_alike(options: type, argv: list[str]) -> Any:
    """``argv`` (underscored flags) and its dashed spelling give equal options; returns them."""
    dashed = [a.replace("_", "-") if a.startswith("--") else a for a in argv]
    assert dashed != argv, "argv has no multi-word flag"
    parsed = parse_config(options, argv, prog="test")
    assert parse_config(options, dashed, prog="test") == parsed
    return parsed


def imports_light(module: str, name: str) -> None:
    """``from module import name`` in a fresh interpreter imports none of ``HEAVY``."""
    code = (f"import sys\nfrom {module} import {name}\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\nassert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)
