"""Which tokens a response is, under each model's own tokenizer and chat template.

Owns: the prompt/response token split shared by every stage that needs it (sample encodes prompts with it, score
scores the spans it returns, the OPD trainer scores teachers with it). The rule is TRL 1.16's for conversational
data (methods.md, "Response tokens"): the completion is the suffix of template(prompt + response) after its common
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


def _chat_ids(tokenizer: Any, messages: Messages, **kwargs: Any) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "?")
        raise ChatTemplateError(
            f"tokenizer {name!r} has no chat_template. Pass one (infifpo.models gives packaged base models a "
            "documented plain template) instead of relying on a silent plain-text fallback."
        )
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except Exception as e:  # jinja raises TemplateError, some templates raise on role order
        raise ChatTemplateError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', '?')!r} rejected the conversation "
            f"(roles {[m.get('role') for m in messages]}): {e}"
        ) from e
    return list(out["input_ids"])


def encode_prompt(tokenizer: Any, prompt: Messages) -> list[int]:
    """Token ids of ``prompt`` rendered with the chat template and the generation prompt (what a model samples from)."""
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
# plus log-softmax run over chunks of those positions (C6 in users.md: 262k vocab x long sequences).

# Elements of one (chunk, V) logits block; 2**25 is 64 MB in bf16 plus 128 MB for the fp32 copy.
HEAD_CHUNK_ELEMENTS = 1 << 25


def logit_softcap(config: Any) -> float | None:
    """The final-logit soft-capping of a model (Gemma 2/3: logits = cap * tanh(logits / cap)), or None."""
    text_config = getattr(config, "text_config", None) or config
    return getattr(text_config, "final_logit_softcapping", None)


def _target_logprob(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """log p(target) from one chunk of head outputs: fp32 upcast, optional soft-capping, logit[target] - logsumexp."""
    logits = logits.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


_compiled_target_logprob = None


def _target_logprob_fn(compiled: bool):
    """The eager function, or (once per process) its torch.compile'd version: inductor fuses the upcast, max and
    exp-sum into one pass over the bf16 logits, ~6x faster than eager on a 262k vocabulary (needs a C++ compiler)."""
    global _compiled_target_logprob
    if not compiled:
        return _target_logprob
    if _compiled_target_logprob is None:
        _compiled_target_logprob = torch.compile(_target_logprob, dynamic=True)
    return _compiled_target_logprob


def head_token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, *,
                        softcap: float | None = None, chunk_size: int | None = None,
                        compiled: bool = False) -> torch.Tensor:
    """Log-probs (nats, fp32) of ``targets`` (N,) given the final hidden states ``hidden`` (N, H), chunked over N.

    Per chunk: logits = lm_head(hidden) in the head's dtype (bf16 where the model runs in bf16), then upcast to fp32,
    the model's own soft-capping (the formula of Gemma3ForCausalLM.forward, applied in fp32), and log p =
    logit[target] - logsumexp(logits). The vocabulary size is the head's output size, never ``len(tokenizer)`` (T6).
    Differentiable, so a trainer can backpropagate through it. ``compiled`` runs the post-processing torch.compile'd.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    vocab = lm_head.weight.shape[0] if hasattr(lm_head, "weight") else lm_head(hidden[:1]).shape[-1]
    step = chunk_size or max(16, HEAD_CHUNK_ELEMENTS // vocab)
    fn = _target_logprob_fn(compiled)
    out = [fn(lm_head(hidden[s : s + step]), targets[s : s + step], softcap) for s in range(0, hidden.shape[0], step)]
    return torch.cat(out)


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
    :t]``, in row-major order of the mask (so a caller splits them per row by the mask's row sums).

    Position 0 cannot be scored (no context). With right padding ``attention_mask`` may be None: under causal
    attention padded positions at the end never influence real ones. ``backbone`` replaces ``decoder_backbone(model)``
    (e.g. with its torch.compile'd wrapper); ``compiled`` runs the head's log-softmax torch.compile'd.
    """
    if bool(score_mask[:, 0].any()):
        raise ValueError("position 0 of a sequence cannot be scored: it has no context")
    out = (decoder_backbone(model) if backbone is None else backbone)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    predicting = score_mask[:, 1:]  # hidden state at t-1 predicts token t
    hidden = out.last_hidden_state[:, :-1][predicting]
    targets = input_ids[:, 1:][predicting]
    return head_token_logprobs(hidden, targets, model.get_output_embeddings(), softcap=logit_softcap(model.config),
                               chunk_size=chunk_size, compiled=compiled)
