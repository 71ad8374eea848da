"""Bad scored pairs get a named error naming the row (or a counted skip); extra columns survive column pruning."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset

from infifpo.logprobs import encode_prompt
from infifpo.schema import DataFormatError, ScoredPairsError
from infifpo.trainers.data import load_preference_dataset, validate_preference_rows
from infifpo.trainers.infifpo import InfiFPOConfig, InfiFPOTrainer
from tests.trainers.conftest import cpu_args, make_scored_rows


def _set(field, value):
    return lambda r: r.__setitem__(field, value)


BAD = {
    "nan": (_set("ref_mean_chosen_logps", float("nan")), ScoredPairsError, "ref_mean_chosen_logps.*not finite"),
    "inf_source": (lambda r: r["fuse_mean_rejected_logps"].__setitem__(1, float("-inf")), ScoredPairsError,
                   "fuse_mean_rejected_logps.*source 'm1'.*not finite"),
    "positive": (_set("ref_mean_rejected_logps", 0.5), ScoredPairsError, "positive"),
    "other_k": (lambda r: r["fuse_mean_chosen_logps"].append(-1.0), ScoredPairsError, "3 values, expected K=2"),
    "missing": (lambda r: r.pop("fuse_mean_chosen_logps"), DataFormatError, "missing column.*fuse_mean_chosen_logps"),
    "zero_tokens": (_set("ref_chosen_num_tokens", 0), ScoredPairsError, "ref_chosen_num_tokens.*positive integer"),
    "chosen_is_rejected": (lambda r: r.__setitem__("rejected", r["chosen"]), ScoredPairsError, "chosen == rejected"),
    "last_not_assistant": (_set("chosen", [{"role": "user", "content": "hi"}]), DataFormatError, "last message"),
    "empty_chosen": (_set("chosen", [{"role": "assistant", "content": ""}]), DataFormatError,
                     "field 'chosen'.*empty or whitespace only"),
    "whitespace_rejected": (_set("rejected", [{"role": "assistant", "content": " \n"}]), DataFormatError,
                            "field 'rejected'.*empty or whitespace only"),
    "beyond_float32": (_set("ref_mean_chosen_logps", -1e300), ScoredPairsError, "does not fit float32"),
    "mean_is_sum": (lambda r: r.__setitem__("ref_mean_rejected_logps", r["ref_rejected_logps"]), ScoredPairsError,
                    "field 'ref_mean_rejected_logps': mean .* != ref_rejected_logps / ref_rejected_num_tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_row_raises_named_error_naming_the_row(tiny_tok, case):
    rows = make_scored_rows(tiny_tok, 4, k=2, sources=("m0", "m1"))
    mutate, error, pattern = BAD[case]
    mutate(rows[2])
    with pytest.raises(error, match=rf"row 2 \(id='p002'\).*{pattern}"):
        validate_preference_rows(Dataset.from_list(rows), responses=("chosen", "rejected"), length_normalize=True,
                                 sources=True)


def test_nested_dict_response_in_jsonl_is_named_before_arrow(tiny_tok, tmp_path):
    rows = make_scored_rows(tiny_tok, 3, k=2)
    rows[1]["chosen"] = [{"role": "assistant", "content": {"answer": "4", "score": 1}}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError, match=r"row 1 \(id='p001'\), field 'chosen'.*content must be a string"):
        load_preference_dataset(str(path))


def test_an_empty_pairs_output_is_a_named_error_not_a_stopiteration(tmp_path):
    from infifpo.store import StageOutput

    empty = StageOutput(tmp_path, "pairs-wrpo", {"k": 1})
    path = empty.write_all([])
    with pytest.raises(DataFormatError, match=r"has no rows.*stats\.json"):
        load_preference_dataset(str(path), split="po")


def test_skip_invalid_rows_drops_and_counts(tiny_tok, caplog):
    rows = make_scored_rows(tiny_tok, 5, k=2)
    rows[1]["ref_mean_chosen_logps"] = float("nan")
    rows[3]["rejected"] = rows[3]["chosen"]
    with caplog.at_level(logging.WARNING):
        kept = validate_preference_rows(Dataset.from_list(rows), responses=("chosen", "rejected"),
                                        length_normalize=True, sources=True, skip_invalid=True)
    assert kept["id"] == ["p000", "p002", "p004"]
    assert "dropped 2 of 5" in caplog.text


def test_trainer_validates_at_init(tiny_llama, tiny_tok, tmp_path):
    rows = make_scored_rows(tiny_tok, 3, k=2)
    rows[1]["fuse_chosen_logps"] = [-1.0]  # LN off reads the sums: K=1 where the others have 2
    with pytest.raises(ScoredPairsError, match=r"row 1 \(id='p001'\), field 'fuse_chosen_logps'"):
        InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                       args=InfiFPOConfig(output_dir=str(tmp_path), length_normalize=False, **cpu_args()))


def test_reference_token_count_mismatch_is_detected(tiny_llama, tiny_tok, tmp_path):
    rows = make_scored_rows(tiny_tok, 3, k=2)
    rows[2]["ref_rejected_num_tokens"] += 1  # scored with another tokenizer / template (mean = sum / count still)
    rows[2]["ref_mean_rejected_logps"] = rows[2]["ref_rejected_logps"] / rows[2]["ref_rejected_num_tokens"]
    with pytest.raises(ScoredPairsError, match=r"row 2 \(id='p002'\), field 'ref_rejected_num_tokens'.*scores cover"):
        InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                       args=InfiFPOConfig(output_dir=str(tmp_path), **cpu_args()))
    # A row longer than max_length is never cut (the scores cover the whole response): named with both lengths,
    # whether the prompt alone fills max_length (TRL would drop the row) or prompt + response exceed it.
    rows = make_scored_rows(tiny_tok, 3, k=2)
    longest_prompt = max(len(encode_prompt(tiny_tok, r["prompt"])) for r in rows)
    with pytest.raises(ScoredPairsError, match=rf"row 0 .*field 'chosen'.*exceed max_length={longest_prompt + 2}"):
        InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                       args=InfiFPOConfig(output_dir=str(tmp_path), **cpu_args(max_length=longest_prompt + 2)))
    with pytest.raises(ScoredPairsError, match=r"row 0 \(id='p000'\), field 'chosen': the prompt \(20 tokens\) .*"
                                               r"exceed max_length=10"):
        InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                       args=InfiFPOConfig(output_dir=str(tmp_path), **cpu_args(max_length=10)))
    with pytest.raises(ScoredPairsError, match="every row was too-long"):
        InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                       args=InfiFPOConfig(output_dir=str(tmp_path), skip_invalid_rows=True, **cpu_args(max_length=10)))


def test_score_columns_survive_remove_unused_columns(tiny_llama, tiny_tok, tmp_path):
    rows = make_scored_rows(tiny_tok, 2, k=2)
    trainer = InfiFPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                             args=InfiFPOConfig(output_dir=str(tmp_path), remove_unused_columns=True,
                                                **cpu_args(per_device_train_batch_size=2)))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "id" not in batch and "source_models" not in batch  # pruned, while the score columns were kept:
    order = sorted(range(2), key=lambda i: batch["ref_mean_chosen_logps"][i].item())
    expected = sorted(rows, key=lambda r: r["ref_mean_chosen_logps"])
    for i, row in zip(order, expected, strict=True):
        assert batch["fuse_mean_rejected_logps"][i].tolist() == pytest.approx(row["fuse_mean_rejected_logps"])
    assert batch["fuse_mean_chosen_logps"].shape == (2, 2) and batch["fuse_mean_chosen_logps"].dtype == torch.float32
