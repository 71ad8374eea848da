"""The transformers engine: chunked scoring equals a naive full-logits forward, batching, sampling, load errors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GraniteConfig

from infifpo.backends import SamplingSpec
from infifpo.backends.hf_engine import (
    CUDA_MIN_TOKEN_BUDGET,
    CUDA_TOKEN_BUDGET,
    DEFAULT_TOKEN_BUDGET,
    HFEngine,
    cuda_token_budget,
    load_causal_lm,
    resolve_dtype,
    token_budget_batches,
)
from infifpo.logprobs import head_token_logprobs, head_token_stats
from infifpo.schema import ModelLoadError
from tests.conftest import make_char_tokenizer


def naive_logps(model_dir: str, prompt: list[int], completion: list[int]) -> list[float]:
    """Reference: one unpadded fp32 forward, full-vocabulary log_softmax, gather the completion tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return [logp[len(prompt) + j - 1, t].item() for j, t in enumerate(completion)]


def naive_entropies(model_dir: str, prompt: list[int], completion: list[int]) -> list[float]:
    """Reference: the entropy −Σ p log p (nats) of the full-vocabulary fp32 next-token distribution at each position
    that predicts a completion token, from one unpadded forward."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    p = torch.softmax(logits, -1)
    entropy = -(p * torch.log(p)).sum(-1)
    return [entropy[len(prompt) + j - 1].item() for j in range(len(completion))]


def random_requests(n: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    completions = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 30))] for _ in range(n)]
    return prompts, completions


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen", "tiny_gemma"])
def test_score_equals_naive_full_logits_forward(fixture, request):
    """Every per-token log-prob equals the unbatched full-vocabulary fp32 forward to 1e-5, with a budget small
    enough to force many right-padded batches, a head chunk of 3 positions, and (gemma) soft-capping."""
    model_dir = request.getfixturevalue(fixture)
    engine = HFEngine(model_dir, dtype="float32", token_budget=48, head_chunk=3)
    prompts, completions = random_requests(9, 90)
    got = engine.score(prompts, completions)
    for p, c, g in zip(prompts, completions, got, strict=True):
        assert len(g) == len(c)
        assert g == pytest.approx(naive_logps(model_dir, p, c), abs=1e-5)


def test_score_independent_of_request_order(tiny_qwen):
    """Results come back in request order whatever the batching: a shuffled request list gives the same values."""
    engine = HFEngine(tiny_qwen, dtype="float32", token_budget=64)
    prompts, completions = random_requests(12, 90, seed=1)
    base = engine.score(prompts, completions)
    order = list(range(12))
    random.Random(5).shuffle(order)
    shuffled = engine.score([prompts[i] for i in order], [completions[i] for i in order])
    for k, i in enumerate(order):
        assert shuffled[k] == pytest.approx(base[i], abs=1e-5)


def test_padded_vocabulary_is_scored_over_the_model_vocab(tiny_qwen):
    """T6: config vocab (128) > len(tokenizer); ids of the padded rows are valid, ids past the head are refused."""
    engine = HFEngine(tiny_qwen, dtype="float32")
    assert engine.vocab_size == 128 and len(engine.tokenizer) < 128
    (logps,) = engine.score([[5, 6]], [[127, 3]])
    assert logps == pytest.approx(naive_logps(tiny_qwen, [5, 6], [127, 3]), abs=1e-5)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.score([[5]], [[128]])


def test_head_logprobs_known_logits():
    """C8: log-softmax, not raw logits; hand-computed with an identity head: logits (0, ln 3) -> log p = ln(3/4)."""
    head = torch.nn.Linear(2, 2, bias=False)
    head.weight.data = torch.eye(2)
    hidden = torch.tensor([[0.0, math.log(3.0)]] * 5)
    got = head_token_logprobs(hidden, torch.tensor([1, 0, 1, 0, 1]), head, chunk_size=2)
    want = torch.tensor([math.log(0.75), math.log(0.25)] * 2 + [math.log(0.75)])
    torch.testing.assert_close(got, want)
    capped = head_token_logprobs(hidden[:1], torch.tensor([1]), head, softcap=0.5)
    z = 0.5 * math.tanh(math.log(3.0) / 0.5)
    assert capped.item() == pytest.approx(z - math.log(1 + math.exp(z)), abs=1e-6)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_vocab_tiled_head_equals_full_log_softmax(monkeypatch, softcap):
    """The no-grad path combines the log-sum-exp over vocabulary tiles (here 256 wide, several position blocks, a last
    tile narrower than the rest): it equals log_softmax over the whole vocabulary, and the autograd path, in fp32."""
    import infifpo.logprobs as lp

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False)
    hidden, targets = torch.randn(700, 16) * 3, torch.randint(0, 1000, (700,))
    logits = hidden @ head.weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    monkeypatch.setattr(lp, "HEAD_TILE_ELEMENTS", 300 * 256)  # 300 positions per block, tiles of 256 columns
    with torch.no_grad():
        tiled = head_token_logprobs(hidden, targets, head, softcap=softcap)
    torch.testing.assert_close(tiled, want.detach(), atol=1e-5, rtol=1e-5)
    hidden.requires_grad_(True)
    graded = head_token_logprobs(hidden, targets, head, softcap=softcap)  # autograd: position chunks
    assert graded.requires_grad
    torch.testing.assert_close(graded.detach(), want.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("path", ["tiled", "static_width", "chunks"])
def test_head_entropy_equals_full_softmax_entropy(monkeypatch, softcap, path):
    """The next-token entropy from the vocabulary tiles (eager; the static-width tiles the compiled head uses, run
    uncompiled here; position chunks) equals −Σ p log p of the full softmax, and the log-probs are unchanged."""
    import infifpo.logprobs as lp

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False)
    hidden, targets = torch.randn(700, 16) * 3, torch.randint(0, 1000, (700,))
    hidden[:3] = head.weight[targets[:3]].detach() * 400  # logits of ~100s: near-certain, and fp32 cancellation-prone
    logits = hidden @ head.weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    p = torch.softmax(logits.double(), -1)
    want_h = -(p * torch.log(p)).nan_to_num().sum(-1).float()
    want_lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    monkeypatch.setattr(lp, "HEAD_TILE_ELEMENTS", 300 * 256)  # 300 positions per block, tiles of 256 columns
    monkeypatch.setattr(lp, "COMPILED_HEAD_TILE_COLUMNS", 384)  # static width: two full tiles and a narrower one
    monkeypatch.setattr(lp, "_maybe_compiled", lambda fn, compiled, dynamic=True: fn)
    kw = {"chunk_size": 64} if path == "chunks" else {"compiled": path == "static_width"}
    with torch.no_grad():
        logps, entropy = head_token_stats(hidden, targets, head, softcap=softcap, entropy=True, **kw)
        assert torch.equal(logps, head_token_logprobs(hidden, targets, head, softcap=softcap, **kw))
        assert head_token_stats(hidden, targets, head, softcap=softcap, **kw)[1] is None
    torch.testing.assert_close(entropy, want_h, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logps[3:], want_lp[3:], atol=1e-5, rtol=1e-5)
    assert float(entropy.min()) >= 0.0
    if softcap is None:
        assert float(entropy[:3].max()) < 1e-2 < float(entropy[3:].min())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
@pytest.mark.parametrize("head_chunk", [None, 3])
def test_engine_entropy_equals_naive_full_softmax_entropy(fixture, head_chunk, request):
    """score_with_entropy: per-token entropies equal the unbatched full-vocabulary forward's to 1e-5 (gemma:
    soft-capped), over padded batches, and its log-probs are score()'s."""
    model_dir = request.getfixturevalue(fixture)
    engine = HFEngine(model_dir, dtype="float32", token_budget=48, head_chunk=head_chunk)
    prompts, completions = random_requests(7, 90, seed=3)
    logps, entropies = engine.score_with_entropy(prompts, completions)
    assert logps == engine.score(prompts, completions)
    for p, c, h in zip(prompts, completions, entropies, strict=True):
        assert h == pytest.approx(naive_entropies(model_dir, p, c), abs=1e-5)


def test_token_budget_batches_cover_each_request_once_within_budget():
    lengths = [random.Random(0).randint(1, 50) for _ in range(40)] + [200]
    batches = list(token_budget_batches(lengths, 120))
    assert sorted(i for b in batches for i in b) == list(range(41))
    assert batches[0] == [40]  # longer than the budget: alone
    for b in batches[1:]:
        assert len(b) * max(lengths[i] for i in b) <= 120
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)


def test_bf16_scores_close_to_fp32(tiny_llama):
    """The bf16 path (default on AMX CPUs) stays within bf16 rounding of the fp32 scores on a tiny model."""
    prompts, completions = random_requests(4, 90, seed=2)
    fp32 = HFEngine(tiny_llama, dtype="float32").score(prompts, completions)
    bf16 = HFEngine(tiny_llama, dtype="bfloat16").score(prompts, completions)
    for a, b in zip(fp32, bf16, strict=True):
        assert b == pytest.approx(a, abs=0.05)
    assert resolve_dtype("float32") == "float32"
    with pytest.raises(ValueError):
        resolve_dtype("float16x")


def test_generate_samples_stop_tokens_and_logp(tiny_llama):
    """n samples per prompt; "stop" samples end with a stop id and contain no earlier one; "length" ones have
    max_tokens ids; logp is the raw summed log-prob of the ids; the same seed reproduces the samples."""
    engine = HFEngine(tiny_llama, dtype="float32")
    stop_extra = [engine.tokenizer.convert_tokens_to_ids(c) for c in "aeiou"]
    engine.model.generation_config.eos_token_id = [engine.tokenizer.eos_token_id, *stop_extra]
    stops = set(engine.stop_ids())
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14, 15]]
    spec = SamplingSpec(n=3, temperature=1.0, top_p=1.0, max_tokens=10, seed=4)
    out = engine.generate(prompts, spec)
    assert [len(g) for g in out] == [3, 3]
    reasons = set()
    for p, gens in zip(prompts, out, strict=True):
        for g in gens:
            reasons.add(g.finish_reason)
            assert not stops & set(g.token_ids[:-1])
            if g.finish_reason == "stop":
                assert g.token_ids[-1] in stops
            else:
                assert len(g.token_ids) == 10
            assert g.logp == pytest.approx(sum(naive_logps(tiny_llama, p, g.token_ids)), abs=1e-4)
            assert g.text == engine.tokenizer.decode(g.token_ids, skip_special_tokens=True)
    assert reasons == {"stop", "length"}  # 6 vowel-stop chances per token: both happen with this seed
    again = engine.generate(prompts, spec)
    assert [[g.token_ids for g in gs] for gs in again] == [[g.token_ids for g in gs] for gs in out]


def test_model_that_fails_to_load_names_it(tmp_path):
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "vocab_size": "many"}')
    with pytest.raises(ModelLoadError, match="broken-model"):
        HFEngine(str(bad))


def test_unreplicated_logit_postprocessing_is_refused(tmp_path):
    """Granite divides logits by logits_scaling in its forward: the self-check catches it instead of mis-scoring."""
    path = str(tmp_path)
    tok = make_char_tokenizer(path)
    cfg = GraniteConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, logits_scaling=8.0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    with pytest.raises(ModelLoadError, match="does not replicate"):
        HFEngine(path, dtype="float32")


@pytest.mark.slow
def test_compiled_head_equals_eager(tiny_gemma):
    """torch.compile'd chunked log-softmax (with soft-capping) gives the eager values; compiles once (~30 s)."""
    prompts, completions = random_requests(5, 90, seed=3)
    eager = HFEngine(tiny_gemma, dtype="float32", head_chunk=7).score(prompts, completions)
    compiled = HFEngine(tiny_gemma, dtype="float32", head_chunk=7, compile_head=True).score(prompts, completions)
    for a, b in zip(eager, compiled, strict=True):
        assert b == pytest.approx(a, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_load_equals_from_pretrained(tiny_gemma, dtype):
    """The streaming safetensors loader (fp32 checkpoint -> dtype without holding the fp32 copy) gives exactly the
    tensors, tying and buffers of a plain from_pretrained in that dtype."""
    ours = load_causal_lm(tiny_gemma, dtype)
    ref = AutoModelForCausalLM.from_pretrained(tiny_gemma, dtype=dtype).eval()
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(ours.named_buffers(), ref.named_buffers(), strict=True))
    assert not ours.training


def test_truncated_checkpoint_is_a_load_error(tiny_llama, tmp_path):
    """A weights file cut short is refused with ModelLoadError naming the model, never read as garbage."""
    import shutil

    broken = tmp_path / "cut-model"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="cut-model"):
        HFEngine(str(broken), dtype="float32")


def test_token_budget_default_is_per_device_and_an_explicit_one_wins(tiny_llama) -> None:
    """token_budget=None (what `infifpo score` passes when --token-budget is not given) means the CPU default on CPU;
    an explicit budget is kept as given."""
    assert HFEngine(tiny_llama, dtype="float32").token_budget == DEFAULT_TOKEN_BUDGET == 4096
    assert HFEngine(tiny_llama, dtype="float32", token_budget=None).token_budget == DEFAULT_TOKEN_BUDGET
    assert HFEngine(tiny_llama, dtype="float32", token_budget=96).token_budget == 96


def test_cuda_token_budget_fits_the_kv_cache_and_activations_in_a_share_of_free_memory() -> None:
    """Hand computation: bytes per token = 2 x (2 x layers x kv_heads x head_dim + 3 x MLP width + 4 x hidden) in bf16;
    the budget is CUDA_MEMORY_SHARE of the free bytes over that, rounded down to 1024, within the bounds."""
    from transformers import LlamaConfig, Qwen2Config

    smol = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       intermediate_size=1536)
    per_token = 2 * (2 * 30 * 3 * 64 + 3 * 1536 + 4 * 576)
    assert per_token == 36864
    assert cuda_token_budget(smol, 70 * 2**30) == CUDA_TOKEN_BUDGET == 65536  # an H100 after a 135M model: capped
    assert cuda_token_budget(smol, 4 * 2**30) == int(0.25 * 4 * 2**30 / per_token) // 1024 * 1024 == 28672
    assert cuda_token_budget(smol, 2**20) == CUDA_MIN_TOKEN_BUDGET  # nearly full: the floor, not zero
    # A Qwen2.5-7B-like model on a 24 GB card (~8 GB free after its bf16 weights): GQA KV and a wide MLP.
    qwen7b = Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         intermediate_size=18944)
    per_token = 2 * (2 * 28 * 4 * 128 + 3 * 18944 + 4 * 3584)
    assert cuda_token_budget(qwen7b, 8 * 2**30) == int(0.25 * 8 * 2**30 / per_token) // 1024 * 1024 == 10240
    # A Gemma-3-style config (explicit head_dim, text config nested or not) in fp32: 4 bytes per element.
    gemma = Gemma3TextConfig(hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                             head_dim=256, intermediate_size=2048)
    per_token = 4 * (2 * 18 * 1 * 256 + 3 * 2048 + 4 * 640)
    fit = int(0.25 * 2 * 2**30 / per_token) // 1024 * 1024
    assert cuda_token_budget(gemma, 2 * 2**30, elem_bytes=4) == fit == 7168
