"""Which tokens a response is, under each model's own tokenizer and chat template.

Owns: the prompt/response token split shared by every stage that needs it (sample encodes prompts with it, score
scores the spans it returns, the OPD trainer scores teachers with it). The rule is TRL 1.16's for conversational
data (docs/methods.md, "Response tokens"): the completion is the suffix of template(prompt + response) after its common
prefix with template(prompt, add_generation_prompt=True), ending with the template's end-of-turn token; when a row
has several responses the prompt length is the minimum common prefix over all of them, exactly as DPOTrainer does.
Does not own: running models (``backends``) or what the numbers are used for (``fusion``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from infifpo.schema import ChatTemplateError

Messages = list[dict[str, str]]


def require_chat_template(tokenizer: Any, name: str | None = None) -> None:
    """ChatTemplateError naming how to give one, unless ``tokenizer`` has a chat template (no plain-text fallback)."""
    if getattr(tokenizer, "chat_template", None):
        return
    name = name or getattr(tokenizer, "name_or_path", "?")
    raise ChatTemplateError(
        f"model {name!r} has no chat template, so conversations cannot be rendered as it expects. Pass one: save it "
        "as chat_template.jinja in the model directory (transformers loads it from there; `infifpo train` also "
        "takes --chat_template_path FILE.jinja). Packaged base models ship one (infifpo/models/templates)."
    )


def _chat_ids(tokenizer: Any, messages: Messages, **kwargs: Any) -> list[int]:
    require_chat_template(tokenizer)
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except Exception as e:  # jinja raises TemplateError, some templates raise on role order
        raise ChatTemplateError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', '?')!r} rejected the conversation "
            f"(roles {[m.get('role') for m in messages]}): {e}"
        ) from e
    return list(out["input_ids"])


def encode_prompt(tokenizer: Any, prompt: Messages) -> list[int]:
    """Token ids of ``prompt`` rendered with the chat template and the generation prompt (what a model samples
    from)."""
    return _chat_ids(tokenizer, prompt, add_generation_prompt=True)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def response_spans(tokenizer: Any, prompt: Messages, responses: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Split ``prompt + [assistant: r]`` for every r in ``responses`` into (shared prompt ids, completion ids per r).

    Completion ids are exactly the tokens TRL's DPOTrainer sums over for conversational rows (including the
    template's end-of-turn token). Raises ChatTemplateError if a completion comes out empty.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    full = [_chat_ids(tokenizer, prompt + [{"role": "assistant", "content": r}]) for r in responses]
    prompt_len = min([len(prompt_ids)] + [common_prefix_length(prompt_ids, f) for f in full])
    completions = [f[prompt_len:] for f in full]
    for r, c in zip(responses, completions, strict=True):
        if not c:
            raise ChatTemplateError(
                f"response {r[:40]!r} has no tokens under {getattr(tokenizer, 'name_or_path', '?')!r}'s chat template"
            )
    return prompt_ids[:prompt_len], completions


# ---------------------------------------------------------------- chunked teacher-forced log-probs (transformers)
# Shared by the transformers scorer (backends.hf_engine) and the OPD trainer's teachers. The full (B, T, V) logits
# are never built: the decoder backbone gives hidden states, only the scored positions are kept, and the LM head
# plus log-softmax run over chunks of those positions (C6 in docs/bad-inputs.md: 262k vocab x long sequences).

# Elements of one (chunk, V) logits block; 2**25 is 64 MB in bf16 plus 128 MB for the fp32 copy.
HEAD_CHUNK_ELEMENTS = 1 << 25
# Elements of one (positions, vocabulary tile) logits block of the no-grad path: 2**23 is 16 MB in bf16, which stays
# in the last-level cache between the matmul that writes it and the log-sum-exp that reads it.
HEAD_TILE_ELEMENTS = 1 << 23
# The compiled head: vocabulary tiles of a fixed width, in blocks of up to HEAD_TILE_ELEMENTS // width positions
# (CUDA: CUDA_HEAD_BLOCK_ROWS), so the compiled log-sum-exp has a static reduction width and only its row count
# varies. Inductor's kernels for a dynamic reduction width were slow: on an H100 (Gemma-3-270M, 57k positions) 64x
# slower than the eager head, where the static width runs 4.3x faster than eager; on 2 CPU cores (3500 positions)
# 2.90 s against 1.52 s, eager 3.62 s.
COMPILED_HEAD_TILE_COLUMNS, CUDA_HEAD_BLOCK_ROWS = 2048, 16384


def logit_softcap(config: Any) -> float | None:
    """The final-logit soft-capping of a model (Gemma 2/3: logits = cap * tanh(logits / cap)), or None."""
    text_config = getattr(config, "text_config", None) or config
    return getattr(text_config, "final_logit_softcapping", None)


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits with the model's soft-capping applied (the formula of Gemma3ForCausalLM.forward)."""
    logits = logits.float()
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _target_logprob(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """log p(target) from one chunk of head outputs: fp32 upcast, optional soft-capping, logit[target] - logsumexp."""
    logits = _capped(logits, softcap)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _target_logprob_entropy(logits: torch.Tensor, targets: torch.Tensor,
                            softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy −Σ p log p) from one chunk of head outputs over the whole vocabulary, fp32, nats."""
    logits = _capped(logits, softcap)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    logp = logits - lse  # as _target_logprob, so the log-probs do not depend on ``entropy``
    return logits.gather(-1, targets[:, None]).squeeze(-1) - lse.squeeze(-1), -(logp.exp() * logp).sum(-1)


def _tile_logsumexp(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """logsumexp (fp32, per row) of one (positions, vocabulary tile) block of head outputs, soft-capped."""
    return torch.logsumexp(_capped(logits, softcap), dim=-1)


def _tile_logsumexp_entropy(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp, entropy of the softmax within the tile), per row, of one vocabulary tile (fp32, nats).

    With m = max z, d = m − z >= 0, e = exp(−d), S = Σ e: lse = m + log S and h = log S + Σ e·d / S, a sum of two
    non-negative terms (LSE − E[z] directly would cancel two large numbers)."""
    z = _capped(logits, softcap)
    peak = z.amax(dim=-1, keepdim=True)
    d = peak - z
    e = torch.exp(-d)
    total = e.sum(-1)
    return peak.squeeze(-1) + torch.log(total), torch.log(total) + (e * d).sum(-1) / total


def _entropy_from_tiles(lse: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Entropy (N,) in nats of the softmax over all tiles, from each tile's log-sum-exp and within-tile entropy
    (N, tiles): with w_t = exp(lse_t − LSE) the tile's probability mass, H = Σ_t w_t (h_t + LSE − lse_t) (the chain
    rule of entropy), every term >= 0."""
    total = torch.logsumexp(lse, dim=-1, keepdim=True)
    return (torch.exp(lse - total) * (within + (total - lse))).sum(-1)


_compiled: dict[str, Any] = {}


def _maybe_compiled(fn: Any, compiled: bool, dynamic: bool = True) -> Any:
    """``fn``, or (once per process) its torch.compile'd version: inductor fuses the upcast, max and exp-sum into one
    pass over the bf16 logits, ~6x faster than eager on a 262k vocabulary (needs a C++ compiler). ``dynamic=False``
    compiles for static shapes except the dimensions an argument marks dynamic."""
    if not compiled:
        return fn
    key = f"{fn.__name__}/{'dynamic' if dynamic else 'static'}"
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=dynamic)
    return _compiled[key]


def head_token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, *,
                        softcap: float | None = None, chunk_size: int | None = None,
                        compiled: bool = False) -> torch.Tensor:
    """Log-probs (nats, fp32) of ``targets`` (N,) given the final hidden states ``hidden`` (N, H): the first value of
    ``head_token_stats`` (see there)."""
    return head_token_stats(hidden, targets, lm_head, softcap=softcap, chunk_size=chunk_size, compiled=compiled)[0]


def head_token_stats(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, *,
                     softcap: float | None = None, chunk_size: int | None = None, compiled: bool = False,
                     entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs (N,), entropies (N,) or None), nats, fp32: log p(``targets``) given the final hidden states
    ``hidden`` (N, H), and with ``entropy`` the entropy −Σ_v p_v log p_v of each position's next-token distribution
    (docs/methods.md §UDF), computed in the same pass over the head's outputs.

    The vocabulary size is the head's output size, never ``len(tokenizer)`` (docs/bad-inputs.md T6), and the model's
    own soft-capping (Gemma 2/3) is applied in fp32. ``compiled`` runs the post-processing torch.compile'd. Two exact
    evaluations:

    - with autograd (a trainer backpropagating through it, or ``chunk_size`` given): chunks of ``chunk_size``
      positions (default ~2**25 logits per chunk) over the whole vocabulary; per chunk logits = lm_head(hidden) in
      the head's dtype, upcast to fp32, log p = logit[target] - logsumexp(logits) (entropy: −Σ p log p per row).
    - without autograd and with a bias-free linear head: vocabulary tiles of ~2**23 logits over all positions; the
      log-sum-exp is combined across tiles and the target logit is an fp32 dot product. Every tile reuses one slice
      of the head's weight for all positions, so its matmul runs ~2x faster than position chunks, which each stream
      the whole (V, H) weight from memory; on Gemma-3's 262k vocabulary the head is half the scorer's FLOPs. The
      entropy adds each tile's own entropy h_t, combined as H = Σ_t exp(lse_t − LSE)·(h_t + LSE − lse_t)
      (``_entropy_from_tiles``); no (N, V) tensor is built either way.
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty.clone() if entropy else None)
    weight = getattr(lm_head, "weight", None)
    tiled = chunk_size is None and isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None \
        and not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))
    if tiled:
        return _vocab_tiled_logprobs(hidden, targets, weight, softcap, compiled, entropy)
    vocab = weight.shape[0] if weight is not None else lm_head(hidden[:1]).shape[-1]
    step = chunk_size or max(16, HEAD_CHUNK_ELEMENTS // vocab)
    fn = _maybe_compiled(_target_logprob_entropy if entropy else _target_logprob, compiled)
    out = [fn(lm_head(hidden[s : s + step]), targets[s : s + step], softcap) for s in range(0, hidden.shape[0], step)]
    if entropy:
        return torch.cat([lp for lp, _ in out]), torch.cat([h for _, h in out])
    return torch.cat(out), None


def _vocab_tiled_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, softcap: float | None,
                          compiled: bool, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``head_token_stats`` without autograd: log-sum-exp (and entropy) over vocabulary tiles (see there)."""
    if compiled:
        rows = CUDA_HEAD_BLOCK_ROWS if hidden.is_cuda else HEAD_TILE_ELEMENTS // COMPILED_HEAD_TILE_COLUMNS
    else:
        rows = HEAD_TILE_ELEMENTS // 256  # positions per block: at least 256 vocabulary columns
    rows = min(hidden.shape[0], rows)
    out, entropies = [], []
    for s in range(0, hidden.shape[0], rows):
        h = hidden[s : s + rows]
        if compiled:
            lse = _static_width_tiles_logsumexp(h, weight, COMPILED_HEAD_TILE_COLUMNS, softcap, entropy)
        else:
            tile = min(weight.shape[0], max(256, HEAD_TILE_ELEMENTS // h.shape[0] // 256 * 256))
            lse = _eager_tiles_logsumexp(h, weight, tile, softcap, entropy)
        if entropy:  # (lse, within-tile entropy) per tile
            entropies.append(_entropy_from_tiles(*lse))
            lse = lse[0]
        target = _capped((h.float() * weight[targets[s : s + rows]].float()).sum(-1), softcap)
        out.append(target - torch.logsumexp(lse, dim=-1))
    return torch.cat(out), (torch.cat(entropies) if entropy else None)


def _static_width_tiles_logsumexp(h: torch.Tensor, weight: torch.Tensor, tile: int, softcap: float | None,
                                  entropy: bool = False) -> Any:
    """(N, tiles) fp32 log-sum-exp of each ``tile``-column slice of ``h @ weight.T``, compiled with a static width:
    one compile for the full tiles and one for a narrower last tile, whatever N. With ``entropy``: (log-sum-exp,
    within-tile entropy), each (N, tiles)."""
    fn = _maybe_compiled(_tile_logsumexp_entropy if entropy else _tile_logsumexp, True, dynamic=False)
    tile = min(tile, weight.shape[0])  # a vocabulary narrower than one tile is one full tile
    # one per block, as in _eager_tiles_logsumexp (fresh ones fragment the heap)
    buffer = h.new_empty(h.shape[0], tile)
    torch._dynamo.maybe_mark_dynamic(buffer, 0)
    out = []
    for v in range(0, weight.shape[0], tile):
        w = weight[v : v + tile]
        if w.shape[0] == tile:
            logits = torch.matmul(h, w.T, out=buffer)
        else:  # the last, narrower tile
            logits = h @ w.T
            torch._dynamo.maybe_mark_dynamic(logits, 0)
        out.append(fn(logits, softcap))
    if entropy:
        return torch.stack([lse for lse, _ in out], -1), torch.stack([m for _, m in out], -1)
    return torch.stack(out, -1)


def _eager_tiles_logsumexp(h: torch.Tensor, weight: torch.Tensor, tile: int, softcap: float | None,
                           entropy: bool = False) -> Any:
    """(N, tiles) fp32 log-sum-exp of each vocabulary tile of ``h @ weight.T``, eagerly, in two preallocated buffers:
    fresh temporaries of slightly different sizes per tile and batch fragmented glibc's heap (4.0 GB peak RSS instead
    of 1.15 on Gemma-3-270M in bench/bench_score.py). With ``entropy``: (log-sum-exp, within-tile entropy), each
    (N, tiles), as in ``_tile_logsumexp_entropy``, with a third buffer holding max − z."""
    logits = h.new_empty(h.shape[0], tile)
    wide = torch.empty(h.shape[0], tile, dtype=torch.float32, device=h.device)
    kept = torch.empty_like(wide) if entropy else None
    out, within = [], []
    for v in range(0, weight.shape[0], tile):
        w = weight[v : v + tile]
        lg, x = (logits, wide) if w.shape[0] == tile else (logits[:, : w.shape[0]], wide[:, : w.shape[0]])
        if lg.is_contiguous():
            torch.matmul(h, w.T, out=lg)
        else:  # the last, narrower tile
            lg.copy_(h @ w.T)
        x.copy_(lg)
        if softcap is not None:
            x.div_(softcap).tanh_().mul_(softcap)
        peak = x.amax(-1, keepdim=True)
        d = None
        if entropy:
            d = kept[:, : w.shape[0]]
            torch.sub(peak, x, out=d)  # max − z >= 0
        x.sub_(peak).exp_()
        total = x.sum(-1)
        log_total = total.log()
        if entropy:
            within.append(d.mul_(x).sum(-1).div_(total).add_(log_total))  # log S + Σ e·d / S
        out.append(log_total.add_(peak.squeeze(-1)))
    if entropy:
        return torch.stack(out, -1), torch.stack(within, -1)
    return torch.stack(out, -1)


def decoder_backbone(model: Any) -> torch.nn.Module:
    """The decoder stack of a causal LM (``model.model`` for Llama/Qwen2/Gemma3), whose output is already normed."""
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if backbone is None or backbone is model:
        raise TypeError(f"{type(model).__name__}: cannot find its decoder backbone (base_model_prefix)")
    return backbone


def masked_token_logprobs(model: Any, input_ids: torch.Tensor, score_mask: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, *, chunk_size: int | None = None,
                          compiled: bool = False, backbone: torch.nn.Module | None = None) -> torch.Tensor:
    """Log-probs (nats, fp32) of every token ``input_ids[b, t]`` with ``score_mask[b, t]`` true, given ``input_ids[b,
    :t]``, in row-major order of the mask: the first value of ``masked_token_stats`` (see there)."""
    return masked_token_stats(model, input_ids, score_mask, attention_mask, chunk_size=chunk_size, compiled=compiled,
                              backbone=backbone)[0]


def masked_token_stats(model: Any, input_ids: torch.Tensor, score_mask: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, *, chunk_size: int | None = None,
                       compiled: bool = False, backbone: torch.nn.Module | None = None,
                       entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies or None), nats, fp32: the log-prob of every token ``input_ids[b, t]`` with
    ``score_mask[b, t]`` true, given ``input_ids[b, :t]``, and with ``entropy`` the entropy of the model's
    next-token distribution at that position (the one the token was drawn from), in row-major order of the mask (so
    a caller splits them per row by the mask's row sums).

    Position 0 cannot be scored (no context). With right padding ``attention_mask`` may be None: under causal
    attention padded positions at the end never influence real ones. ``backbone`` replaces ``decoder_backbone(model)``
    (e.g. with its torch.compile'd wrapper); ``compiled`` runs the head's log-softmax torch.compile'd.
    """
    if bool(score_mask[:, 0].any()):
        raise ValueError("position 0 of a sequence cannot be scored: it has no context")
    out = (decoder_backbone(model) if backbone is None else backbone)(input_ids=input_ids,
                                                                      attention_mask=attention_mask, use_cache=False)
    predicting = score_mask[:, 1:]  # hidden state at t-1 predicts token t
    hidden = out.last_hidden_state[:, :-1][predicting]
    targets = input_ids[:, 1:][predicting]
    return head_token_stats(hidden, targets, model.get_output_embeddings(), softcap=logit_softcap(model.config),
                            chunk_size=chunk_size, compiled=compiled, entropy=entropy)
