"""`infifpo runs`: what a directory of stage outputs holds, and which stage and parameters made each one.

    infifpo runs [--dir runs] [--stage judge] [--json]

Every stage writes content-addressed directories (``<name>-<fingerprint>``, ``infifpo.store``); a 4-prompt trial
leaves a dozen of them. This lists each output under the given directories (searched ``MAX_DEPTH`` levels deep, so a
pipeline run directory's ``data/`` is found too): its stage, state (complete / partial / writing / damaged), rows,
last change, and the key it was built from (models, sampling, recipe options, input digests). ``--json`` prints
the full records (``store.describe_output``), one JSON list on stdout.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infifpo.config import parse_config
from infifpo.store import describe_output

MAX_DEPTH = 3
# Key fields worth a column, in this order; the rest is in --json.
SUMMARY_KEYS = ("model", "recipe", "pivot", "sources", "benchmarks", "sampling", "backend", "seed", "label")


@dataclass
class RunsOptions:
    dir: list[str] = field(default_factory=lambda: ["runs"], metadata={
        "help": "directories to search (a stage's --out root, a pipeline run_dir, or one output directory)"})
    stage: str | None = field(default=None, metadata={"help": "only outputs of this stage (prompts, sample, ...)"})
    json: bool = field(default=False, metadata={"help": "print the full records as one JSON list"})


def find_outputs(root: Path, depth: int = MAX_DEPTH) -> list[Path]:
    """Directories under ``root`` (itself included) that hold a stage output (a meta.json), sorted by path."""
    if (root / "meta.json").is_file():
        return [root]
    if depth == 0 or not root.is_dir():
        return []
    return sorted(p for child in root.iterdir() if child.is_dir() and not child.name.startswith(".")
                  for p in find_outputs(child, depth - 1))


def summary(key: Any) -> str:
    """The key fields of ``SUMMARY_KEYS`` present in ``key``, as ``k=v`` pairs (long values shortened)."""
    if not isinstance(key, dict):
        return ""
    parts = []
    for k in SUMMARY_KEYS:
        if key.get(k) not in (None, "", [], {}):
            text = json.dumps(key[k], separators=(",", ":"), default=str) if not isinstance(key[k], str) else key[k]
            parts.append(f"{k}={text if len(text) <= 60 else text[:57] + '...'}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    opts = parse_config(RunsOptions, sys.argv[1:] if argv is None else argv, prog="infifpo runs",
                        description=__doc__.split("\n\n")[0])
    records = [describe_output(p) for d in opts.dir for p in find_outputs(Path(d))]
    if opts.stage:
        records = [r for r in records if r["stage"] == opts.stage]
    if opts.json:
        print(json.dumps(records, indent=1, default=str))
        return 0
    if not records:
        print(f"no stage outputs under {', '.join(opts.dir)}", file=sys.stderr)
        return 0
    rows = [(r["stage"] or "?", r["status"], str(r["rows"]), (r["modified"] or "")[:19], r["path"],
             summary(r["key"])) for r in records]
    head = ("stage", "status", "rows", "modified", "path", "built from")
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(5)]
    for line in [head, *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(line[:5], widths, strict=True)) + "  " + line[5])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
