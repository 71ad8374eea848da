"""Fixtures of the judge tests: a tiny random reward model (LlamaForSequenceClassification, one label) on disk."""

from __future__ import annotations

import pytest

from tests.conftest import make_char_tokenizer


def make_tiny_reward_model(path: str, *, seed: int = 0, with_template: bool = True) -> str:
    """Save a random-weight LlamaForSequenceClassification (num_labels=1) with the char tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = make_char_tokenizer(path, with_template=with_template)  # saved with padding_side="left"
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, num_labels=1,
    )
    torch.manual_seed(seed)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory) -> str:
    """Path of a saved tiny random reward model with the character tokenizer and its chat template."""
    return make_tiny_reward_model(str(tmp_path_factory.mktemp("tiny_rm")))
