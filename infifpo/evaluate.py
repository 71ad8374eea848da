"""`infifpo eval`: evaluate a model on benchmarks in one command, or summarise judged samples (the eval stage).

    infifpo eval --model M [--benchmarks SPEC ...] [--label L] [--backend vllm|transformers] [--max_tokens 256]
                 [--seed 0] [--out ROOT] [--lm_eval TASK ...]
    infifpo eval --samples DIR --judged DIR --prompts DIR [DIR ...] --model M [--label L] [--out ROOT]

The first form composes the stages through files, each in its own process (``pipeline.eval_prompts`` and
``pipeline.evaluate_model``, as the pipeline does for every report row): `infifpo prompts` (one output per benchmark
spec, and one of them all), `infifpo sample` (greedy), `infifpo judge`, then the second form, the eval stage itself
(``infifpo.eval.stage``), which summarises. Every step is content-addressed and resumable, so the same command skips
finished work and resumes a killed run.

Owns: choosing the form (the stage's when any of its own options, --samples, --judged or --prompts, is given on the
command line or in --config) and the first form's checks before any stage runs (lm-eval installed, the model found).
Does not own: the composition (``infifpo.pipeline``) or any stage's logic.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import fields
from pathlib import Path

from infifpo import pipeline
from infifpo.config import config_path, parse_config, yaml_mapping
from infifpo.eval import stage
from infifpo.models.resolve import resolve_model
from infifpo.store import record_outputs

# The options of the stage form that the composed form does not take: any of them selects the stage.
STAGE_ONLY = sorted({f.name for f in fields(stage.EvalOptions)} - {f.name for f in fields(pipeline.EvaluateOptions)})
DESCRIPTION = ("\n\n".join(__doc__.split("\n\n")[:2]) + "\n\nThe second form (the eval stage, what the pipeline runs "
               f"per report row) takes {', '.join('--' + o for o in STAGE_ONLY)}: `infifpo eval --judged DIR --help` "
               "lists its options. These are the first form's:")


def stage_form(argv: list[str]) -> bool:
    """Whether ``argv`` asks for the eval stage itself: one of ``STAGE_ONLY`` as a flag (either spelling) or as a key
    of its ``--config`` YAML."""
    flags = {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    path = config_path(argv)
    return bool(flags.intersection(STAGE_ONLY) or (path is not None and set(yaml_mapping(path)) & set(STAGE_ONLY)))


def main(argv: list[str] | None = None) -> int:
    """`infifpo eval --model M --benchmarks SPEC ...` (composed), or the eval stage's own command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if stage_form(argv):
        return stage.main(argv)
    opts = parse_config(pipeline.EvaluateOptions, argv, prog="infifpo eval", description=DESCRIPTION)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if opts.lm_eval:
        from infifpo.eval.lm_eval_adapter import require_lm_eval

        require_lm_eval()
    resolve_model(opts.model)  # a ModelLoadError now, not after the prompts are built
    dirs = (Path(opts.out), Path(opts.out) / "logs")
    prompts, benchmarks = pipeline.eval_prompts(opts.benchmarks, opts.seed, dirs, None)
    path = pipeline.evaluate_model(opts, prompts, benchmarks, dirs, None)
    stage.log_scores(stage.read_scores(path))
    print(path)
    record_outputs(path)
    return 0
