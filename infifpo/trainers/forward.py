"""Batch plumbing shared by the InfiFPO and WRPO trainers.

Owns: the collator that lays out N responses per row (TRL's layout generalised: all rows' first response, then all
rows' second, ...) and carries per-example score columns as float tensors; the extra tokenisation of a third
response (WRPO's ``source_chosen``) with TRL's prompt/completion split; the policy's summed completion log-probs
through TRL's fused LM head; and gathering per-pair metrics across processes. Does not own: any loss (``fusion``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from trl.data_utils import is_conversational
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from infifpo.logprobs import common_prefix_length, response_spans
from infifpo.schema import ChatTemplateError, ScoredPairsError, row_label


@dataclass
class ScoredPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator for ``responses`` per row, keeping ``score_columns`` as float32 tensors.

    Output: ``input_ids``/``attention_mask``/``completion_mask`` of shape (N*B, L), right-padded, rows ordered
    response-major (with the default ``("chosen", "rejected")`` exactly TRL's layout), and one tensor per score
    column: (B,) for a scalar column, (B, K) for a per-source list. Unlike TRL's, it never truncates: a row longer
    than ``max_length`` is a ScoredPairsError (the trainers refuse or drop such rows before, naming them).
    """

    responses: tuple[str, ...] = ("chosen", "rejected")
    score_columns: tuple[str, ...] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids, masks = [], []
        for r in self.responses:
            for ex in examples:
                ids.append(ex["prompt_ids"] + ex[f"{r}_ids"])
                masks.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[f"{r}_ids"]))
        longest = max((len(x) for x in ids), default=0)
        if self.max_length is not None and longest > self.max_length:  # never cut: the scores cover whole responses
            raise ScoredPairsError(
                f"a batch row has {longest} tokens > max_length={self.max_length}; this collator never cuts a row. "
                "The trainers' _prepare_dataset names such rows (trainers.data.prepare_scored_dataset): pass the "
                "dataset through the trainer, raise max_length, or drop the row.")
        kw = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        out = {
            "input_ids": pad([torch.tensor(x) for x in ids], padding_value=self.pad_token_id, **kw),
            "attention_mask": pad([torch.ones(len(x), dtype=torch.long) for x in ids], padding_value=0, **kw),
            "completion_mask": pad([torch.tensor(m, dtype=torch.long) for m in masks], padding_value=0, **kw),
        }
        for col in self.score_columns:
            out[col] = torch.tensor([ex[col] for ex in examples], dtype=torch.float32)
            if not torch.isfinite(out[col]).all():  # the trainers check every row first (schema.check_logp)
                raise ScoredPairsError(f"score column {col!r} holds a value that is not finite in float32; validate "
                                       "the rows through the trainer (it names the row).")
        return out


def pop_score_columns(inputs: dict[str, Any], columns: Sequence[str]) -> dict[str, torch.Tensor]:
    """Remove the score columns from a collated batch (so they never reach the model forward) and return them."""
    return {c: inputs.pop(c) for c in columns if c in inputs}


def completion_logps(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (nats) and token counts of every row's completion, via TRL's fused LM head.

    Returns ``(logps, num_tokens)``, both (N*B,): the sum over exactly the completion tokens TRL's DPOTrainer sums
    (``completion_mask`` shifted by one), without materialising (B, L, V) logits.
    """
    completion_mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                    use_cache=False, fused_lm_head=True)
    shift_mask = completion_mask[:, 1:]
    # Prompt-learning PEFT prepends virtual tokens; keep the positions of the real tokens (as TRL does).
    per_token = outputs.log_probs[:, -shift_mask.size(1):]
    return per_token.sum(dim=1), shift_mask.sum(dim=1)


def add_response_ids(dataset: Dataset, response: str, tokenizer: Any) -> Dataset:
    """Add ``<response>_ids`` to a dataset TRL has tokenised (prompt_ids, chosen_ids, rejected_ids present).

    The completion is the suffix of template(prompt + response) after the row's ``prompt_ids`` (TRL's rule; for
    standard-format text rows the EOS token is appended as TRL does). Raises ChatTemplateError naming the row when
    the rendered response does not start with the row's prompt tokens.
    """

    def tokenize(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        if is_conversational({"prompt": row["prompt"]}):
            content = row[response][-1]["content"]
            prompt_ids, (completion,) = response_spans(tokenizer, row["prompt"], [content])
            full = prompt_ids + completion
        else:
            text = (row[response] if row[response].endswith(tokenizer.eos_token)
                    else row[response] + tokenizer.eos_token)
            full = tokenizer(row["prompt"] + text, add_special_tokens=False)["input_ids"]
        n = len(row["prompt_ids"])
        if common_prefix_length(row["prompt_ids"], full) < n or len(full) == n:
            raise ChatTemplateError(f"{row_label(index, row)}: {response!r} does not render after the row's prompt "
                                    "tokens under this chat template; check the template or the prompt.")
        return {f"{response}_ids": full[n:]}

    return dataset.map(tokenize, with_indices=True, desc=f"Tokenizing {response}")


def gather_means(accelerator: Any, metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Mean over all processes of each per-pair metric tensor (B,), with one collective for all of them.

    ``gather_for_metrics`` drops the samples duplicated to even out the last batch, as TRL's metrics do.
    """
    if not metrics:
        return {}
    stacked = torch.stack([v.detach().float().reshape(-1) for v in metrics.values()], dim=1)
    gathered = accelerator.gather_for_metrics(stacked)
    return dict(zip(metrics, gathered.mean(dim=0).tolist(), strict=True))
