"""Inputs that used to train silently on a wrong loss: each is now a named error naming the row and the field (or,
with skip_invalid_rows, a drop counted in the log), built the way a user would and run through the real trainer
construction on the tiny offline models (issue "Correct where it is silently wrong", cases a-e)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import yaml
from datasets import Dataset

from infifpo.logprobs import response_spans
from infifpo.schema import FLOAT32_MAX, DataFormatError, ScoredPairsError
from infifpo.trainers import entry
from infifpo.trainers.infifpo import InfiFPOConfig, InfiFPOTrainer
from infifpo.trainers.wrpo import WRPOConfig, WRPOTrainer
from tests.trainers.conftest import cpu_args, make_scored_rows

RESPONSES = ("chosen", "rejected")
WRPO_RESPONSES = ("source_chosen", "chosen", "rejected")


def _infifpo(model, tok, rows, tmp_path, **kw):
    return InfiFPOTrainer(model, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          args=InfiFPOConfig(output_dir=str(tmp_path), **cpu_args(**kw)))


def _wrpo(model, tok, rows, tmp_path, **kw):
    return WRPOTrainer(model, train_dataset=Dataset.from_list(rows), processing_class=tok,
                       args=WRPOConfig(output_dir=str(tmp_path), **cpu_args(**kw)))


def _set_response(tok, row, r, text):
    """Replace response ``r``'s text and re-score it consistently (what `infifpo score` would write): counts equal
    to the pivot's completion length, means = sums / counts."""
    row[r] = [{"role": "assistant", "content": text}]
    n = len(response_spans(tok, row["prompt"], [text])[1][0])
    row[f"ref_{r}_num_tokens"], row[f"ref_mean_{r}_logps"] = n, row[f"ref_{r}_logps"] / n
    row[f"fuse_{r}_num_tokens"] = [n] * len(row[f"fuse_{r}_logps"])
    row[f"fuse_mean_{r}_logps"] = [s / n for s in row[f"fuse_{r}_logps"]]
    return n


def _official(rows):
    """Our rows in the official InfiFPO format: full conversations, sums and means, no prompt, counts, ids or names."""
    out = []
    for row in rows:
        o = {k: v for k, v in row.items() if k.startswith(("ref_", "fuse_")) and not k.endswith("_num_tokens")}
        out.append({**o, "chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]})
    return out


# ---------------------------------------------------------------- a. truncation is never silent
@pytest.mark.parametrize("fmt", ["official", "ours_with_counts", "ours_without_counts"])
def test_a_row_longer_than_max_length_is_named(tiny_llama, tiny_tok, tmp_path, fmt):
    """Before: the official format and ours without counts trained on a completion cut at max_length (40) against
    scores of the whole response, no warning; ours with counts blamed the tokenizer ("scores cover 41 tokens")."""
    rows = make_scored_rows(tiny_tok, 3, k=2, counts=fmt != "ours_without_counts")
    n = _set_response(tiny_tok, rows[1], "chosen", "the cat sat on the mat and two plus three is five")
    if fmt == "ours_without_counts":
        rows = [{k: v for k, v in r.items() if not k.endswith("_num_tokens")} for r in rows]
    label = r"row 1" if fmt == "official" else r"row 1 \(id='p001'\)"
    with pytest.raises(ScoredPairsError, match=rf"{label}, field 'chosen': the prompt \(\d+ tokens\) \+ 'chosen' "
                                               rf"\({n} tokens\) = \d+ tokens exceed max_length=40.*Raise max_length"):
        _infifpo(tiny_llama, tiny_tok, _official(rows) if fmt == "official" else rows, tmp_path, max_length=40)


def test_a_too_long_rows_are_dropped_and_counted_with_skip_invalid_rows(tiny_llama, tiny_tok, tmp_path, caplog):
    rows = make_scored_rows(tiny_tok, 4, k=2)
    _set_response(tiny_tok, rows[1], "rejected", "the cat sat on the mat and two plus three is five")
    rows[2]["prompt"] = [{"role": "user", "content": "q2: " + "the cat sat on the mat " * 2}]  # prompt alone > 40
    with caplog.at_level(logging.WARNING):
        trainer = _infifpo(tiny_llama, tiny_tok, _official(rows), tmp_path, max_length=40, skip_invalid_rows=True)
    assert len(trainer.train_dataset) == 2 and "infifpo_row_index" not in trainer.train_dataset.column_names
    assert "dropped 2 of 4 too-long rows; first: row 1, field 'rejected'" in caplog.text
    with pytest.raises(ScoredPairsError, match=r"row 2 \(id='p002'\), field 'chosen': the prompt \(\d\d tokens\)"):
        _infifpo(tiny_llama, tiny_tok, [rows[0], rows[3], rows[2]], tmp_path, max_length=40)


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_a_wrpo_row_longer_than_max_length_is_named(tiny_llama, tiny_tok, tmp_path, reference):
    rows = make_scored_rows(tiny_tok, 2, k=1, wrpo=True)
    n = _set_response(tiny_tok, rows[0], "source_chosen", "two plus three is five so we add it up to get ten")
    kw = {}
    if reference == "live":
        rows = [{k: v for k, v in r.items() if not k.startswith("ref_")} for r in rows]
        kw["precompute_ref_log_probs"] = False
    with pytest.raises(ScoredPairsError, match=rf"row 0 \(id='p000'\), field 'source_chosen'.*'source_chosen' "
                                               rf"\({n} tokens\).*exceed max_length=40"):
        _wrpo(tiny_llama, tiny_tok, rows, tmp_path, max_length=40, **kw)


def test_a_the_collator_never_cuts_a_row():
    """Behind the trainers' checks: a row reaching the collator longer than max_length is refused, not cut."""
    from infifpo.trainers.forward import ScoredPreferenceCollator

    collator = ScoredPreferenceCollator(pad_token_id=0, max_length=8, score_columns=("ref_chosen_logps",))
    row = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7], "ref_chosen_logps": -1.0}
    assert collator([row])["input_ids"].shape == (2, 5)
    with pytest.raises(ScoredPairsError, match="9 tokens > max_length=8; this collator never cuts a row"):
        collator([{**row, "chosen_ids": [4, 5, 6, 7, 8, 9]}])
    with pytest.raises(ScoredPairsError, match="'ref_chosen_logps' holds a value that is not finite in float32"):
        collator([{**row, "ref_chosen_logps": -1e300}])


# ---------------------------------------------------------------- b. means checked against sums / token counts
def test_b_a_mean_column_holding_sums_is_named(tiny_llama, tiny_tok, tmp_path):
    """Before: fuse_mean_* holding the sums trained silently (here loss 71.8 instead of 2.9)."""
    rows = make_scored_rows(tiny_tok, 3, k=2, sources=("m0", "m1"))
    for row in rows:
        for r in RESPONSES:
            row[f"fuse_mean_{r}_logps"] = list(row[f"fuse_{r}_logps"])
    with pytest.raises(ScoredPairsError, match=r"row 0 \(id='p000'\), field 'fuse_mean_chosen_logps', source 'm0': "
                                               r"mean .* != fuse_chosen_logps / fuse_chosen_num_tokens"):
        _infifpo(tiny_llama, tiny_tok, rows, tmp_path)
    rows = make_scored_rows(tiny_tok, 3, k=2)
    rows[2]["ref_mean_rejected_logps"] *= 1.01
    with pytest.raises(ScoredPairsError, match=r"row 2 \(id='p002'\), field 'ref_mean_rejected_logps': mean"):
        _infifpo(tiny_llama, tiny_tok, rows, tmp_path, length_normalize=False)  # the unread column is checked too
    # within the tolerance (a mean computed in float32 is off by ~1e-7): accepted
    rows[2]["ref_mean_rejected_logps"] = rows[2]["ref_rejected_logps"] / rows[2]["ref_rejected_num_tokens"] * 1.00001
    assert len(_infifpo(tiny_llama, tiny_tok, rows, tmp_path).train_dataset) == 3


def test_b_official_format_means_must_imply_a_whole_token_count(tiny_llama, tiny_tok, tmp_path, caplog):
    """No counts: sum / mean is the implied token count; 7.5 tokens is no count (before: trained silently)."""
    rows = _official(make_scored_rows(tiny_tok, 3, k=2))
    rows[1]["fuse_mean_rejected_logps"][1] = rows[1]["fuse_rejected_logps"][1] / 7.5
    with pytest.raises(ScoredPairsError, match=r"row 1, field 'fuse_mean_rejected_logps', source 'src1': "
                                               r"fuse_rejected_logps / fuse_mean_rejected_logps = .* is 7\.5 tokens, "
                                               r"not a positive whole number"):
        _infifpo(tiny_llama, tiny_tok, rows, tmp_path)
    with caplog.at_level(logging.WARNING):
        trainer = _infifpo(tiny_llama, tiny_tok, rows, tmp_path, skip_invalid_rows=True)
    assert len(trainer.train_dataset) == 2 and "dropped 1 of 3 invalid rows" in caplog.text


@pytest.mark.parametrize("case", ["mean_holds_sum", "other_tokenizer"])
def test_b_official_format_pivot_count_must_equal_the_trainers(tiny_llama, tiny_tok, tmp_path, case):
    """The count implied by ref_<R>_logps / ref_mean_<R>_logps is the pivot's: it must be the trainer's own completion
    length (before: no check for the official format; a ref_mean column holding the sum trained silently)."""
    rows = make_scored_rows(tiny_tok, 3, k=2)
    n = rows[2]["ref_chosen_num_tokens"]
    implied = 1 if case == "mean_holds_sum" else n + 2  # another tokenizer: 2 more tokens
    rows[2]["ref_mean_chosen_logps"] = rows[2]["ref_chosen_logps"] / implied
    with pytest.raises(ScoredPairsError, match=rf"row 2, field 'ref_mean_chosen_logps': the scores imply {implied} "
                                               rf"tokens .* completion of 'chosen' has {n} tokens"):
        _infifpo(tiny_llama, tiny_tok, _official(rows), tmp_path)


# ---------------------------------------------------------------- c. values checked in the collator's dtype
@pytest.mark.parametrize(("column", "length_normalize"), [("fuse_mean_rejected_logps", True),
                                                          ("ref_chosen_logps", False)])
def test_c_a_value_beyond_float32_is_named(tiny_llama, tiny_tok, tmp_path, column, length_normalize):
    """Before: -1e300 is finite, passed, became -inf in the float32 collator; the logged loss was 0.0."""
    assert torch.finfo(torch.float32).max == FLOAT32_MAX
    rows = make_scored_rows(tiny_tok, 3, k=2, sources=("m0", "m1"))
    if column.startswith("fuse"):
        rows[1][column][0] = -1e300
    else:
        rows[1][column] = -1e300
    where = rf"row 1 \(id='p001'\), field '{column}'" + (", source 'm0'" if column.startswith("fuse") else "")
    with pytest.raises(ScoredPairsError, match=rf"{where}: log-prob -1e\+300 does not fit float32"):
        _infifpo(tiny_llama, tiny_tok, rows, tmp_path, length_normalize=length_normalize)


# ---------------------------------------------------------------- d. scores made with another pivot
@pytest.mark.parametrize("method", ["infifpo", "wrpo"])
def test_d_scores_from_another_pivot_are_refused(tiny_llama, tiny_llama_b, tiny_tok, tmp_path, caplog, method):
    """pivot_model names tiny_llama_b (same tokenizer, other weights), the trainer trains tiny_llama. Before: trained
    silently (the token-count check only catches another tokenizer)."""
    rows = make_scored_rows(tiny_tok, 3, k=2, wrpo=method == "wrpo")
    for row in rows:
        row["pivot_model"] = tiny_llama_b
    build = _infifpo if method == "infifpo" else _wrpo
    with pytest.raises(ScoredPairsError, match=r"row 0 \(id='p000'\), field 'pivot_model': the reference log-probs "
                                               r"were scored with .*tiny_llama_b.* but the trainer trains .*tiny_llama"
                                               r".*allow_reference_model_mismatch=True"):
        build(tiny_llama, tiny_tok, rows, tmp_path)
    with caplog.at_level(logging.WARNING):
        trainer = build(tiny_llama, tiny_tok, rows, tmp_path, allow_reference_model_mismatch=True)
    assert len(trainer.train_dataset) == 3
    assert caplog.text.count("field 'pivot_model'") == 1 and "Training anyway" in caplog.text


def test_d_the_same_pivot_named_another_way_is_accepted(tiny_llama, tiny_tok, tmp_path, caplog):
    """A relative path and a model object resolve to the same directory (models.resolve_model, as `infifpo score`)."""
    from transformers import AutoModelForCausalLM

    rows = make_scored_rows(tiny_tok, 2, k=2)
    for row in rows:
        row["pivot_model"] = os.path.relpath(tiny_llama)
    with caplog.at_level(logging.WARNING):
        _infifpo(AutoModelForCausalLM.from_pretrained(tiny_llama), tiny_tok, rows, tmp_path)
    assert "pivot_model" not in caplog.text


# ---------------------------------------------------------------- e. empty responses, chosen == rejected
FAST = dict(bf16=False, report_to="none", per_device_train_batch_size=2, max_steps=1, logging_steps=1,
            save_strategy="no", max_length=128, seed=0, disable_tqdm=True)


def _build_from_jsonl(tmp_path, model, rows, method, **keys):
    """`infifpo train --method M --config cfg.yaml` up to the trainer: what a user's .jsonl file gives."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dict(model_name_or_path=model, dataset_name=str(data),
                                       output_dir=str(tmp_path / "o"), **FAST, **keys)))
    return entry.build_trainer(*entry.parse(["--method", method, "--config", str(cfg)]))


def _content(row, r, text):
    row[r][-1]["content"] = text


E_CASES = {  # method -> (mutation of row 1, error class, pattern after the row label); before: all trained
    "dpo_chosen_is_rejected": ("dpo", lambda r: r.__setitem__("rejected", r["chosen"]), ScoredPairsError,
                               ": chosen == rejected"),
    "dpo_empty_chosen": ("dpo", lambda r: _content(r, "chosen", ""), DataFormatError, ", field 'chosen': the response "
                         "is ''"),
    "dpo_whitespace_rejected": ("dpo", lambda r: _content(r, "rejected", " \n "), DataFormatError,
                                ", field 'rejected': the response is ' \\\\n '"),
    "sft_empty_target": ("sft", lambda r: _content(r, "chosen", ""), DataFormatError, ", field 'chosen'"),
    "sft_whitespace_target": ("sft", lambda r: _content(r, "chosen", "  "), DataFormatError, ", field 'chosen'"),
    "infifpo_whitespace_chosen": ("infifpo", lambda r: _content(r, "chosen", "   "), DataFormatError,
                                  ", field 'chosen'.*empty or whitespace only"),
    "infifpo_empty_rejected": ("infifpo", lambda r: _content(r, "rejected", ""), DataFormatError,
                               ", field 'rejected'.*empty or whitespace only"),
    "wrpo_whitespace_source_chosen": ("wrpo", lambda r: _content(r, "source_chosen", "\t"), DataFormatError,
                                      ", field 'source_chosen'.*empty or whitespace only"),
    "wrpo_empty_rejected": ("wrpo", lambda r: _content(r, "rejected", ""), DataFormatError, ", field 'rejected'"),
}


@pytest.mark.parametrize("case", sorted(E_CASES))
def test_e_empty_responses_and_ties_are_named_for_every_method(tiny_llama, tiny_tok, tmp_path, case):
    method, mutate, error, pattern = E_CASES[case]
    rows = make_scored_rows(tiny_tok, 3, k=2, wrpo=method == "wrpo")
    for row in rows:
        row["split"] = "sft" if method == "sft" else "po"
    mutate(rows[1])
    if method in ("infifpo", "wrpo"):  # the counts agree with the emptied response: only the new check catches it
        for r in WRPO_RESPONSES if method == "wrpo" else RESPONSES:
            _set_response(tiny_tok, rows[1], r, rows[1][r][-1]["content"])
    with pytest.raises(error, match=rf"row 1 \(id='p001'\){pattern}"):
        _build_from_jsonl(tmp_path, tiny_llama, rows, method)


def test_e_empty_responses_are_dropped_and_counted_with_skip_invalid_rows(tiny_llama, tiny_tok, tmp_path, caplog):
    rows = make_scored_rows(tiny_tok, 4, k=2)
    _content(rows[0], "chosen", " ")
    rows[3]["rejected"] = rows[3]["chosen"]
    with caplog.at_level(logging.WARNING):
        trainer = _build_from_jsonl(tmp_path, tiny_llama, rows, "infifpo", skip_invalid_rows=True)
    assert len(trainer.train_dataset) == 2
    assert "dropped 2 of 4 invalid rows; first: row 0 (id='p000'), field 'chosen'" in caplog.text
