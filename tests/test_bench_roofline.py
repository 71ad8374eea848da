"""The generation roofline's bound (bench/bench_roofline.py) against hand computations on a made-up config, and its
parameter count against a real (tiny) Llama's linear layers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_roofline import ModelShape, _context_tokens, decode_bound  # noqa: E402

# 2 layers (the first with a sliding window of 3), hidden 8, 2 query heads and 1 KV head of dim 4, MLP 16, vocab 32.
CONFIG = {"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
          "intermediate_size": 16, "vocab_size": 32, "sliding_window": 3,
          "layer_types": ["sliding_attention", "full_attention"]}


@pytest.mark.timeout(60)
def test_parameter_and_kv_counts_by_hand() -> None:
    shape = ModelShape.from_config({"text_config": CONFIG})
    # per layer: q 8x8 = 64, k 8x4 = 32, v 32, o 64 -> 192; gate, up, down 3 x 8 x 16 = 384 -> 576; 2 layers: 1152
    assert shape.matmul_params == 1152
    assert shape.head_params == 8 * 32 == 256
    # K and V, 1 head of dim 4, 2 layers, 2 bytes: 2 x 1 x 4 x 2 x 2 = 32 bytes per token
    assert shape.kv_bytes_per_token(2) == 32
    assert shape.keys_per_layer(5) == [3, 5] and shape.keys_per_layer(2) == [2, 2]


@pytest.mark.timeout(60)
def test_decode_bound_by_hand_compute_and_memory_bound() -> None:
    shape = ModelShape.from_config(CONFIG)
    # B = 2 sequences at L = 5 in bf16: the sliding layer reads 3 keys, the full one 5 -> 8 per sequence.
    # bytes: weights 2 x (1152 + 256) = 2816; KV 2 seqs x 2 bytes x 2 (K, V) x 1 head x 4 dims x 8 keys = 256 -> 3072
    # FLOPs: 2 x 1408 x 2 = 5632 weights and head; attention 2 x 4 x 2 heads x 4 dims x 8 keys = 512 -> 6144
    b = decode_bound(shape, batch=2, context=5, dtype_bytes=2, bandwidth=1000.0, flops_rate=1000.0)
    assert (b["bytes"], b["flops"]) == (3072, 6144)
    assert b["memory_s"] == pytest.approx(3.072) and b["compute_s"] == pytest.approx(6.144)
    assert b["bound"] == "compute" and b["tok_s"] == pytest.approx(2 / 6.144)
    # fp32 doubles the bytes (6144 -> 6.144 s), not the FLOPs (6144 at 1e9/s: 6 us): memory-bound, 2 tokens per step
    b = decode_bound(shape, batch=2, context=5, dtype_bytes=4, bandwidth=1000.0, flops_rate=1e9)
    assert b["bytes"] == 6144 and b["bound"] == "memory" and b["tok_s"] == pytest.approx(2 / 6.144)


@pytest.mark.timeout(60)
def test_context_tokens_sum() -> None:
    # a 3-token prompt, 4 generated tokens: contexts 3, 4, 5, 6
    assert _context_tokens(3, 4) == 3 + 4 + 5 + 6
    assert _context_tokens(7, 0) == 0


@pytest.mark.timeout(120)
def test_matmul_params_equal_a_tiny_llamas_linear_weights() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, torch.nn.Linear))
    shape = ModelShape.from_config(config.to_dict())
    assert shape.head_dim == 8 and shape.matmul_params == linear
    assert ModelShape.from_config({**config.to_dict(), "head_dim": None}).head_dim == 8  # Qwen2: hidden / heads
    assert shape.head_params == model.lm_head.weight.numel()
