"""Preference data for the trainers: loading a dataset spec, and validating scored pairs at the trainer boundary.

Owns: turning a dataset spec (a stage output directory, a ``.jsonl`` file or a hub dataset name) into a
``datasets.Dataset``; the one row validator of every method before tokenisation (columns present, responses not
empty or whitespace only, chosen != rejected; for scored pairs: log-probs finite, <= 0 and within float32, one
number of sources K, positive token counts, each mean == sum / token count, ``pivot_model`` == the model trained);
and the checks after tokenisation: no row longer than ``max_length`` (never cut), and the pivot's token counts (given,
or implied by sum / mean) equal to the trainer's own completion token counts. Does not own: the column names
(``infifpo.schema``), the prompt/completion split (TRL's ``_prepare_dataset``) or the math (``infifpo.fusion``).

Accepted row formats (docs/methods.md, schema.py "scored pairs"): ours (conversational ``prompt`` + one-message
``chosen``/``rejected``, with ``ref_*``/``fuse_*`` sums, means and token counts) and the official InfiFPO format
(full ``chosen``/``rejected`` conversations, no ``prompt``; ``ref_*``/``fuse_*`` sums and means, no token counts).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

from infifpo.schema import (
    DataFormatError,
    MissingEntropyError,
    ModelLoadError,
    ScoredPairsError,
    check_entropy,
    check_logp,
    check_messages,
    entropy_columns,
    fuse_columns,
    ref_columns,
    require_columns,
    row_label,
)
from infifpo.store import read_jsonl, read_output

logger = logging.getLogger(__name__)
# The row's index in the dataset given to the trainer, carried through tokenisation for error messages.
ROW_INDEX = "infifpo_row_index"


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

    Means (nats/token) when ``length_normalize``, sums (nats) otherwise (docs/methods.md §LN).
    """
    pick = 1 if length_normalize else 0
    cols = [ref_columns(r)[pick] for r in responses] if ref else []
    return cols + ([fuse_columns(r)[pick] for r in responses] if sources else [])


def uncertainty_columns(responses: Sequence[str], *, pivot: bool) -> list[str]:
    """The columns ``uncertainty`` fusion reads besides ``score_columns`` (docs/methods.md §UDF): per response the
    sources' mean entropies and mean log-probs (CE is the per-token mean whatever LN says), and the frozen pivot's
    when it is a fusion candidate (``pivot``, i.e. include_pivot)."""
    cols = []
    for r in responses:
        cols += [entropy_columns(r)[1], fuse_columns(r)[1]] + ([entropy_columns(r)[0], ref_columns(r)[1]] if pivot
                                                               else [])
    return cols


def validate_preference_rows(
    dataset: Dataset,
    *,
    responses: Sequence[str],
    length_normalize: bool,
    sources: bool,
    ref: bool = True,
    skip_invalid: bool = False,
    model: str | None = None,
    allow_model_mismatch: bool = False,
    uncertainty: Sequence[str] = (),
) -> Dataset:
    """Check every row before tokenisation; raise the first error, or drop bad rows and log how many.

    The one row validator of every method: ``responses`` are the response columns trained on (SFT: the target;
    DPO: chosen and rejected, which must differ), each a non-empty, non-whitespace response. With ``ref`` /
    ``sources`` the score columns the trainer reads are checked too (finite, <= 0, within float32, one K), and
    where a row has both a mean and its sum, the mean against sum / token count (or, without counts, the implied
    count sum / mean must be a positive whole number). With ``ref`` and ``model`` (what the trainer trains from),
    a row's ``pivot_model`` must be that model (``allow_model_mismatch``: a logged warning instead).
    ``uncertainty`` (``uncertainty_columns``) are the extra columns ``uncertainty`` fusion reads: mean entropies
    (finite, >= 0) and mean log-probs; a dataset without an entropy column, or a row whose entropy is null, is a
    MissingEntropyError saying to re-score with the transformers scorer.
    Raises DataFormatError / ScoredPairsError naming the row (index and id), the field and the fix.
    """
    columns = score_columns(responses, length_normalize=length_normalize, sources=sources, ref=ref)
    entropies = [c for c in uncertainty if c.endswith("_entropy")]
    _require_entropy_columns(dataset, entropies)
    columns = list(dict.fromkeys(columns + [c for c in uncertainty if c not in entropies]))
    rows = [{c: v for c, v in row.items() if c != ROW_INDEX} for row in dataset.to_list()]
    index = dataset[ROW_INDEX] if ROW_INDEX in dataset.column_names else list(range(len(rows)))
    k_expected = _expected_num_sources(rows, responses, length_normalize) if sources else None
    names_expected = rows[0].get("source_models") if rows and (ref or sources) else None
    pivot = _PivotCheck(model, allow_model_mismatch) if ref else None
    bad: list[tuple[int, str]] = []
    for pos, (i, row) in enumerate(zip(index, rows, strict=True)):
        try:
            _check_entropies(i, row, entropies, k_expected, names_expected)
            _check_row(i, row, responses, columns, k_expected, names_expected)
            _check_means(i, row, responses if ref else (), responses if sources else (), k_expected, names_expected)
            if pivot is not None:
                pivot.check(i, row)
        except DataFormatError as e:
            if not skip_invalid:
                raise
            bad.append((pos, str(e)))
    return _drop_rows(dataset, bad, "invalid")


def _missing_entropy(what: str) -> MissingEntropyError:
    return MissingEntropyError(
        f"{what}, which fusion_method='uncertainty' needs: the mean next-token entropy of each response under each "
        "model (docs/formats.md, Scored pairs). Re-score the pairs with the transformers scorer (`infifpo score "
        "--backend transformers ...`; the vLLM scorer cannot compute entropies, and outputs scored before they "
        "existed lack them), or choose another fusion_method.")


def _require_entropy_columns(dataset: Dataset, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise _missing_entropy(f"the scored pairs have no {missing} column(s)")


def _check_entropies(i: int, row: dict[str, Any], columns: Sequence[str], k: int | None, names: Any) -> None:
    for col in columns:
        value = row.get(col)
        if value is None:
            raise _missing_entropy(f"{row_label(i, row)}, field {col!r}: no value")
        if col.startswith("ref_"):
            check_entropy(value, i, row, col)
        else:
            _check_source_values(i, row, col, value, k, names, check=check_entropy)


def _expected_num_sources(rows: list[dict[str, Any]], responses: Sequence[str], length_normalize: bool) -> int:
    """The number of sources K most rows agree on (so the error names the odd row, not the first one)."""
    col = fuse_columns(responses[0])[1 if length_normalize else 0]
    counts = Counter(len(r[col]) for r in rows if isinstance(r.get(col), list))
    return counts.most_common(1)[0][0] if counts else 0


def _check_row(i: int, row: dict[str, Any], responses: Sequence[str], columns: list[str], k: int | None,
               names: Any) -> None:
    fmt = "scored pairs (ours or the official InfiFPO format)" if columns else "preference / SFT rows"
    # Dataset.from_list fills a key absent from some rows with None: that is a missing column for this row.
    require_columns({k: v for k, v in row.items() if v is not None}, list(responses) + columns, i, fmt)
    _check_responses(i, row, responses)
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


def _check_responses(i: int, row: dict[str, Any], responses: Sequence[str]) -> None:
    """Each response: chat messages ending with the assistant's, whose content is not empty or whitespace only;
    chosen != rejected when both are trained on."""
    for field in (["prompt"] if "prompt" in row else []) + list(responses):
        if not isinstance(row[field], str):
            check_messages(row[field], i, row, field)
    for r in responses:
        if isinstance(row[r], list) and row[r][-1]["role"] != "assistant":
            raise DataFormatError(f"{row_label(i, row)}, field {r!r}: the last message must be the assistant's "
                                  f"response, got role {row[r][-1]['role']!r}.")
        text = row[r][-1]["content"] if isinstance(row[r], list) else row[r]
        if not text.strip():
            raise DataFormatError(f"{row_label(i, row)}, field {r!r}: the response is {text!r} (empty or whitespace "
                                  "only), so there is nothing to learn from it. Drop the row (InfiFPO / WRPO: or set "
                                  "skip_invalid_rows=True) and check the sampling stage (finish_reason, max_tokens).")
    if "chosen" in responses and "rejected" in responses and row["chosen"] == row["rejected"]:
        raise ScoredPairsError(f"{row_label(i, row)}: chosen == rejected, which carries no preference. Drop the row "
                               "(or set skip_invalid_rows=True) and check the pairing stage for reward ties.")


def _check_source_values(i: int, row: dict[str, Any], col: str, values: Any, k: int | None, names: Any,
                         check: Callable[..., float] = check_logp) -> None:
    if not isinstance(values, list) or len(values) != k:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise ScoredPairsError(f"{row_label(i, row)}, field {col!r}: has {got} values, expected K={k} sources like "
                               "the other rows. Re-score the row with every source model, or drop it.")
    for j, v in enumerate(values):
        check(v, i, row, col, source=_source_name(names, j))


def _source_name(names: Any, j: int) -> str:
    return names[j] if isinstance(names, list) and j < len(names) else f"src{j}"


def _check_token_counts(i: int, row: dict[str, Any], ref_col: str, fuse_col: str, k: int | None) -> None:
    counts = [(ref_col, row[ref_col])] if row.get(ref_col) is not None else []
    if fuse_col in row and isinstance(row[fuse_col], list):
        counts += [(fuse_col, v) for v in row[fuse_col]]
    for col, n in counts:
        if isinstance(n, bool) or not isinstance(n, int | float) or n <= 0 or n != int(n):
            raise ScoredPairsError(f"{row_label(i, row)}, field {col!r}: token count {n!r} must be a positive "
                                   "integer; an empty response cannot be scored. "
                                   "Drop the row or re-run `infifpo score`.")


# Relative and absolute tolerance of "mean == sum / token count" (JSON floats; float32-computed scores pass).
MEAN_RTOL, MEAN_ATOL = 1e-4, 1e-6


def _check_means(i: int, row: dict[str, Any], ref_responses: Sequence[str], fuse_responses: Sequence[str],
                 k: int | None, names: Any) -> None:
    """Where a row has a mean column and its sum, the mean must be sum / token count (docs/methods.md §LN)."""
    for r in ref_responses:
        s_col, m_col, n_col = ref_columns(r)
        if row.get(s_col) is not None and row.get(m_col) is not None:
            values = [check_logp(row[c], i, row, c) for c in (s_col, m_col)]
            _check_mean(i, row, (s_col, m_col, n_col), *values, row.get(n_col), None)
    for r in fuse_responses:
        s_col, m_col, n_col = fuse_columns(r)
        if row.get(s_col) is None or row.get(m_col) is None:
            continue
        _check_source_values(i, row, s_col, row[s_col], k, names)
        _check_source_values(i, row, m_col, row[m_col], k, names)
        counts = row.get(n_col)
        if counts is not None and (not isinstance(counts, list) or len(counts) != k):
            raise ScoredPairsError(f"{row_label(i, row)}, field {n_col!r}: has {counts!r}, expected K={k} token "
                                   "counts. Re-run `infifpo score`.")
        for j in range(k or 0):
            _check_mean(i, row, (s_col, m_col, n_col), row[s_col][j], row[m_col][j],
                        None if counts is None else counts[j], _source_name(names, j))


def _check_mean(i: int, row: dict[str, Any], cols: tuple[str, str, str], total: float, mean: float, count: Any,
                source: str | None) -> None:
    s_col, m_col, n_col = cols
    where = f"{row_label(i, row)}, field {m_col!r}" + (f", source {source!r}" if source else "")
    if count is not None:  # the count itself was checked by _check_token_counts
        if not math.isclose(mean, total / count, rel_tol=MEAN_RTOL, abs_tol=MEAN_ATOL):
            raise ScoredPairsError(
                f"{where}: mean {mean} != {s_col} / {n_col} = {total} / {count} = {total / count:.6g}. The mean "
                "column must hold the per-token mean log-prob (a column of sums trains on a wrong loss). Re-run "
                "`infifpo score`, or recompute the mean as sum / token count.")
        return
    implied = implied_token_count(total, mean)
    if implied is None:
        raise ScoredPairsError(
            f"{where}: {s_col} / {m_col} = {total} / {mean} is {'undefined' if mean == 0 else f'{total / mean:.6g}'}"
            f" tokens, not a positive whole number: the mean is not the sum divided by a token count (a column of "
            f"sums, or rounded means?). Recompute the means as sum / token count at full precision, or add the "
            f"{n_col!r} column (`infifpo score` writes it).")


def implied_token_count(total: float, mean: float) -> int | None:
    """The token count sum / mean when it is a positive whole number (tolerance ``MEAN_RTOL``), else None.

    ``total == mean == 0`` (a response the model is certain of) implies no count: returns 0, meaning "unknown"."""
    if mean == 0:
        return 0 if total == 0 else None
    n = total / mean
    nearest = round(n)
    if nearest < 1 or abs(n - nearest) > MEAN_RTOL * nearest + MEAN_ATOL:
        return None
    return nearest


# ---------------------------------------------------------------- the model the reference was scored with


def model_reference(model: Any) -> str | None:
    """What a trainer's ``model`` argument was loaded from: the string itself, or its config's ``_name_or_path``."""
    if isinstance(model, str):
        return model
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _local_model_dir(ref: str) -> tuple[str | None, str]:
    """(``resolve_model``'s directory for ``ref``, "") when it is on this machine, else (None, why): never downloads
    (a packaged model not yet materialised, a hub id not in the HF cache, a path from another machine)."""
    from infifpo.models.packaged import PACKAGED
    from infifpo.models.resolve import cache_dir, resolve_model

    try:
        if Path(os.path.expanduser(ref)).is_dir() or (ref in PACKAGED and (cache_dir() / ref).exists()):
            return resolve_model(ref), ""
        if ref in PACKAGED:
            return None, "the packaged model is not materialised on this machine"
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json")
        if isinstance(cached, str):
            return str(Path(cached).parent), ""
        return None, "not a directory here, and not a cached packaged or hub model"
    except (ModelLoadError, ValueError, OSError) as e:
        return None, str(e)


def same_model(a: str, b: str) -> bool:
    """Whether local model directories ``a`` and ``b`` hold the same model under infifpo's one identity rule
    (``models.model_identity``: the hashes of config, tokenizer and weight files), wherever each lies."""
    from infifpo.models.resolve import model_files, model_identity

    if Path(a).resolve() == Path(b).resolve():
        return True
    return bool(model_files(a)) and model_identity(a) == model_identity(b)


def _shown(ref: str, path: str) -> str:
    return repr(ref) if Path(os.path.expanduser(ref)).resolve() == Path(path).resolve() else f"{ref!r} ({path})"


class _PivotCheck:
    """A row's ``pivot_model`` (``infifpo score --pivot``: a packaged name, a directory or a hub id) must be the
    model the trainer starts from: otherwise r(y) is another model's log-prob and the loss silently wrong."""

    def __init__(self, model: str | None, allow_mismatch: bool):
        self.model, self.allow = model, allow_mismatch
        self.model_dir = _local_model_dir(model)[0] if model else None
        self.seen: dict[str, str | None] = {}  # pivot_model -> error message (None: same model)

    def check(self, i: int, row: dict[str, Any]) -> None:
        pivot = row.get("pivot_model")
        if not isinstance(pivot, str) or self.model is None:
            return
        if pivot not in self.seen:
            self.seen[pivot] = self._compare(i, row, pivot)
        problem = self.seen[pivot]
        if problem is not None and not self.allow:
            raise ScoredPairsError(f"{row_label(i, row)}, field 'pivot_model': {problem}")

    def _compare(self, i: int, row: dict[str, Any], pivot: str) -> str | None:
        pivot_dir, why = _local_model_dir(pivot)
        if pivot_dir is None or self.model_dir is None:
            logger.warning("%s: cannot check that pivot_model %r (%s) is the model being trained, %r; make sure the "
                           "reference log-probs were scored with it.", row_label(i, row), pivot,
                           why or "unresolved", self.model)
            return None
        if same_model(pivot_dir, self.model_dir):
            return None
        what = (f"the reference log-probs were scored with {_shown(pivot, pivot_dir)}, but the trainer trains "
                f"{_shown(self.model, self.model_dir)}, a different model (infifpo score's identity: config, "
                "tokenizer and weight file hashes).")
        if self.allow:
            logger.warning("%s, field 'pivot_model': %s Training anyway (allow_reference_model_mismatch=True).",
                           row_label(i, row), what)
        return (f"{what} Re-run `infifpo score --pivot` with the model you train, or set "
                "allow_reference_model_mismatch=True if the reference deliberately comes from another model.")


# ---------------------------------------------------------------- around TRL's tokenisation


def prepare_scored_dataset(dataset: Dataset, tokenize: Callable[[Dataset], Dataset], *, responses: Sequence[str],
                           length_normalize: bool, sources: bool, ref: bool, skip_invalid: bool,
                           max_length: int | None, tokenizer_name: str, model: str | None = None,
                           allow_model_mismatch: bool = False, uncertainty: Sequence[str] = ()) -> Dataset:
    """Validate the rows, tokenise them with ``tokenize`` (TRL's ``_prepare_dataset`` without its max_length filter,
    plus any extra response's ids), then check them against the tokens the trainer sums over.

    After tokenisation: a row longer than ``max_length`` (prompt + any response) is refused, never cut (the scores
    cover the whole response); a supplied ``ref_<R>_num_tokens`` (or, in the official format, the count implied by
    ``ref_<R>_logps / ref_mean_<R>_logps``) must equal the trainer's completion token count. Errors name the row by
    its index in ``dataset`` and its id; ``skip_invalid`` drops and counts instead. ``uncertainty``: as in
    ``validate_preference_rows``.
    """
    dataset = dataset.add_column(ROW_INDEX, list(range(len(dataset))))
    dataset = validate_preference_rows(dataset, responses=responses, length_normalize=length_normalize,
                                       sources=sources, ref=ref, skip_invalid=skip_invalid, model=model,
                                       allow_model_mismatch=allow_model_mismatch, uncertainty=uncertainty)
    dataset = tokenize(dataset)
    dataset = _check_tokenized(dataset, _check_length, responses, max_length, skip_invalid, "too-long")
    if ref:
        dataset = _check_tokenized(dataset, _check_pivot_count, responses, tokenizer_name, skip_invalid,
                                   "token-count-mismatched")
    return dataset.remove_columns(ROW_INDEX)


def without_max_length(args: Any) -> Any:
    """A shallow copy of a trainer config with ``max_length=None``: TRL's ``_prepare_dataset`` then drops no row
    (it drops rows whose prompt alone fills max_length), so ``prepare_scored_dataset`` names each too-long row."""
    args = copy.copy(args)
    args.max_length = None
    return args


def _check_tokenized(dataset: Dataset, check: Callable[..., None], responses: Sequence[str], setting: Any,
                     skip_invalid: bool, what: str) -> Dataset:
    cols = [c for c in dataset.column_names if c in ("id", ROW_INDEX, "prompt_ids") or c.endswith("_ids")
            or c.startswith("ref_")]
    bad: list[tuple[int, str]] = []
    for pos, row in enumerate(dataset.select_columns(cols).to_list()):
        try:
            for r in responses:
                check(row.get(ROW_INDEX, pos), row, r, setting)
        except ScoredPairsError as e:
            if not skip_invalid:
                raise
            bad.append((pos, str(e)))
    return _drop_rows(dataset, bad, what)


def _check_length(i: int, row: dict[str, Any], r: str, max_length: int | None) -> None:
    n_prompt, n_completion = len(row["prompt_ids"]), len(row[f"{r}_ids"])
    if max_length is not None and n_prompt + n_completion > max_length:
        raise ScoredPairsError(
            f"{row_label(i, row)}, field {r!r}: the prompt ({n_prompt} tokens) + {r!r} ({n_completion} tokens) = "
            f"{n_prompt + n_completion} tokens exceed max_length={max_length}; the collator would cut the response "
            f"(and precomputed scores cover all of it). Raise max_length to at least {n_prompt + n_completion}, or "
            "drop the row (skip_invalid_rows=True drops and counts such rows).")


def _check_pivot_count(i: int, row: dict[str, Any], r: str, tokenizer_name: str) -> None:
    s_col, m_col, n_col = ref_columns(r)
    n_ours = len(row[f"{r}_ids"])
    if row.get(n_col) is not None:
        n_given, field = row[n_col], n_col
    elif row.get(s_col) is not None and row.get(m_col) is not None:
        n_given, field = implied_token_count(row[s_col], row[m_col]), m_col  # checked a whole number before
        if not n_given:
            return
    else:
        return
    if n_given != n_ours:
        given = f"cover {n_given} tokens" if field == n_col else f"imply {n_given} tokens ({s_col} / {m_col})"
        raise ScoredPairsError(
            f"{row_label(i, row)}, field {field!r}: the scores {given} but the trainer's completion of {r!r} has "
            f"{n_ours} tokens under {tokenizer_name!r}. Re-run `infifpo score` with the pivot's tokenizer and chat "
            "template (or, for the official format, check that the mean columns hold sum / token count).")


def _drop_rows(dataset: Dataset, bad: list[tuple[int, str]], what: str) -> Dataset:
    if not bad:
        return dataset
    logger.warning("skip_invalid_rows: dropped %d of %d %s rows; first: %s", len(bad), len(dataset), what, bad[0][1])
    drop = {i for i, _ in bad}
    kept = dataset.select([i for i in range(len(dataset)) if i not in drop])
    if len(kept) == 0:
        raise ScoredPairsError(f"every row was {what} (first: {bad[0][1]}); nothing left to train on.")
    return kept
