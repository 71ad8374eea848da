"""Evaluation: benchmark accuracies with confidence intervals (`infifpo eval` is ``infifpo.eval.stage``).

Modules: ``stage`` (generation through the sample stage, judging, per-item rows and scores.json), ``stats`` (Wilson
and normal intervals, paired bootstrap), ``lm_eval_adapter`` (lm-evaluation-harness tasks when installed). Nothing is
imported here, so ``infifpo.eval.stats`` stays cheap to import (no torch, no transformers).
"""
