"""Preference data for the trainers: loading a dataset spec, and validating scored pairs at the trainer boundary.

Owns: turning a dataset spec (a stage output directory, a ``.jsonl`` file or a hub dataset name) into a
``datasets.Dataset``; the row checks the trainers need before any tokenisation (columns present, log-probs finite
and <= 0, one number of sources K, positive token counts, chosen != rejected); the check, after tokenisation, that
supplied token counts equal the trainer's own completion token counts. Does not own: the column names
(``infifpo.schema``), the prompt/completion split (TRL's ``_prepare_dataset``) or the math (``infifpo.fusion``).

Accepted row formats (methods.md, schema.py "scored pairs"): ours (conversational ``prompt`` + one-message
``chosen``/``rejected``, with ``ref_*``/``fuse_*`` sums, means and token counts) and the official InfiFPO format
(full ``chosen``/``rejected`` conversations, no ``prompt``; ``ref_*``/``fuse_*`` sums and means, no token counts).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

from infifpo.schema import (
    DataFormatError,
    ScoredPairsError,
    check_logp,
    check_messages,
    fuse_columns,
    ref_columns,
    require_columns,
    row_label,
)
from infifpo.store import read_jsonl, read_output

logger = logging.getLogger(__name__)


def load_preference_dataset(spec: str, *, split: str | None = None, hub_split: str = "train") -> Dataset:
    """Load ``spec`` (stage output dir, ``.jsonl`` file, or hub dataset name) and keep rows whose ``split`` == split.

    ``split`` filters on the pipeline's own ``split`` column ("sft" | "po") when that column exists; ``hub_split`` is
    the split of a hub dataset to load. Raises DataFormatError when nothing is left.
    """
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        rows = read_output(path)
    elif path.suffix == ".jsonl" and path.exists():
        rows = read_jsonl(path)
    elif path.exists():
        raise DataFormatError(f"{spec}: expected a stage output directory or a .jsonl file, got {path.suffix!r}.")
    else:
        import datasets

        return _filter_split(datasets.load_dataset(spec, split=hub_split), split, spec)
    if not rows:
        raise DataFormatError(f"{spec}: the dataset has no rows. If it is a pairs output, its stats.json says why "
                              "each prompt was dropped (e.g. too few finished responses: raise max_tokens).")
    for i, row in enumerate(rows):  # before Arrow, which rejects mixed nested types with an opaque error
        for field in ("prompt", "chosen", "rejected", "source_chosen"):
            if row.get(field) is not None and not isinstance(row[field], str):
                check_messages(row[field], i, row, field)
    return _filter_split(Dataset.from_list(rows), split, spec)


def _filter_split(dataset: Dataset, split: str | None, spec: str) -> Dataset:
    if split is None or "split" not in dataset.column_names:
        return dataset
    kept = dataset.filter(lambda s: s == split, input_columns="split")
    if len(kept) == 0:
        found = sorted(set(dataset["split"]))
        raise DataFormatError(f"{spec}: no rows with split == {split!r} (found splits {found}).")
    return kept


def score_columns(responses: Sequence[str], *, length_normalize: bool, sources: bool, ref: bool = True) -> list[str]:
    """Columns holding the values a trainer reads: per response, the pivot's and (if ``sources``) the sources'.

    Means (nats/token) when ``length_normalize``, sums (nats) otherwise (methods.md §LN).
    """
    pick = 1 if length_normalize else 0
    cols = [ref_columns(r)[pick] for r in responses] if ref else []
    return cols + ([fuse_columns(r)[pick] for r in responses] if sources else [])


def validate_preference_rows(
    dataset: Dataset,
    *,
    responses: Sequence[str],
    length_normalize: bool,
    sources: bool,
    ref: bool = True,
    skip_invalid: bool = False,
) -> Dataset:
    """Check every row before tokenisation; raise the first error, or drop bad rows and log how many.

    Raises DataFormatError / ScoredPairsError naming the row (index and id), the field and the fix.
    """
    columns = score_columns(responses, length_normalize=length_normalize, sources=sources, ref=ref)
    rows = dataset.to_list()
    k_expected = _expected_num_sources(rows, responses, length_normalize) if sources else None
    names_expected = rows[0].get("source_models") if rows else None
    bad: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        try:
            _check_row(i, row, responses, columns, k_expected, names_expected)
        except DataFormatError as e:
            if not skip_invalid:
                raise
            bad.append((i, str(e)))
    return _drop_rows(dataset, bad, "invalid")


def _expected_num_sources(rows: list[dict[str, Any]], responses: Sequence[str], length_normalize: bool) -> int:
    """The number of sources K most rows agree on (so the error names the odd row, not the first one)."""
    col = fuse_columns(responses[0])[1 if length_normalize else 0]
    counts = Counter(len(r[col]) for r in rows if isinstance(r.get(col), list))
    return counts.most_common(1)[0][0] if counts else 0


def _check_row(i: int, row: dict[str, Any], responses: Sequence[str], columns: list[str], k: int | None,
               names: Any) -> None:
    fmt = "scored pairs (ours or the official InfiFPO format)"
    # Dataset.from_list fills a key absent from some rows with None: that is a missing column for this row.
    require_columns({k: v for k, v in row.items() if v is not None}, list(responses) + columns, i, fmt)
    for field in (["prompt"] if "prompt" in row else []) + list(responses):
        if not isinstance(row[field], str):
            check_messages(row[field], i, row, field)
    for r in responses:
        if isinstance(row[r], list) and row[r][-1]["role"] != "assistant":
            raise DataFormatError(f"{row_label(i, row)}, field {r!r}: the last message must be the assistant's "
                                  f"response, got role {row[r][-1]['role']!r}.")
    if row["chosen"] == row["rejected"]:
        raise ScoredPairsError(f"{row_label(i, row)}: chosen == rejected, which carries no preference. Drop the row "
                               "(or set skip_invalid_rows=True) and check the pairing stage for reward ties.")
    for col in columns:
        if col.startswith("ref_"):
            check_logp(row[col], i, row, col)
        else:
            _check_source_values(i, row, col, row[col], k, names)
    for r in responses:
        _check_token_counts(i, row, ref_columns(r)[2], fuse_columns(r)[2], k)
    if names is not None and row.get("source_models") != names:
        raise ScoredPairsError(f"{row_label(i, row)}: source_models {row.get('source_models')} differs from row 0's "
                               f"{names}; every row must list its sources in the same order. Re-run `infifpo score`.")


def _check_source_values(i: int, row: dict[str, Any], col: str, values: Any, k: int | None, names: Any) -> None:
    if not isinstance(values, list) or len(values) != k:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise ScoredPairsError(f"{row_label(i, row)}, field {col!r}: has {got} values, expected K={k} sources like "
                               "the other rows. Re-score the row with every source model, or drop it.")
    for j, v in enumerate(values):
        check_logp(v, i, row, col, source=names[j] if isinstance(names, list) and j < len(names) else f"src{j}")


def _check_token_counts(i: int, row: dict[str, Any], ref_col: str, fuse_col: str, k: int | None) -> None:
    counts = [(ref_col, row[ref_col])] if ref_col in row else []
    if fuse_col in row and isinstance(row[fuse_col], list):
        counts += [(fuse_col, v) for v in row[fuse_col]]
    for col, n in counts:
        if isinstance(n, bool) or not isinstance(n, int | float) or n <= 0 or n != int(n):
            raise ScoredPairsError(f"{row_label(i, row)}, field {col!r}: token count {n!r} must be a positive "
                                   "integer; an empty response cannot be scored. Drop the row or re-run `infifpo score`.")


def check_reference_token_counts(dataset: Dataset, *, responses: Sequence[str], max_length: int | None,
                                 tokenizer_name: str, skip_invalid: bool = False) -> Dataset:
    """After tokenisation: supplied ``ref_<R>_num_tokens`` must equal the trainer's completion token count.

    A mismatch means the scores were computed with another tokenizer or chat template, or the trainer truncates the
    pair at ``max_length``: the supplied log-probs would then not be log-probs of what the policy sums over.
    """
    present = [r for r in responses if ref_columns(r)[2] in dataset.column_names]
    if not present:
        return dataset
    cols = ["prompt_ids"] + [f"{r}_ids" for r in present] + [ref_columns(r)[2] for r in present]
    cols += ["id"] if "id" in dataset.column_names else []
    bad: list[tuple[int, str]] = []
    for i, row in enumerate(dataset.select_columns(cols).to_list()):
        for r in present:
            n_ours = _completion_tokens_after_truncation(len(row["prompt_ids"]), len(row[f"{r}_ids"]), max_length)
            n_given = row[ref_columns(r)[2]]
            if n_ours != n_given:
                msg = (f"{row_label(i, row)}, field {ref_columns(r)[2]!r}: the scores cover {n_given} tokens but the "
                       f"trainer's completion of {r!r} has {n_ours} under {tokenizer_name!r} (max_length={max_length}). "
                       "Re-run `infifpo score` with the pivot's tokenizer and chat template, or raise max_length.")
                if not skip_invalid:
                    raise ScoredPairsError(msg)
                bad.append((i, msg))
                break
    return _drop_rows(dataset, bad, "token-count-mismatched")


def report_truncated_prompts(n_before: int, dataset: Dataset, max_length: int | None, name: str) -> None:
    """Log how many rows TRL dropped because the prompt alone fills ``max_length``; raise if none is left."""
    dropped = n_before - len(dataset)
    if dropped and len(dataset) == 0:
        raise ScoredPairsError(f"{name} dataset: every prompt is at least max_length={max_length} tokens, so no "
                               "completion token would be trained on. Raise max_length.")
    if dropped:
        logger.warning("%s dataset: dropped %d of %d rows whose prompt fills max_length=%s", name, dropped, n_before,
                       max_length)


def _completion_tokens_after_truncation(n_prompt: int, n_completion: int, max_length: int | None) -> int:
    # TRL's collator keeps the first max_length tokens of prompt + completion ("keep_start").
    if max_length is None:
        return n_completion
    return max(0, min(n_completion, max_length - n_prompt))


def _drop_rows(dataset: Dataset, bad: list[tuple[int, str]], what: str) -> Dataset:
    if not bad:
        return dataset
    logger.warning("skip_invalid_rows: dropped %d of %d %s rows; first: %s", len(bad), len(dataset), what, bad[0][1])
    drop = {i for i, _ in bad}
    kept = dataset.select([i for i in range(len(dataset)) if i not in drop])
    if len(kept) == 0:
        raise ScoredPairsError(f"every row was {what} (first: {bad[0][1]}); nothing left to train on.")
    return kept
