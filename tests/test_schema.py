"""schema: row checks name the row and the field."""

import math

import pytest

from infifpo.schema import (
    DataFormatError,
    ScoredPairsError,
    check_logp,
    check_messages,
    fuse_columns,
    ref_columns,
    require_columns,
    sample_id,
)


def test_column_names_match_the_official_infifpo_format():
    assert ref_columns("chosen") == ("ref_chosen_logps", "ref_mean_chosen_logps", "ref_chosen_num_tokens")
    assert fuse_columns("rejected")[:2] == ("fuse_rejected_logps", "fuse_mean_rejected_logps")
    assert sample_id("p1", "m", 3) == "p1|m|3"


def test_require_columns_lists_missing_and_found():
    with pytest.raises(DataFormatError, match=r"row 4 \(id='x'\).*\['rejected'\].*found \['chosen', 'id'\]"):
        require_columns({"id": "x", "chosen": "a"}, ["chosen", "rejected"], 4, "pairs")


@pytest.mark.parametrize(
    "value, match",
    [
        ("hello", "list of chat messages"),
        ([], "non-empty"),
        ([{"role": "user"}], "message 0"),
        ([{"role": "assistant", "content": {"answer": "4", "score": 1}}], "nested dicts"),
    ],
)
def test_check_messages_rejects_malformed(value, match):
    with pytest.raises(DataFormatError, match=match):
        check_messages(value, 2, {"id": "r"}, "chosen")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "1.0", True, 0.5])
def test_check_logp_rejects_nonfinite_positive_and_non_numbers(bad):
    with pytest.raises(ScoredPairsError, match=r"row 0.*ref_chosen_logps"):
        check_logp(bad, 0, {}, "ref_chosen_logps")


def test_check_logp_accepts_valid_values():
    assert check_logp(-3, 0, {}, "f") == -3.0
    assert check_logp(0.0, 0, {}, "f") == 0.0
