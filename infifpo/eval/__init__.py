"""Evaluation: benchmark accuracies with confidence intervals (the eval stage of `infifpo eval` is
``infifpo.eval.stage``; `infifpo eval --model M --benchmarks ...` composes the stages: ``infifpo.evaluate``).

Modules: ``stage`` (judged greedy samples of benchmark items -> per-item rows and scores.json; it imports no other
stage), ``stats`` (Wilson and normal intervals, paired bootstrap), ``lm_eval_adapter`` (lm-evaluation-harness tasks
when installed). Nothing is imported here, so ``infifpo.eval.stats`` stays cheap to import (no torch, no
transformers).
"""
