"""Reward-model scoring with a tiny random LlamaForSequenceClassification: chat template, batching, padding
(docs/bad-inputs.md J10)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from infifpo.judge import score_with_reward_model
from infifpo.judge.reward_model import load_reward_model
from infifpo.schema import ChatTemplateError, DataFormatError, ModelLoadError
from tests.judge.conftest import make_tiny_reward_model

PROMPTS = [
    "What is 2+2?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    "Write a long story about a cat who sat on a mat and then went outside to play.",
    "Hi",
    "Add 17 and 25.",
]
RESPONSES = ["4", "Red.", "Once upon a time a cat sat on a mat; later it went out to play in the sun.", "Hello!", "42"]


def _single(model, tok, prompt, response) -> float:
    """Unbatched reference: the template-rendered conversation, one sequence, no padding."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item()


def test_scores_match_unbatched_template_forward(tiny_rm: str) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_rm)
    expected = [_single(model, tok, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    got = score_with_reward_model(PROMPTS, RESPONSES, tiny_rm, batch_size=8, progress=False)
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 6) for x in got)) == len(got)  # distinct inputs, distinct scores: not a constant head


def test_scores_do_not_depend_on_batch_size_order_or_padding_side(tiny_rm: str) -> None:
    loaded = load_reward_model(tiny_rm)
    assert loaded[1].padding_side == "left"  # the saved tokenizer pads left; scoring must not care
    base = score_with_reward_model(PROMPTS, RESPONSES, loaded, batch_size=1, progress=False)
    for batch_size in (2, 3, 5):
        assert score_with_reward_model(PROMPTS, RESPONSES, loaded, batch_size, progress=False) == pytest.approx(
            base, abs=1e-5
        )
    order = list(range(len(PROMPTS)))
    random.Random(0).shuffle(order)
    shuffled = score_with_reward_model([PROMPTS[i] for i in order], [RESPONSES[i] for i in order], loaded, 2,
                                       progress=False)
    assert shuffled == pytest.approx([base[i] for i in order], abs=1e-5)
    loaded[1].padding_side = "right"
    assert score_with_reward_model(PROMPTS, RESPONSES, loaded, 5, progress=False) == pytest.approx(base, abs=1e-5)


def test_padding_without_attention_mask_would_change_the_score(tiny_rm: str) -> None:
    """Control for the test above: mishandled padding (pads attended to) does shift this model's scores."""
    model, tok = load_reward_model(tiny_rm)
    short, long_ = "<u>Hi|<a>Yo|", "<u>Hello there, a much longer conversation|<a>Sure|"
    batch = tok([short, long_], add_special_tokens=False, padding=True, return_tensors="pt")  # padding_side left
    with torch.no_grad():
        unmasked = model(input_ids=batch["input_ids"]).logits[0, 0].item()
        alone = model(input_ids=tok([short], add_special_tokens=False, return_tensors="pt")["input_ids"]).logits[0, 0]
    assert abs(unmasked - alone.item()) > 1e-4


def test_causal_lm_loaded_as_reward_model_is_refused(tiny_llama: str) -> None:
    with pytest.raises(ModelLoadError, match="classification head"):
        score_with_reward_model(["q"], ["a"], tiny_llama, progress=False)


def test_tokenizer_without_chat_template_is_refused(tmp_path) -> None:
    path = make_tiny_reward_model(str(tmp_path / "rm"), with_template=False)
    with pytest.raises(ChatTemplateError, match="chat template"):
        score_with_reward_model(["q"], ["a"], path, progress=False)


def test_bad_inputs_raise_named_errors(tiny_rm: str) -> None:
    with pytest.raises(DataFormatError, match="2 prompts but 1 responses"):
        score_with_reward_model(["a", "b"], ["x"], tiny_rm, progress=False)
    with pytest.raises(DataFormatError, match="prompt 0"):
        score_with_reward_model([{"content": "no role"}], ["x"], tiny_rm, progress=False)
    with pytest.raises(DataFormatError, match="over the reward model's 20"):
        score_with_reward_model(["a long prompt indeed"], ["x"], tiny_rm, max_length=20, progress=False)
