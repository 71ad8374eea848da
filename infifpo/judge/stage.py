"""Stage `judge`: samples -> judged samples (verifier verdict, reward-model score, and the reason for both).

Owns: joining samples to prompts by ``prompt_id`` (refused with ``provenance.InputMismatchError`` unless the samples
were drawn from exactly these prompts), choosing the verifier by the prompt's domain (math: gold
``answer``; code: ``tests`` / ``entry_point`` in the sandbox; general: none), reward-model scoring (with a reward
model, every sample of every domain gets a reward besides any verdict: ``infifpo pair --rank_by reward``, the paper's
recipe, ranks by it alone), and the resumable ``judged`` stage output (columns ``schema.JUDGED_COLUMNS``, one
output per samples output, keyed by the inputs' checksums and the judge settings). Does not own: the checks
themselves (`math`, `code`, `reward_model`) or pairing.

    infifpo judge --samples DIR [DIR ...] --prompts DIR [--out ROOT] [--reward_model X] [--workers N]

or the same options as keys of ``--config FILE`` (``JudgeOptions``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from infifpo.config import parse_config
from infifpo.judge.code import judge_code
from infifpo.judge.math import judge_math
from infifpo.models.resolve import model_identity
from infifpo.provenance import output_digest, prompt_set_digest, require_built_from
from infifpo.schema import JUDGED_COLUMNS, SAMPLE_COLUMNS, ConfigError, validate_prompts, validate_samples
from infifpo.store import StageOutput, announce, read_output

logger = logging.getLogger(__name__)

JUDGE_VERSION = 2  # bump when a verdict for the same inputs would change (extraction rules, sandbox harness)
Row = dict[str, Any]


def _prompt_imports(prompt: Row) -> str:
    """Import lines of the code shown in the prompt (HumanEval's ``from typing import List``), which answers often
    omit although their signatures use them; prepended to the extracted program as evalplus does."""
    text = "\n".join(m["content"] for m in prompt["prompt"] if m.get("role") == "user")
    lines = [ln for ln in text.splitlines() if re.match(r"^(?:import \w|from [\w.]+ import )", ln)]
    return "".join(ln + "\n" for ln in dict.fromkeys(lines))


def verify_sample(sample: Row, prompt: Row, *, code_timeout: float = 10.0) -> tuple[bool | None, str]:
    """(correct, reason) for one sample: math via the gold answer, code via the tests, None when nothing applies."""
    domain = prompt["domain"]
    if domain == "math" and prompt.get("answer") is not None:
        v = judge_math(sample["text"], prompt["answer"])
        correct, reason = v.correct, f"math: {v.reason} (extracted {v.extracted!r} by {v.method})"
    elif domain == "code" and prompt.get("tests"):
        v = judge_code(sample["text"], prompt["tests"], prompt.get("entry_point"), code_timeout,
                       prefix=_prompt_imports(prompt))
        correct, reason = v.passed, f"code: {v.reason}"
    else:
        correct, reason = None, f"{domain}: no verifier (no gold answer or tests)"
    if sample["finish_reason"] != "stop":
        reason += f"; note: finish_reason={sample['finish_reason']} (truncated or failed generation)"
    return correct, reason


def judge_rows(
    samples: Sequence[Row], prompts: Sequence[Row], *, reward_model: str | tuple[Any, Any] | None = None,
    workers: int = 1, code_timeout: float = 10.0, batch_size: int = 64, rm_batch_size: int = 8,
    on_batch: Callable[[list[Row]], None] | None = None, progress: bool = True,
) -> list[Row]:
    """Judged rows (samples' columns + correct, reward, judge_reason) in the order of ``samples``.

    Samples join prompts by ``prompt_id``. ``reward_model``: a path / hub id or a loaded (model, tokenizer) pair
    that scores every sample, whatever its domain; None leaves ``reward`` None. ``workers`` threads run the
    verifiers (code runs in separate sandboxed processes).
    ``on_batch`` receives every finished batch of ``batch_size`` rows (the stage appends them to its output).
    """
    by_id = validate_prompts(prompts)
    validate_samples(samples, by_id)
    rm = None
    if reward_model is not None and samples:
        from infifpo.judge.reward_model import load_reward_model, score_with_reward_model  # imports torch

        rm = load_reward_model(reward_model) if isinstance(reward_model, str) else reward_model
    judged: list[Row] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(samples), desc="judge", unit="sample", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            batch = list(samples[start : start + batch_size])
            verdicts = list(pool.map(lambda s: verify_sample(s, by_id[s["prompt_id"]], code_timeout=code_timeout),
                                     batch))
            rewards: list[float | None] = [None] * len(batch)
            if rm is not None:
                rewards = score_with_reward_model([by_id[s["prompt_id"]]["prompt"] for s in batch],
                                                  [s["text"] for s in batch], rm, rm_batch_size, progress=False)
            rows = [dict(zip(JUDGED_COLUMNS, [*(s[c] for c in SAMPLE_COLUMNS), ok, r, why], strict=True))
                    for s, (ok, why), r in zip(batch, verdicts, rewards, strict=True)]
            if on_batch is not None:
                on_batch(rows)
            judged.extend(rows)
            bar.update(len(batch))
    return judged


def reward_model_key(model: str | None) -> dict[str, Any] | None:
    """What determines the rewards: the hub id, or a local directory's ``models.model_identity``."""
    if model is None:
        return None
    path = Path(model)
    return {"identity": model_identity(path)} if path.is_dir() else {"hub_id": model}


def judged_output(samples_dir: str, prompts_dir: str, out_root: str, settings: dict[str, Any]) -> StageOutput:
    """The StageOutput of the judged version of one samples output, keyed by both inputs' content and the settings.

    ``prompts`` records the digest of the whole prompts output (gold answers and tests included), which `infifpo
    pair` compares with its ``--prompts``."""
    key = {"stage": "judge", "version": JUDGE_VERSION, "samples": output_digest(samples_dir),
           "prompts": output_digest(prompts_dir), **settings}
    base = re.sub(r"-[0-9a-f]{12}$", "", Path(samples_dir).resolve().name)  # drop the samples' own fingerprint
    model_part = re.sub(r"^samples-?", "", base)
    return StageOutput(out_root, f"judged-{model_part}" if model_part else "judged", key)


def _default_workers() -> int:
    """Verifier threads when none are asked for: up to 4, at most one per CPU."""
    return min(4, os.cpu_count() or 1)


@dataclass
class JudgeOptions:
    """The options of `infifpo judge` (``--config FILE`` and flags, ``infifpo.config``)."""

    samples: list[str] = field(metadata={"help": "samples stage output directories"})
    prompts: str = field(metadata={"help": "the prompts stage output the samples were drawn from"})
    out: str = field(default="runs", metadata={"help": "root directory of stage outputs"})
    reward_model: str | None = field(default=None, metadata={
        "help": "sequence-classification reward model that scores every sample: dir or hub id"})
    workers: int = field(default_factory=_default_workers, metadata={"help": "verifier threads"})
    code_timeout: float = field(default=10.0, metadata={"help": "wall seconds per sandboxed code test run"})
    batch_size: int = field(default=64, metadata={"help": "rows judged (and written) per batch"})
    rm_batch_size: int = field(default=8, metadata={"help": "reward-model batch size"})

    def __post_init__(self) -> None:
        for name in ("batch_size", "rm_batch_size", "code_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"infifpo judge: {name} must be positive, got {getattr(self, name)!r}.")


def main(argv: list[str] | None = None) -> int:
    """`infifpo judge --samples DIR [DIR ...] --prompts DIR [--out ROOT] [--reward_model X] [--workers N]
    [--config FILE]`."""
    opts = parse_config(JudgeOptions, argv, prog="infifpo judge",
                        description="Label samples: verifiers and reward models.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prompts = read_output(opts.prompts)
    drawn_from = prompt_set_digest(prompts)
    for samples_dir in opts.samples:  # every input checked before anything is written
        require_built_from(samples_dir, "prompts", drawn_from, what="prompts", given=f"--prompts {opts.prompts}",
                           fix=f"Pass the prompts output {samples_dir} was sampled from, or sample again from "
                               f"{opts.prompts} (`infifpo sample --prompts {opts.prompts}`).")
    settings = {"reward_model": reward_model_key(opts.reward_model), "code_timeout": opts.code_timeout}
    rm = None
    for samples_dir in opts.samples:
        out = judged_output(samples_dir, opts.prompts, opts.out, settings).lock()
        if out.is_complete():
            logger.info("%s already judged with these settings; reusing %s", samples_dir, out.path)
            announce(out.path)
            continue
        done = out.done_ids()
        todo = [s for s in read_output(samples_dir) if s["id"] not in done]
        logger.info("judging %d samples of %s (%d already done)", len(todo), samples_dir, len(done))
        if opts.reward_model and rm is None and todo:
            from infifpo.judge.reward_model import load_reward_model  # imports torch: only when asked for

            rm = load_reward_model(opts.reward_model)
        with out.open_shard() as writer:
            rows = judge_rows(todo, prompts, reward_model=rm, workers=opts.workers, code_timeout=opts.code_timeout,
                              batch_size=opts.batch_size, rm_batch_size=opts.rm_batch_size, on_batch=writer.write)
        out.finalize()
        truncated = sum(r["finish_reason"] == "length" for r in rows)
        verdicts = [r["correct"] for r in rows if r["correct"] is not None]
        announce(out.path, summary=f"{samples_dir}: judged={len(rows)} verified={len(verdicts)} "
                                   f"correct={sum(verdicts)} truncated={truncated}")
    return 0
