"""What a stage output was built from: the content digests of its inputs, and the check that two inputs joined by id
come from the same data.

Owns: the digest rules every stage records in its output's key (``meta.json``) and compares, and
``InputMismatchError``. Does not own: the on-disk layout (`store`) or model identity (``models.model_identity``).

Stages join by id (judge: samples to prompts; pair: judged samples to prompts). An id names a row, not its content:
a prompts file edited, re-generated or replaced by another of the same name can give an id to another prompt. So each
output records the digest of what it was built from, and a stage that joins two inputs checks that they agree:

- ``prompt_set_digest(rows)``: the prompts a samples output was drawn from, (id, messages) pairs sorted by id: what
  sampling depends on. `sample` records it under ``prompts``; `judge` refuses samples whose record differs from the
  digest of its ``--prompts`` (a corrected gold answer keeps it, so fixing an answer re-judges, never re-samples).
- ``output_digest(path)``: the whole content of a finished stage output (its ``_SUCCESS`` checksums, hashed) or of a
  file (sha256). `judge` records its prompts' under ``prompts``; `pair` refuses judged outputs whose record differs
  from the digest of its ``--prompts`` (verdicts come from the gold answers, so here every column counts).
- ``rows_digest(rows)``: canonical JSON of rows sorted by id, for inputs that arrive as rows.

Every digest of an input is part of the output's key, so an existing output is never reused for other input content:
other content is another directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from infifpo.store import SUCCESS, StoreError, file_sha256, fingerprint


class InputMismatchError(StoreError):
    """Two inputs joined by id were built from different data (e.g. samples drawn from other prompts than the
    ``--prompts`` given). The message names the input, its recorded and current digests, and what to do."""


def output_digest(path: str | os.PathLike) -> str:
    """The content digest of a finished stage output directory (its ``_SUCCESS`` checksums) or of a file (sha256)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    require_exists(path)
    marker = path / SUCCESS
    if not marker.is_file():
        raise StoreError(f"{path}: output is incomplete (no {SUCCESS}); re-run the stage that writes it to resume.")
    return fingerprint(json.loads(marker.read_text()))


def require_exists(path: str | os.PathLike) -> None:
    """StoreError (as ``store.read_output`` words it) when input ``path`` does not exist: a mistyped path is not an
    incomplete output or one of unknown provenance."""
    if not Path(path).exists():
        raise StoreError(f"{path}: does not exist; give the directory a stage printed, or run the stage that "
                         "writes it.")


def rows_digest(rows: Iterable[dict[str, Any]]) -> str:
    """The digest of rows' full content, independent of their order (rows sorted by id)."""
    return fingerprint(sorted(rows, key=lambda r: str(r["id"])))


def prompt_set_digest(rows: Iterable[dict[str, Any]]) -> str:
    """The digest of the prompts a samples output is drawn from: (id, messages) pairs sorted by id."""
    return fingerprint(sorted(([r["id"], r["prompt"]] for r in rows), key=lambda p: str(p[0])))


def recorded(path: str | os.PathLike, field: str) -> Any:
    """The digest an output recorded in its key under ``field`` (``meta.json``), or None if it recorded none."""
    meta = Path(path) / "meta.json"
    try:
        return json.loads(meta.read_text()).get("key", {}).get(field)
    except (OSError, ValueError):
        return None


def require_built_from(path: str | os.PathLike, field: str, current: str, *, what: str, given: str, fix: str) -> None:
    """Raise InputMismatchError unless output ``path`` recorded ``current`` under ``field``: it was built from the
    ``what`` (e.g. "prompts") that ``given`` (e.g. "--prompts DIR") holds now. ``fix``: what the user should do."""
    require_exists(path)
    was = recorded(path, field)
    if was == current:
        return
    if was is None:
        raise InputMismatchError(f"{what} unknown: {path} records no digest of the {what} it was built from (written "
                                 f"by hand or by an older infifpo), so joining it by id with {given} ({what} "
                                 f"{current}) cannot be checked. {fix}")
    raise InputMismatchError(f"{what} changed: {path} was built from {what} {was}, but {given} holds {what} "
                             f"{current}; joining them by id would attach rows to the wrong {what}. {fix}")
