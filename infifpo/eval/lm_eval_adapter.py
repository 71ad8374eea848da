"""lm-evaluation-harness tasks (the rest of the paper's benchmarks) on the same checkpoint, as `infifpo eval` entries.

Owns: checking that ``lm_eval`` is importable (an optional package, ``pip install lm-eval``; a dev dependency, tested
against lm-eval 0.4.13 on a local task: tests/eval/test_lm_eval_real.py), calling its ``simple_evaluate`` with its
transformers ("hf") model on the checkpoint directory (its own tasks, plus task YAMLs under ``include_path``), and
converting its results dict into our per-benchmark entry (``n``, ``correct``, ``accuracy`` in percent, ``ci95`` from
the reported standard error as ±1.96·se, ``ci_method`` "normal"). Does not own: lm-eval's prompts, few-shot settings
or metrics (lm-eval's task defaults apply), or our own benchmarks (`infifpo.eval.stage`).

lm-eval's results dict (0.4.x): ``results[task]`` (or ``groups[task]`` for a group) maps ``"<metric>,<filter>"`` to a
value in [0, 1] and ``"<metric>_stderr,<filter>"`` to its standard error (or the string "N/A");
``n-samples[task]`` is ``{"original": int, "effective": int}`` (effective = after ``limit``); a group's items are
its subtasks' (``group_subtasks``).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Sequence
from os import PathLike
from typing import Any

from infifpo.eval.stats import normal_interval
from infifpo.schema import ConfigError, DataFormatError

logger = logging.getLogger(__name__)

# The score reported for a task: the first of these present. Accuracy for multiple choice, then GSM8K-style exact
# match (strict answer format first, as lm-eval's own leaderboard tables list it), then code pass@1.
METRIC_PREFERENCE = ("acc,none", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match,none",
                     "pass@1,create_test", "pass_at_1,none", "acc_norm,none")


def require_lm_eval() -> Any:
    """The imported ``lm_eval`` module, or ConfigError telling the user how to install it."""
    try:
        return importlib.import_module("lm_eval")
    except ImportError as e:
        raise ConfigError(
            f"--lm-eval needs lm-evaluation-harness, which is not importable here ({e}). Install it with "
            "`pip install lm-eval` (tasks may need extras, e.g. `pip install lm-eval[math]`), or drop --lm-eval."
        ) from None


def _block(results: dict[str, Any], task: str) -> dict[str, Any]:
    for section in ("results", "groups"):
        if task in (results.get(section) or {}):
            return results[section][task]
    found = sorted({*results.get("results", {}), *results.get("groups", {})})
    raise DataFormatError(f"lm-eval results have no entry for task {task!r}; tasks present: {found}.")


def _num_items(results: dict[str, Any], task: str) -> int:
    """Items scored for ``task``: its effective n-samples, or the sum over a group's subtasks."""
    counts = results.get("n-samples") or {}
    if task in counts:
        entry = counts[task]
        return int(entry.get("effective", entry.get("original")) if isinstance(entry, dict) else entry)
    subtasks = (results.get("group_subtasks") or {}).get(task)
    if subtasks:
        return sum(_num_items(results, t) for t in subtasks)
    raise DataFormatError(f"lm-eval results: no n-samples for task {task!r} (and it is not a group with subtasks).")


def convert_task(results: dict[str, Any], task: str) -> dict[str, Any]:
    """Our benchmark entry for one lm-eval task: n, correct, accuracy (percent), ci95 (percent), ci_method, metric.

    ``ci95`` is accuracy ± 1.96·stderr ("normal"); when lm-eval reports no standard error ("N/A", e.g. with
    ``bootstrap_iters=0``) it is None and ``ci_method`` is "none". Raises DataFormatError when the task or a known
    metric is missing.
    """
    block = _block(results, task)
    metric = next((m for m in METRIC_PREFERENCE if isinstance(block.get(m), int | float)), None)
    if metric is None:
        raise DataFormatError(f"lm-eval task {task!r}: none of the metrics {list(METRIC_PREFERENCE)} in its results "
                              f"(keys: {sorted(block)}).")
    value = float(block[metric])
    n = _num_items(results, task)
    name, _, filt = metric.partition(",")
    stderr = block.get(f"{name}_stderr,{filt}")
    accuracy = 100.0 * value
    if isinstance(stderr, int | float):
        ci, method = list(normal_interval(accuracy, 100.0 * float(stderr))), "normal"
    else:
        ci, method = None, "none"
    return {"n": n, "correct": round(value * n), "accuracy": accuracy, "ci95": ci, "ci_method": method,
            "metric": metric, "source": "lm-eval"}


def convert_results(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{task: entry} for every requested task (see ``convert_task``), in the order given."""
    return {task: convert_task(results, task) for task in tasks}


def run_lm_eval(model_dir: str, tasks: Sequence[str], *, batch_size: int | str = 8, limit: int | None = None,
                device: str | None = None, dtype: str = "auto", seed: int = 0,
                include_path: str | PathLike | Sequence[str | PathLike] | None = None) -> dict[str, dict[str, Any]]:
    """Run lm-eval's ``simple_evaluate`` with its "hf" model on ``model_dir`` and return our entries per task.

    ``limit``: items per task (None = all). ``device``: None picks "cuda" when available, else "cpu". Remote code
    stays off. ``include_path``: directories of further task YAMLs (lm-eval's ``--include_path``), indexed with its
    own tasks by a ``TaskManager`` given the model arguments as metadata, as ``simple_evaluate`` builds its default
    one. Raises ConfigError when lm-eval is not installed, or cannot take ``include_path``.
    """
    lm_eval = require_lm_eval()
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = dict(model="hf", model_args={"pretrained": model_dir, "dtype": dtype, "trust_remote_code": False},
                  tasks=list(tasks), batch_size=batch_size, device=device, limit=limit, log_samples=False,
                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    accepted = inspect.signature(lm_eval.simple_evaluate).parameters
    if include_path is not None:
        if "task_manager" not in accepted:
            raise ConfigError(f"lm-eval {getattr(lm_eval, '__version__', '?')}: simple_evaluate takes no "
                              "task_manager, so task directories (include_path) cannot be given; upgrade lm-eval.")
        paths = [str(include_path)] if isinstance(include_path, str | PathLike) else [str(p) for p in include_path]
        task_manager = importlib.import_module("lm_eval.tasks").TaskManager
        kwargs["task_manager"] = task_manager(include_path=paths, metadata=dict(kwargs["model_args"]))
    dropped = sorted(k for k in kwargs if k not in accepted)
    if dropped:  # older lm-eval releases lack the seed arguments; they seed with their own defaults
        logger.info("lm-eval %s: simple_evaluate does not take %s; using its defaults",
                    getattr(lm_eval, "__version__", "?"), dropped)
    logger.info("lm-eval: %s on %s (%s, limit %s)", ", ".join(tasks), model_dir, device, limit)
    results = lm_eval.simple_evaluate(**{k: v for k, v in kwargs.items() if k in accepted})
    if results is None:  # non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results (not the main process?)")
    return convert_results(results, tasks)
