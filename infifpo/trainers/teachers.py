"""Frozen teachers for on-policy distillation: loading them, and scoring the student's completion text with each.

Owns: the ``Teacher`` record (display name, frozen model, its own tokenizer and chat template), loading a list of
model references through ``infifpo.models.resolve_model``, the sequence-level score of a batch of (prompt, text)
samples under one teacher (docs/methods.md §OPD: its own tokenizer and chat template, completion tokens as in
``logprobs.response_spans``, chunked teacher-forced log-probs without (B, T, V) logits), and the shared-vocabulary
check that the optional token-level term needs; the check that prompts are conversational (every teacher renders
them with its own template). Does not own: the student's log-probs,
fusion or the loss (``trainers.opd``, ``infifpo.fusion``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from infifpo.logprobs import Messages, encode_prompt, logit_softcap, masked_token_logprobs, response_spans
from infifpo.models.resolve import resolve_model
from infifpo.schema import ConfigError, check_messages

logger = logging.getLogger(__name__)


@dataclass
class Teacher:
    """One frozen teacher: ``name`` (metric keys, logs), ``model`` (eval mode, no grad) and its own ``tokenizer``."""

    name: str
    model: Any
    tokenizer: Any


def teacher_name(ref: str) -> str:
    """A short display name for a model reference: the last path component ("qwen2.5-coder-0.5b-instruct")."""
    return os.path.basename(os.path.normpath(ref)) or ref


def _dtype(value: Any) -> Any:
    return getattr(torch, value) if isinstance(value, str) and value != "auto" else value


def load_teachers(refs: Sequence[str], *, names: Sequence[str] | None = None, init_kwargs: dict | None = None,
                  trust_remote_code: bool = False) -> list[Teacher]:
    """Load every reference (local dir, packaged name or hub id) as a frozen causal LM with its own tokenizer.

    ``init_kwargs`` go to ``from_pretrained`` (``dtype`` may be a string such as "bfloat16"; default float32).
    Raises ConfigError for duplicate names, ModelLoadError (from ``resolve_model``) for an unknown reference and
    ChatTemplateError for a teacher whose tokenizer cannot render a conversation.
    """
    names = list(names) if names else [teacher_name(r) for r in refs]
    if len(names) != len(refs) or len(set(names)) != len(names):
        raise ConfigError(f"teacher_names {names} must be {len(refs)} distinct names, one per teacher in "
                          f"{list(refs)}.")
    kwargs = dict(init_kwargs or {})
    kwargs["dtype"] = _dtype(kwargs.get("dtype", "float32"))
    teachers = []
    for ref, name in zip(refs, names, strict=True):
        path = resolve_model(ref, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        teachers.append(freeze(Teacher(name, model, tokenizer)))
        logger.info("teacher %s: %s (%s, vocab %d)", name, path, type(model).__name__, head_size(model))
    return teachers


def freeze(teacher: Teacher) -> Teacher:
    """Eval mode, no gradients, and a fail-fast check that the teacher's chat template renders a conversation."""
    teacher.model.eval()
    teacher.model.requires_grad_(False)
    if teacher.tokenizer.pad_token_id is None:
        teacher.tokenizer.pad_token = teacher.tokenizer.eos_token
    encode_prompt(teacher.tokenizer, [{"role": "user", "content": "1 + 1?"}])  # raises ChatTemplateError
    return teacher


def head_size(model: Any) -> int:
    """The number of logits the model's LM head emits (its real vocabulary size, which may exceed len(tokenizer))."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_shared_vocabulary(student_tokenizer: Any, student_model: Any, teacher: Teacher) -> None:
    """Raise ConfigError unless ``teacher`` has the student's vocabulary (same token -> id map and head size).

    The token-level divergence compares next-token distributions position by position on the student's own token
    ids, which only means something when both models index the same vocabulary.
    """
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
    s_head, t_head = head_size(student_model), head_size(teacher.model)
    if s_vocab != t_vocab or s_head != t_head:
        raise ConfigError(
            f"token_level_weight > 0 needs teachers that share the student's vocabulary, but teacher "
            f"{teacher.name!r} has {len(t_vocab)} tokens / head size {t_head} vs the student's {len(s_vocab)} / "
            f"{s_head}. Remove {teacher.name!r} from token_level_teachers (it still contributes through the "
            "sequence-level fused score) or set token_level_weight: 0."
        )


def pack_right_padded(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_token_id: int,
                      device: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, score_mask), each (B, T): prompt + completion per row, right-padded.

    ``score_mask`` is True exactly on the completion tokens, the positions whose log-probs are summed.
    """
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    score = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        score[i, len(p) : len(p) + len(c)] = True
    return ids.to(device), attention.to(device), score.to(device)


def rowwise_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row sums (B,) of ``values`` (M,) laid out row-major over the True entries of ``mask`` (B, T)."""
    rows = mask.nonzero()[:, 0]
    return torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)


@torch.no_grad()
def teacher_sequence_logps(teacher: Teacher, prompts: Sequence[Messages], texts: Sequence[str], *,
                           batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (nats, fp32) and token counts (N,) of each completion text under ``teacher``.

    Sample i is the assistant turn ``texts[i]`` after ``prompts[i]``, rendered with the teacher's own chat template;
    its tokens are ``response_spans``' completion (including the template's end-of-turn token). Rows are scored in
    chunks of ``batch_size`` with ``logprobs.masked_token_logprobs``. Returned on the CPU.
    """
    device = teacher.model.get_output_embeddings().weight.device
    spans = [response_spans(teacher.tokenizer, p, [t]) for p, t in zip(prompts, texts, strict=True)]
    sums, counts = [], []
    for start in range(0, len(spans), batch_size):
        chunk = spans[start : start + batch_size]
        ids, attention, score = pack_right_padded([s[0] for s in chunk], [s[1][0] for s in chunk],
                                                  teacher.tokenizer.pad_token_id, device)
        token_logps = masked_token_logprobs(teacher.model, ids, score, attention)
        sums.append(rowwise_sums(token_logps, score).cpu())
        counts.append(score.sum(dim=1).cpu())
    return torch.cat(sums), torch.cat(counts)


def softcapped_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits (M, V), fp32, of hidden states (M, H) through the model's head and soft-capping."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = logit_softcap(model.config)
    return torch.tanh(logits / cap) * cap if cap is not None else logits


def check_prompts(dataset: Any) -> None:
    """Raise DataFormatError unless every row has a conversational ``prompt`` (each teacher applies its own template).

    Iterable datasets are refused with ConfigError: the sampler must repeat each prompt G times.
    """
    if dataset is None:
        return
    if isinstance(dataset, IterableDataset):
        raise ConfigError("FusedDistillationTrainer needs a map-style Dataset (prompts are repeated G times).")
    for i, row in enumerate(dataset):
        check_messages(row.get("prompt"), i, row, "prompt")
