"""WRPOConfig / WRPOTrainer: Weighted-Reward Preference Optimisation (Yang et al., ICLR 2025) on TRL's DPOTrainer.

Owns: the WRPO options (docs/methods.md §WRPO), the α schedule over the trainer's real optimizer steps
(``state.max_steps`` and ``state.global_step``, so ``max_steps`` and gradient accumulation are respected, unlike the
official code), and the reference for the three responses: dataset columns (``ref_source_chosen_logps``,
``ref_chosen_logps``, ``ref_rejected_logps``; no reference model is loaded) or a live frozen reference (TRL's
``ref_model``, or the adapter-disabled model under PEFT). Does not own: the loss (``fusion.wrpo_loss``) or the batch
layout (``forward``). Rows: prompt, source_chosen (y_ws), chosen (the target's best, y_wt), rejected (y_l); α = 0 is
DPO on (chosen, rejected).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from infifpo import fusion
from infifpo.schema import ConfigError, ref_columns
from infifpo.trainers.data import (
    model_reference,
    prepare_scored_dataset,
    score_columns,
    without_max_length,
)
from infifpo.trainers.dpo_options import check_truncation_mode, refuse_ignored_dpo_options
from infifpo.trainers.forward import (
    ScoredPreferenceCollator,
    add_response_ids,
    completion_logps,
    gather_means,
    pop_score_columns,
)

logger = logging.getLogger(__name__)
RESPONSES = ("source_chosen", "chosen", "rejected")


@dataclass
class WRPOConfig(DPOConfig):
    """DPOConfig plus the WRPO options; defaults are the released setting (docs/methods.md §WRPO)."""

    # Parameters that control the WRPO objective
    alpha_max: float = field(default=0.1, metadata={"help": "Final fusion coefficient α_max (released: 0.1)."})
    is_dynamic: bool = field(default=True, metadata={
        "help": "α rises linearly 0 -> alpha_max over the optimizer steps; False keeps α = alpha_max (ablation)."})
    # Parameters that control the data
    skip_invalid_rows: bool = field(default=False, metadata={
        "help": "Drop (and count in the log) rows that fail validation instead of raising a named error."})
    allow_reference_model_mismatch: bool = field(default=False, metadata={
        "help": "Train although the rows' pivot_model is not the model trained (a logged warning instead of an "
                "error): for a reference deliberately scored with another model, e.g. the SFT checkpoint's parent."})
    # Overridden DPOConfig defaults
    beta: float = field(default=0.01, metadata={"help": "β of ρ(y) = β(π(y) − r(y)) (released: 0.01)."})
    max_length: int | None = field(default=2048, metadata={
        "help": "Maximum prompt + response tokens (released: 2048). A longer row is an error naming it (or a counted "
                "drop with skip_invalid_rows): precomputed reference sums cover the whole response."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type != ["sigmoid"]:
            raise ConfigError(f"loss_type={self.loss_type}: WRPO has one objective (docs/methods.md §WRPO); "
                              "leave it unset.")
        if not 0.0 <= self.alpha_max <= 1.0:
            raise ConfigError(f"alpha_max={self.alpha_max} must be in [0, 1].")
        check_truncation_mode(self)
        refuse_ignored_dpo_options(self, "WRPOTrainer")


class WRPOTrainer(DPOTrainer):
    """TRL DPOTrainer on (prompt, source_chosen, chosen, rejected) rows with the WRPO loss.

    When the training set has the three ``ref_*_logps`` columns they are the reference and no reference model is
    loaded; otherwise a live frozen reference is used (``precompute_ref_log_probs`` must then be False).
    """

    _tag_names = ["trl", "dpo", "wrpo"]
    _name = "WRPO"
    _paper = {  # the model card's "introduced in" and citation (TRL's create_model_card)
        "title": "Weighted-Reward Preference Optimization for Implicit Model Fusion",
        "id": "2412.03187",
        "citation": "@inproceedings{yang2025wrpo,\n"
                    "    title     = {{Weighted-Reward Preference Optimization for Implicit Model Fusion}},\n"
                    "    author    = {Ziyi Yang and Fanqi Wan and Longguang Zhong and Tianyuan Shi and "
                    "Xiaojun Quan},\n"
                    "    year      = 2025,\n"
                    "    booktitle = {The Thirteenth International Conference on Learning Representations, "
                    "ICLR 2025},\n"
                    "    url       = {https://arxiv.org/abs/2412.03187},\n"
                    "}",
    }

    def __init__(self, model: Any, ref_model: Any = None, args: WRPOConfig | None = None,
                 data_collator: Any = None, train_dataset: Dataset | None = None, **kwargs: Any):
        args = args or WRPOConfig(output_dir="wrpo-out")
        ref_cols = [ref_columns(r)[0] for r in RESPONSES]
        self._precomputed = train_dataset is not None and set(ref_cols) <= set(train_dataset.column_names)
        if self._precomputed:
            args.precompute_ref_log_probs = True  # no reference model: _precompute_ref_logps keeps the columns
        elif args.precompute_ref_log_probs:
            raise ConfigError(f"precompute_ref_log_probs=True needs the columns {ref_cols} in the training set "
                              "(`infifpo score` writes them); "
                              "set precompute_ref_log_probs=False for a live reference.")
        self._score_columns = tuple(score_columns(RESPONSES, length_normalize=False, sources=False,
                                                  ref=self._precomputed))
        self._model_ref = model_reference(model)  # the pivot the scores must come from (data.prepare_scored_dataset)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, **kwargs)
        if data_collator is None:
            self.data_collator = ScoredPreferenceCollator(
                pad_token_id=self._tokenizer.pad_token_id, max_length=args.max_length,
                truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of,
                responses=RESPONSES, score_columns=self._score_columns)

    # -- data hooks ---------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: WRPOConfig, dataset_name: str
                         ) -> Dataset:
        trl_prepare = super()._prepare_dataset

        def tokenize(rows: Dataset) -> Dataset:  # TRL drops no row: too-long rows are named (or counted) after it
            rows = trl_prepare(rows, processing_class, without_max_length(args), dataset_name)
            return add_response_ids(rows, "source_chosen", self._tokenizer)

        return prepare_scored_dataset(
            dataset, tokenize, responses=RESPONSES, length_normalize=False, sources=False, ref=self._precomputed,
            skip_invalid=args.skip_invalid_rows, max_length=args.max_length,
            tokenizer_name=self._tokenizer.name_or_path, model=self._model_ref,
            allow_model_mismatch=args.allow_reference_model_mismatch)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = ["source_chosen_ids"] + list(self._score_columns)
        self._signature_columns = list(dict.fromkeys(self._signature_columns + extra))

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        return dataset  # only reached with the ref_* columns present (checked in __init__)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The fused LM head builds no logits, so evaluation reports the loss only.
        return super().prediction_step(model, inputs, True, ignore_keys)

    # -- loss -----------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        scores = pop_score_columns(inputs, self._score_columns)
        policy = completion_logps(model, inputs)[0].chunk(3)
        ref = self._reference_logps(inputs, scores)
        alpha = self._alpha()
        losses = fusion.wrpo_loss(*policy, *ref, alpha=alpha, beta=self.beta)
        self._log_step(mode, policy, ref, alpha)
        loss = losses.mean()
        return (loss, None) if return_outputs else loss

    def _alpha(self) -> float:
        """α at the current optimizer step; constant across the micro-batches of one accumulated step."""
        total = max(self.state.max_steps, 1)  # 0 before train(): evaluation then uses α(0)
        return fusion.wrpo_alpha(min(self.state.global_step, total), total, self.args.alpha_max, self.args.is_dynamic)

    def _reference_logps(self, inputs: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, ...]:
        """r(y_ws), r(y_wt), r(y_l), each (B,) summed nats: dataset columns, or a frozen forward of the 3 responses."""
        if self._precomputed:
            return tuple(scores[ref_columns(r)[0]] for r in RESPONSES)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft_model(self.model):  # the adapter-disabled model is the reference
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    logps = completion_logps(self.model, inputs)[0]
            else:
                logps = completion_logps(self.ref_model, inputs)[0]
        return logps.chunk(3)

    def _log_step(self, mode: str, policy: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...],
                  alpha: float) -> None:
        """α, TRL's rewards/* keys for the target pair, and rewards for the source chosen, gathered over ranks.

        Across ranks: every per-pair tensor (B,) is all-gathered in one ``gather_for_metrics`` call per micro-step
        (``forward.gather_means``) and averaged, so each rank appends the mean over the global micro-batch, not its
        own; TRL's ``log`` then averages the micro-steps of the logging window. With equal micro-batches the logged
        value equals one process's on the same global batch (tests/trainers/test_distributed.py).
        """
        rw_s, rw_c, rw_r = (self.beta * (p - r).detach() for p, r in zip(policy, ref, strict=True))
        per_pair = {
            "rewards/chosen": rw_c, "rewards/rejected": rw_r, "rewards/accuracies": (rw_c > rw_r).float(),
            "rewards/margins": rw_c - rw_r, "rewards/source_chosen": rw_s,
            "rewards/source_accuracies": (rw_s > rw_r).float(), "rewards/source_margins": rw_s - rw_r,
            "logps/source_chosen": policy[0], "logps/chosen": policy[1], "logps/rejected": policy[2],
        }
        metrics = gather_means(self.accelerator, per_pair)
        metrics["alpha"] = alpha
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
