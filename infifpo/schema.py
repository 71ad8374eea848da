"""The hand-off formats between pipeline stages, and the named errors raised when data breaks them.

Owns: the column names of every on-disk dataset (prompts, samples, judged, pairs, scored pairs), the one check of
each hand-off every stage runs on its input (``validate_prompts``, ``validate_samples`` for samples and judged rows;
scored pairs: ``trainers.data.validate_preference_rows``, which also needs the tokenizer), and the exception
hierarchy. Does not own: reading/writing files
(`store`), or any model/tokenizer logic (`logprobs`, `models`).

Every stage output is a list of JSON rows keyed by a stable ``id``; stages join by id, never by order.

Formats (a column marked ``[K]`` is a list with one value per source model, in ``source_models`` order):

prompts
    id, prompt (chat messages, list of {role, content}), domain ("math" | "code" | "general"),
    answer (str | None: gold final answer), tests (str | None: test code), entry_point (str | None),
    source (dataset name)
samples
    id (= f"{prompt_id}|{model}|{sample_index}"), prompt_id, model, sample_index, completion_ids (token ids
    under the sampling model's tokenizer), text, finish_reason ("stop" | "length" | "error"),
    gen_logp (summed generation log-prob, nats; None on error rows), num_tokens, seed; rows with finish_reason
    "error" (prompt too long for the context, rejected by the chat template) also carry ``error`` (the message)
judged
    samples' columns + correct (bool | None: verifier verdict, None when no verifier applies),
    reward (float | None: reward-model score), judge_reason (str)
pairs
    id (= prompt id), prompt (messages), chosen / rejected (a one-message assistant list, TRL conversational
    format), split ("sft" | "po"), domain, chosen_model, rejected_model, chosen_reward, rejected_reward;
    WRPO rows add source_chosen (best source response, y_ws) and source_chosen_model; there ``chosen`` is the
    target's best response (y_wt) so that α = 0 is DPO on (chosen, rejected).
scored pairs
    pairs' columns + for every response column R in RESPONSE_COLUMNS present in the row:
    ref_R_logps (summed log-prob under the frozen pivot, nats), ref_mean_R_logps, ref_R_num_tokens,
    fuse_R_logps [K], fuse_mean_R_logps [K], fuse_R_num_tokens [K];
    with the transformers scorer also ref_mean_R_entropy and fuse_mean_R_entropy [K] (the mean over R's tokens of
    each model's next-token entropy, nats/token; ``entropy_columns``);
    plus pivot_model (str) and source_models [K].
    For R in (chosen, rejected) these are exactly the official InfiFPO columns (docs/methods.md) plus token counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DOMAINS = ("math", "code", "general")
FINISH_REASONS = ("stop", "length", "error")
SPLITS = ("sft", "po")
RESPONSE_COLUMNS = ("chosen", "rejected", "source_chosen")

PROMPT_COLUMNS = ("id", "prompt", "domain", "answer", "tests", "entry_point", "source")
SAMPLE_COLUMNS = (
    "id", "prompt_id", "model", "sample_index", "completion_ids", "text", "finish_reason", "gen_logp",
    "num_tokens", "seed",
)
JUDGED_COLUMNS = SAMPLE_COLUMNS + ("correct", "reward", "judge_reason")
PAIR_COLUMNS = (
    "id", "prompt", "chosen", "rejected", "split", "domain", "chosen_model", "rejected_model", "chosen_reward",
    "rejected_reward",
)


def sample_id(prompt_id: str, model: str, sample_index: int) -> str:
    """The stable id of one sample: prompt id, model name and sample index."""
    return f"{prompt_id}|{model}|{sample_index}"


def ref_columns(response: str) -> tuple[str, str, str]:
    """(sum, mean, token count) column names of the frozen pivot's log-prob of response column ``response``."""
    return f"ref_{response}_logps", f"ref_mean_{response}_logps", f"ref_{response}_num_tokens"


def fuse_columns(response: str) -> tuple[str, str, str]:
    """(sum [K], mean [K], token count [K]) column names of the sources' log-probs of ``response``."""
    return f"fuse_{response}_logps", f"fuse_mean_{response}_logps", f"fuse_{response}_num_tokens"


def entropy_columns(response: str) -> tuple[str, str]:
    """(pivot, sources [K]) column names of the mean next-token entropy (nats/token) over ``response``'s tokens."""
    return f"ref_mean_{response}_entropy", f"fuse_mean_{response}_entropy"


class InfiFPOError(Exception):
    """Base class of every error infifpo raises about user data, models or configuration."""


class DataFormatError(InfiFPOError, ValueError):
    """A dataset row or column does not match its hand-off format. The message names the row and field."""


class ScoredPairsError(DataFormatError):
    """A scored-pairs row is unusable for training (missing, non-finite or inconsistent log-probs)."""


class MissingEntropyError(ScoredPairsError):
    """Scored pairs lack the per-response entropy columns (``entropy_columns``) that ``uncertainty`` fusion needs:
    scored before they existed, or by the vLLM scorer, which cannot compute them."""


class ModelLoadError(InfiFPOError, RuntimeError):
    """A model could not be resolved or loaded. The message names the model and the fix."""


class ChatTemplateError(InfiFPOError, ValueError):
    """A tokenizer has no chat template, or the template rejects / mangles a conversation."""


class SandboxUnavailableError(InfiFPOError, RuntimeError):
    """Code execution was requested but OS-level isolation is unavailable; infifpo refuses to run it unsandboxed."""


class StageFailedError(InfiFPOError, RuntimeError):
    """A stage that `infifpo pipeline` ran exited with an error; the message carries the stage's own error line and
    its log file."""


class EmptyOutputError(InfiFPOError, ValueError):
    """A stage's inputs gave no rows at all (nothing to hand on); the message says what dropped them."""


class ConfigError(InfiFPOError, ValueError):
    """A configuration key or value is invalid (unknown key, wrong type, inconsistent options)."""


class MergeInputError(InfiFPOError, ValueError):
    """Models given to `infifpo merge` cannot be merged element by element: another architecture, other parameter
    names or shapes than the base's, or no safetensors weights. The message names the model and the fix."""


class SelectorError(InfiFPOError, ValueError):
    """A `learned`-fusion selector checkpoint (`infifpo selector`) does not fit what it is used with: scored pairs of
    another pool (other source names or order, another pivot), other fusion options, or missing feature columns."""


def row_label(index: int, row: dict[str, Any]) -> str:
    """A human-readable label for a row in error messages: its index and, when present, its id."""
    rid = row.get("id") if isinstance(row, dict) else None
    return f"row {index}" + (f" (id={rid!r})" if rid is not None else "")


def require_columns(row: dict[str, Any], columns: Sequence[str], index: int, fmt: str) -> None:
    """Raise DataFormatError naming the row and the missing columns if ``row`` lacks any of ``columns``."""
    missing = [c for c in columns if c not in row]
    if missing:
        raise DataFormatError(
            f"{row_label(index, row)}: missing column(s) {missing} for the {fmt} format; "
            f"found {sorted(row)}. Expected at least {list(columns)} (see infifpo/schema.py)."
        )


def check_messages(value: Any, index: int, row: dict[str, Any], field: str) -> None:
    """Raise DataFormatError unless ``value`` is a non-empty list of {role, content: str} chat messages."""
    where = f"{row_label(index, row)}, field {field!r}"
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}: expected a non-empty list of chat messages, got {type(value).__name__}.")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataFormatError(f"{where}: message {j} must be a dict with 'role' and 'content', got {m!r:.80}.")
        if not isinstance(m["content"], str):
            raise DataFormatError(
                f"{where}: message {j} content must be a string, got {type(m['content']).__name__} "
                "(nested dicts such as {{'answer':..., 'score':...}} are not responses)."
            )


def validate_prompts(rows: Sequence[Any], *, columns: Sequence[str] = PROMPT_COLUMNS) -> dict[str, dict[str, Any]]:
    """{id: row} of a prompts dataset, checked: every row an object with ``columns`` (a stage that only renders
    prompts, `sample`, needs ``id`` and ``prompt``), ``prompt`` a list of chat messages, ``domain`` one of DOMAINS
    when present, no id twice. DataFormatError naming the row and field otherwise."""
    by_id: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataFormatError(f"row {i}: expected a JSON object (a prompt row), got {type(row).__name__}.")
        require_columns(row, columns, i, "prompts")
        check_messages(row["prompt"], i, row, "prompt")
        if row.get("domain") is not None and row["domain"] not in DOMAINS:
            raise DataFormatError(f"{row_label(i, row)}, field 'domain': {row['domain']!r} is not one of {DOMAINS}.")
        if row["id"] in by_id:
            raise DataFormatError(f"{row_label(i, row)}: prompt id appears twice; prompt ids must be unique.")
        by_id[row["id"]] = row
    return by_id


def validate_samples(rows: Sequence[Any], prompts: dict[str, Any], *, judged: bool = False) -> None:
    """Check a samples (``judged``: judged) dataset against the prompts it was drawn from ({id: prompt row}): the
    format's columns, ``id`` = prompt_id|model|sample_index, a ``prompt_id`` the prompts hold, ``text`` a string,
    ``finish_reason`` one of FINISH_REASONS, no id twice; judged rows also ``correct`` true/false/null and ``reward``
    a finite number or null. DataFormatError naming the row and field."""
    fmt, columns = ("judged", JUDGED_COLUMNS) if judged else ("samples", SAMPLE_COLUMNS)
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataFormatError(f"row {i}: expected a JSON object (a {fmt} row), got {type(row).__name__}.")
        require_columns(row, columns, i, fmt)
        where = row_label(i, row)
        if row["prompt_id"] not in prompts:
            raise DataFormatError(f"{where}: prompt_id {row['prompt_id']!r} is not in the prompts ({len(prompts)} "
                                  "prompts). Pass the --prompts output these samples were drawn from.")
        expected = sample_id(row["prompt_id"], row["model"], row["sample_index"])
        if row["id"] != expected:
            raise DataFormatError(f"{where}: id should be {expected!r} (prompt_id|model|sample_index); the row may "
                                  "be attached to the wrong prompt.")
        if not isinstance(row["text"], str):
            raise DataFormatError(f"{where}, field 'text': expected a string, got {type(row['text']).__name__}.")
        if row["finish_reason"] not in FINISH_REASONS:
            raise DataFormatError(f"{where}, field 'finish_reason': {row['finish_reason']!r} not in "
                                  f"{FINISH_REASONS}.")
        if judged:
            if not (row["correct"] is None or isinstance(row["correct"], bool)):
                raise DataFormatError(f"{where}, field 'correct': expected true, false or null, got "
                                      f"{row['correct']!r}.")
            r = row["reward"]
            if r is not None and (isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r)):
                raise DataFormatError(f"{where}, field 'reward': expected a finite number or null, got {r!r}.")
        if row["id"] in seen:
            raise DataFormatError(f"{where}: sample id appears twice (shards or seeds merged twice?).")
        seen.add(row["id"])


# torch.finfo(torch.float32).max: the trainers' collator carries score columns as float32 tensors.
FLOAT32_MAX = 3.4028234663852886e38


def check_logp(value: Any, index: int, row: dict[str, Any], field: str, source: str | None = None) -> float:
    """Return ``value`` as a float log-prob, or raise ScoredPairsError if it is missing, non-finite, > 0, or too
    large in magnitude for float32 (the dtype the trainers' collator uses: it would become -inf there)."""
    where = f"{row_label(index, row)}, field {field!r}" + (f", source {source!r}" if source else "")
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        raise ScoredPairsError(f"{where}: expected a float log-prob, got {value!r}. Re-run `infifpo score`.")
    if not math.isfinite(value):
        raise ScoredPairsError(
            f"{where}: log-prob is {value} (not finite). The response is likely empty or was scored with a "
            "broken model; drop the row or re-run `infifpo score`."
        )
    if abs(value) > FLOAT32_MAX:
        raise ScoredPairsError(
            f"{where}: log-prob {value} does not fit float32 (|value| <= {FLOAT32_MAX:.4g}), the dtype training reads "
            "scores in: it would become -inf and the loss meaningless. Drop the row or re-run `infifpo score`."
        )
    if value > 1e-4:
        raise ScoredPairsError(f"{where}: log-prob {value} is positive; a log-probability must be <= 0.")
    return float(value)


def check_entropy(value: Any, index: int, row: dict[str, Any], field: str, source: str | None = None) -> float:
    """Return ``value`` as a float mean entropy (nats/token), or raise ScoredPairsError if it is not a finite number
    >= 0 within float32 (a value down to -1e-4 passes as rounding, as ``check_logp`` lets log-probs reach +1e-4)."""
    where = f"{row_label(index, row)}, field {field!r}" + (f", source {source!r}" if source else "")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or abs(value) > FLOAT32_MAX or value < -1e-4:
        raise ScoredPairsError(f"{where}: expected a finite mean entropy >= 0 nats/token, got {value!r}. Re-run "
                               "`infifpo score --backend transformers`.")
    return float(value)
