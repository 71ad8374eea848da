"""`infifpo plan`: parameter counts from config.json without weights, and every estimate of a made-up pipeline config
checked against the arithmetic written out by hand (infifpo/plan.py's docstring states the formulas)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from infifpo import plan
from infifpo.models import resolve as models
from infifpo.plan import Hardware, estimate, model_size
from infifpo.schema import ConfigError

HW = Hardware("test", devices=4, tflops=100.0, mem_gb=1.0, mfu_train=0.5, mfu_prefill=0.5, mfu_decode=0.25)
RATE = 100e12


def tiny_params(vocab: int, qkv_bias: bool) -> int:
    """tests/conftest.make_tiny_model: hidden 64, 2 layers, 2 heads of 32 (kv 2), MLP 128, untied head."""
    h, ffn = 64, 128
    layer = 4 * h * h + 3 * h * ffn + 2 * h + (3 * h if qkv_bias else 0)  # q k v o, gate up down, 2 norms
    return 2 * vocab * h + 2 * layer + h  # embeddings + head, layers, final norm


def test_params_from_config_without_weights(tiny_llama, tiny_qwen, tmp_path):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_llama))
    llama, qwen = model_size(tiny_llama), model_size(tiny_qwen)
    assert llama.params == tiny_params(vocab, qkv_bias=False)
    assert qwen.params == tiny_params(128, qkv_bias=True)
    assert (llama.layers, llama.hidden, llama.kv_heads, llama.head_dim) == (2, 64, 2, 32)
    assert llama.kv_bytes_per_token() == 2 * 2 * 2 * 32 * 2  # K and V, 2 layers, 2 kv heads, 32 dims, bf16
    weights_only = tmp_path / "config_only"  # no weight files at all: the count needs only config.json
    weights_only.mkdir()
    (weights_only / "config.json").write_text((Path(tiny_llama) / "config.json").read_text())
    assert model_size(str(weights_only)).params == llama.params


def test_sizes_of_models_not_on_disk(tmp_path, monkeypatch):
    """A packaged model that is not materialised is not fetched (its table size is used, and said); a hub id not in
    the HF cache comes from the known sizes table; --params overrides; anything else names the --params fix."""
    monkeypatch.setenv("INFIFPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "resolve_packaged", lambda *a, **k: pytest.fail("must not materialise"))
    size = model_size("smollm2-135m-instruct")
    assert size.params == models.PACKAGED["smollm2-135m-instruct"]["params"] and "not materialised" in size.source
    phi = model_size("microsoft/phi-4")
    assert phi.params == 14.66e9 and phi.kv_bytes_per_token() == 2 * 40 * 10 * 128 * 2
    over = model_size("microsoft/phi-4", {"microsoft/phi-4": 14.0e9})
    assert over.params == 14.0e9 and over.source == "--params" and over.layers == 40
    with pytest.raises(ConfigError, match=r"--params org/unknown-model="):
        model_size("org/unknown-model")


def made_up_config(pivot: str, source: str) -> dict:
    common = {"per_device_train_batch_size": 2, "max_length": 1000, "num_train_epochs": 1,
              "gradient_checkpointing": True}
    return {"name": "made-up", "pivot": pivot, "sources": [source],
            "prompts": {"sources": ["arithmetic:train:30", "gsm8k:train:10"]},
            "sample": {"max_tokens": 100, "pivot": {"n": 4}, "sources": {"n": 2}},
            "pair": {"recipe": "infifpo", "sft_fraction": 0.25},
            "train": {"methods": ["dpo", "infifpo"], "common": common},
            "eval": {"benchmarks": ["gsm8k:test:20", "arithmetic:test:10"], "max_tokens": 64}}


def test_estimates_equal_hand_computation(tiny_llama, tiny_qwen):
    cfg = made_up_config(tiny_llama, tiny_qwen)
    sizes = {m: model_size(m) for m in (tiny_llama, tiny_qwen)}
    pl, pq = sizes[tiny_llama].params, sizes[tiny_qwen].params
    assert plan.num_prompts(cfg) == (40, 0.0)  # 30 + 10 prompts, none in the general domain
    rows = estimate(cfg, sizes, HW, prompts=40, prompt_tokens=50, concurrent=8)
    by = {(r["stage"], r["model"]): r for r in rows}
    kv = 512 * 8 * 150  # bytes per token * concurrent sequences * (50 + 100) tokens

    r = by["sample", tiny_llama]  # 40 prompts of 50 tokens prefilled once; 40 * 4 samples * 100 tokens decoded
    assert r["tokens"] == 2000 + 16000 and r["flops"] == 2 * pl * 18000
    assert r["device_hours"] * 3600 == pytest.approx(2 * pl * 2000 / (RATE * 0.5) + 2 * pl * 16000 / (RATE * 0.25))
    assert r["wall_hours"] == pytest.approx(r["device_hours"] / 4)
    assert r["mem_gb"] == pytest.approx((2 * pl + kv) / 1e9) and r["parallel"] == "TP=1" and r["fits"]
    assert by["sample", tiny_qwen]["tokens"] == 2000 + 40 * 2 * 100

    for model, params in ((tiny_llama, pl), (tiny_qwen, pq)):  # 30 po rows * 2 responses * 150 tokens, forward only
        r = by["score", model]
        assert r["tokens"] == 9000 and r["flops"] == 2 * params * 9000
        assert r["device_hours"] * 3600 == pytest.approx(2 * params * 9000 / (RATE * 0.5))

    act = lambda micro_tokens: micro_tokens * 64 * (2 * 2 + 34)  # noqa: E731 (checkpointed: 2 * layers + 34)
    sft = by["train/sft", tiny_llama]  # 10 sft rows * 150 tokens, 6 * params per token
    assert sft["tokens"] == 1500 and sft["flops"] == 6 * pl * 1500
    assert sft["device_hours"] * 3600 == pytest.approx(6 * pl * 1500 / (RATE * 0.5))
    assert sft["mem_gb"] == pytest.approx((16 * pl / 4 + act(2 * 150)) / 1e9)
    dpo = by["train/dpo", tiny_llama]  # live reference: + 2 * params per token and + 2 B/param
    assert dpo["tokens"] == 9000 and dpo["flops"] == 8 * pl * 9000
    assert dpo["mem_gb"] == pytest.approx((18 * pl / 4 + act(2 * 2 * 150)) / 1e9)
    fpo = by["train/infifpo", tiny_llama]  # reference and sources were scored offline
    assert fpo["flops"] == 6 * pl * 9000 and fpo["mem_gb"] == pytest.approx((16 * pl / 4 + act(600)) / 1e9)
    assert fpo["parallel"] == "ZeRO-3 W=4"

    evals = [r for r in rows if r["stage"].startswith("eval/")]
    assert [r["stage"] for r in evals] == ["eval/pivot", "eval/source", "eval/sft", "eval/dpo", "eval/infifpo"]
    assert all(r["tokens"] == 30 * 50 + 30 * 64 for r in evals)  # 20 + 10 items, 64 new tokens each
    assert by["eval/source", tiny_qwen]["flops"] == 2 * pq * (30 * 114)
    assert len(rows) == 2 + 2 + 3 + 5


def test_tensor_parallel_is_the_smallest_power_of_two_that_fits(tiny_llama, tiny_qwen):
    cfg = made_up_config(tiny_llama, tiny_qwen)
    sizes = {m: model_size(m) for m in (tiny_llama, tiny_qwen)}
    need = 2 * sizes[tiny_llama].params + 512 * 8 * 150
    small = Hardware("small", 4, 100.0, mem_gb=need / 3 / 0.9 / 1e9, mfu_train=0.5, mfu_prefill=0.5, mfu_decode=0.25)
    r = next(r for r in estimate(cfg, sizes, small, prompts=40, prompt_tokens=50, concurrent=8)
             if r["stage"] == "sample" and r["model"] == tiny_llama)
    assert r["parallel"] == "TP=4" and r["mem_gb"] == pytest.approx(need / 4 / 1e9) and r["fits"]


def test_cli_prints_table_and_json(tiny_llama, tiny_qwen, tmp_path, capsys):
    path = tmp_path / "made_up.yaml"
    path.write_text(yaml.safe_dump(made_up_config(tiny_llama, tiny_qwen)))
    args = ["--config", str(path), "--gpus", "4", "--gpu-tflops", "100", "--gpu-mem-gb", "1", "--mfu-train", "0.5",
            "--mfu-prefill", "0.5", "--mfu-decode", "0.25", "--prompt-tokens", "50", "--concurrent-seqs", "8"]
    assert plan.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    sizes = {m: model_size(m) for m in (tiny_llama, tiny_qwen)}
    assert out["rows"] == estimate(made_up_config(tiny_llama, tiny_qwen), sizes, HW, prompts=40, prompt_tokens=50,
                                   concurrent=8)
    assert plan.main(args) == 0
    table = capsys.readouterr().out
    assert "train/infifpo" in table and "ZeRO-3 W=4" in table and table.splitlines()[-1].startswith("total")
    assert plan.main(["--config", str(path), "--cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hardware"]["devices"] == 1
