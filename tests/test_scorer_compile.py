"""The transformers scorer's torch.compile path: compiled scores equal eager ones, the auto policy, and a compile
failure (no C++ compiler) falling back to eager scoring with a warning. Each compile takes ~10-60 s on 2 cores."""

from __future__ import annotations

import functools
import logging
import math
import random

import pytest
import torch
from transformers.activations import GELUTanh

from infifpo.backends import hf_engine
from infifpo.backends.hf_engine import GELUTanhForCompile, HFEngine, compile_setting, use_compile_friendly_gelu


def requests(n: int, vocab: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    completions = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 30))] for _ in range(n)]
    return prompts, completions


def test_compile_setting_env_and_explicit(monkeypatch):
    """An explicit choice wins over INFIFPO_COMPILE; the env var decides otherwise; unset means auto (None)."""
    monkeypatch.setenv("INFIFPO_COMPILE", "0")
    assert compile_setting(None) is False and compile_setting(True) is True
    monkeypatch.setenv("INFIFPO_COMPILE", "1")
    assert compile_setting(None) is True and compile_setting(False) is False
    monkeypatch.delenv("INFIFPO_COMPILE")
    assert compile_setting(None) is None


def test_auto_compile_waits_for_enough_tokens(tiny_llama, monkeypatch):
    """Auto mode scores eagerly until COMPILE_AFTER_TOKENS tokens were scored, batches of one always stay eager."""
    monkeypatch.delenv("INFIFPO_COMPILE", raising=False)
    engine = HFEngine(tiny_llama, dtype="float32")
    assert engine.compile is None and not engine._wants_compile(4)
    engine.tokens_scored = hf_engine.COMPILE_AFTER_TOKENS
    assert engine._wants_compile(4) and not engine._wants_compile(1)
    assert not HFEngine(tiny_llama, dtype="float32", compile=False)._wants_compile(4)


@pytest.fixture
def no_cxx(tmp_path, monkeypatch):
    """Inductor pointed at a C++ compiler that does not exist, with no cached kernels to reuse; undone afterwards,
    including the compiler lookups cpp_builder caches per process."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpp_builder

    def reset() -> None:
        torch._dynamo.reset()
        for fn in vars(cpp_builder).values():
            if isinstance(fn, functools._lru_cache_wrapper):
                fn.cache_clear()

    reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with inductor_config.patch({"fx_graph_cache": False, "compile_threads": 1,
                                "cpp.cxx": (None, str(tmp_path / "no-such-c++"))}):
        yield
    monkeypatch.undo()
    reset()


def test_compile_failure_falls_back_to_eager_with_warning(tiny_qwen, no_cxx, caplog):
    """No usable C++ compiler: inductor fails on the first compiled batch; the engine logs a warning naming the
    model and the way to skip the attempt, returns the eager scores for that batch, and stays eager afterwards."""
    prompts, completions = requests(6, 90, seed=7)
    eager = HFEngine(tiny_qwen, dtype="float32", compile=False).score(prompts, completions)
    engine = HFEngine(tiny_qwen, dtype="float32", compile=True)
    with caplog.at_level(logging.WARNING, logger="infifpo.backends.hf_engine"):
        got = engine.score(prompts, completions)
    assert engine._compile_failed
    warnings = [r.getMessage() for r in caplog.records if "scoring eagerly instead" in r.getMessage()]
    assert len(warnings) == 1 and tiny_qwen in warnings[0] and "INFIFPO_COMPILE=0" in warnings[0]
    for a, b in zip(eager, got, strict=True):
        assert b == pytest.approx(a, abs=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_compiled_scores_equal_eager(fixture, request):
    """The compiled backbone (dynamic shapes: several batch widths and sizes) and compiled head give the eager
    fp32 scores to 1e-4 nats per token, and the compiled path really ran (no silent fallback); Gemma's gelu runs in
    its compile form (x * sigmoid(2z)) there."""
    model_dir = request.getfixturevalue(fixture)
    prompts, completions = requests(14, 90, seed=11)
    eager = HFEngine(model_dir, dtype="float32", token_budget=96, compile=False).score(prompts, completions)
    engine = HFEngine(model_dir, dtype="float32", token_budget=96, compile=True)
    gelus = [m for m in engine.model.modules() if isinstance(m, GELUTanh)]
    assert all(type(m) is GELUTanhForCompile for m in gelus) and len(gelus) == (2 if fixture == "tiny_gemma" else 0)
    got = engine.score(prompts, completions)
    assert engine._compiled_backbone is not None and not engine._compile_failed
    for p, a, b in zip(completions, eager, got, strict=True):
        assert len(b) == len(p)
        assert b == pytest.approx(a, abs=1e-4)


def test_compiled_entropies_equal_eager(tiny_gemma):
    """score_with_entropy through the compiled backbone and the compiled static-width head (soft-capped): the eager
    per-token entropies to 1e-4 nats, with the compiled path really run."""
    prompts, completions = requests(10, 90, seed=12)
    _, eager = HFEngine(tiny_gemma, dtype="float32", token_budget=96, compile=False).score_with_entropy(prompts,
                                                                                                     completions)
    engine = HFEngine(tiny_gemma, dtype="float32", token_budget=96, compile=True)
    _, got = engine.score_with_entropy(prompts, completions)
    assert engine._compiled_backbone is not None and not engine._compile_failed
    for a, b in zip(eager, got, strict=True):
        assert b == pytest.approx(a, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_form_of_gelu_tanh_matches_torch_gelu(dtype):
    """GELUTanhForCompile: eagerly the very F.gelu(approximate="tanh") output; compiled (x * sigmoid(2z) in fp32, then
    rounded) within fp32 rounding of the exact value, i.e. correctly rounded to bf16 up to one step. The exact value
    is the fp64 sigmoid form (the tanh form cancels for x << 0, where eager's own error is largest)."""
    x = torch.linspace(-12, 12, 4097, dtype=torch.float64).to(dtype)
    exact = x.double() * torch.sigmoid(math.sqrt(8 / math.pi) * (x.double() + 0.044715 * x.double() ** 3))
    module = GELUTanh()
    assert use_compile_friendly_gelu(torch.nn.Sequential(module, GELUTanh(use_gelu_tanh_python=True))) == 1
    assert type(module) is GELUTanhForCompile
    assert torch.equal(module(x), torch.nn.functional.gelu(x, approximate="tanh"))
    compiled = torch.compile(module)(x)
    assert compiled.dtype == dtype
    err = (compiled.double() - exact).abs()
    bound = 1e-6 if dtype == torch.float32 else torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-30
    assert (err <= bound).all(), float((err - bound).max())


@pytest.fixture
def fresh_head_compiles():
    """No compiled head functions or dynamo caches from earlier tests, before and after."""
    from infifpo import logprobs

    def reset() -> None:
        torch._dynamo.reset()
        logprobs._compiled.clear()

    reset()
    yield
    reset()


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_static_width_compiled_head_is_exact_and_compiles_once_for_any_number_of_positions(monkeypatch, softcap,
                                                                                          fresh_head_compiles):
    """The compiled head (fixed-width vocabulary tiles, only the row count dynamic), with small tiles: log-probs
    equal an fp32 log_softmax to 1e-5 nats for several position counts (blocks of 16 positions, so some calls span
    two or three blocks), and after the first call no other count recompiles it."""
    from infifpo import logprobs

    monkeypatch.setattr(logprobs, "COMPILED_HEAD_TILE_COLUMNS", 64)
    monkeypatch.setattr(logprobs, "HEAD_TILE_ELEMENTS", 64 * 16)  # blocks of 16 positions on CPU
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(24, 288, bias=False)  # 4 tiles of 64 and a narrower last one of 32: two static widths
    with torch.no_grad():
        head.weight.normal_(0, 0.5, generator=gen)
        hidden_all = torch.randn(40, 24, generator=gen)
        targets_all = torch.randint(0, 288, (40,), generator=gen)
        logits = head(hidden_all).double()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        want = logits.log_softmax(-1).gather(1, targets_all[:, None]).squeeze(1)
        first = logprobs.head_token_logprobs(hidden_all[:5], targets_all[:5], head, softcap=softcap, compiled=True)
        assert first.double() == pytest.approx(want[:5], abs=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):  # rows 7, 14, 16+4, 16+16+8: no new graph
            for n in (7, 14, 20, 40):
                got = logprobs.head_token_logprobs(hidden_all[:n], targets_all[:n], head, softcap=softcap,
                                                   compiled=True)
                assert got.dtype == torch.float32 and got.double() == pytest.approx(want[:n], abs=1e-5)
    assert list(logprobs._compiled) == ["_tile_logsumexp/static"]
