"""Reward-model scoring: one scalar per (prompt, response) from any sequence-classification reward model.

Owns: loading a reward model (local dir or hub id, ``trust_remote_code`` off unless asked), rendering each
conversation with the reward model's own chat template, and batched scoring that does not depend on padding side
or batch composition (docs/bad-inputs.md J10). Does not own: which samples are scored or how rewards become pairs.

Padding: sequences are right-padded with an attention mask, whatever the tokenizer's ``padding_side``. With causal
attention a right pad cannot change the hidden states of the real tokens, position ids stay 0..n-1 (left padding
shifts them, which changes scores of models with absolute position embeddings), and the model's pooling takes the
rightmost non-pad token. Batches are formed from length-sorted inputs; scores are returned in input order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from infifpo.schema import ChatTemplateError, DataFormatError, ModelLoadError

logger = logging.getLogger(__name__)


def _as_messages(prompt: str | list[dict[str, str]], index: int) -> list[dict[str, str]]:
    """A prompt as chat messages: a string becomes one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return list(prompt)
    raise DataFormatError(f"prompt {index}: expected a string or a list of {{role, content}} messages, "
                          f"got {prompt!r:.80}")


def load_reward_model(model: str, *, device: str | None = None, dtype: torch.dtype | None = None,
                      trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a sequence-classification reward model, in eval mode, with a pad token set.

    Raises ModelLoadError if the checkpoint has no trained classification head (e.g. a causal LM loaded as a
    reward model: its head would be freshly random) or cannot be loaded.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if trust_remote_code:
        logger.warning("trust_remote_code=True: running Python code shipped with %s", model)
    try:
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        rm, info = AutoModelForSequenceClassification.from_pretrained(
            model, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"reward model {model!r} could not be loaded as a sequence classifier: {e}") from e
    fresh = [k for k in info.get("missing_keys", []) if "score" in k or "classifier" in k or "head" in k]
    if fresh:
        raise ModelLoadError(
            f"reward model {model!r}: the classification head {fresh} is not in the checkpoint, so its scores would "
            "be random. Pass a trained reward model (e.g. Skywork/Skywork-Reward-V2-Llama-3.1-8B), not a causal LM."
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if rm.config.pad_token_id is None:
        rm.config.pad_token_id = tok.pad_token_id
    return rm.to(device).eval(), tok


def _render(tok: Any, messages: list[dict[str, str]], response: str, index: int) -> list[int]:
    """Token ids of the conversation + assistant response under the reward model's own chat template."""
    if not getattr(tok, "chat_template", None):
        raise ChatTemplateError(
            f"the reward model's tokenizer has no chat template (row {index}); reward models score conversations "
            "in the format they were trained on. Use a tokenizer that ships one."
        )
    text = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]  # the template already holds any BOS


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, L) long, right-padded whatever the tokenizer's padding_side says."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def score_with_reward_model(
    prompts: Sequence[str | list[dict[str, str]]], responses: Sequence[str], model: str | tuple[Any, Any],
    batch_size: int = 8, *, label_index: int = 0, max_length: int | None = None, trust_remote_code: bool = False,
    progress: bool = True,
) -> list[float]:
    """Reward-model score (the classification head's logit ``label_index``) of each (prompt, response), in order.

    prompts: chat messages (or a string, taken as one user turn); responses: the assistant replies.
    model: a directory, a hub id, or an already loaded (model, tokenizer) pair from ``load_reward_model``.
    max_length: longest conversation in tokens (default: the model's max_position_embeddings); longer ones raise
    DataFormatError rather than being silently truncated.
    """
    if len(prompts) != len(responses):
        raise DataFormatError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response.")
    rm, tok = model if isinstance(model, tuple) else load_reward_model(model, trust_remote_code=trust_remote_code)
    limit = max_length or getattr(rm.config, "max_position_embeddings", None)
    ids = [_render(tok, _as_messages(p, i), r, i) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
    for i, seq in enumerate(ids):
        if limit and len(seq) > limit:
            raise DataFormatError(f"row {i}: conversation is {len(seq)} tokens, over the reward model's {limit}.")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    scores: list[float] = [0.0] * len(ids)
    device = next(rm.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="reward model", disable=not progress, unit="batch"):
        chunk = order[start : start + batch_size]
        input_ids, attention_mask = right_pad([ids[i] for i in chunk], tok.pad_token_id)
        logits = rm(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for i, value in zip(chunk, logits[:, label_index].float().tolist(), strict=True):
            scores[i] = value
    return scores
