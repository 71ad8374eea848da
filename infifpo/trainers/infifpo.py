"""InfiFPOConfig / InfiFPOTrainer: preference optimisation against a fused multi-source reference, on TRL's DPOTrainer.

Owns: the InfiFPO options (docs/methods.md, every "(choice)" with its default), reading the frozen pivot's and the
sources' log-probs from the dataset (no reference model is ever loaded), and the per-step fusion metrics.
Does not own: the math (``infifpo.fusion``), row validation (``trainers.data``) or batch layout (``trainers.forward``).
Departures from TRL's DPOTrainer: the reference comes from dataset columns (``precompute_ref_log_probs`` is forced on
and ``_precompute_ref_logps`` returns the dataset unchanged), and ``_compute_loss`` calls ``fusion.*``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from infifpo import fusion
from infifpo.schema import ConfigError, entropy_columns, fuse_columns, ref_columns
from infifpo.trainers.data import (
    model_reference,
    prepare_scored_dataset,
    score_columns,
    uncertainty_columns,
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
from infifpo.trainers.fusion_options import FusionOptions
from infifpo.trainers.metrics import candidate_names, share_metrics
from infifpo.trainers.selector import WEIGHTS_COLUMN, check_learned_options, load_selector

logger = logging.getLogger(__name__)
LOSS_TYPES = ("sigmoid", "ipo", "wrpo")


@dataclass
class InfiFPOConfig(DPOConfig, FusionOptions):
    """DPOConfig plus the InfiFPO options; defaults are the paper's (docs/methods.md). ``help`` is the
    documentation."""

    # The fused reference's options (fusion_method, length_normalize, clip, include_pivot, margin_against,
    # ref_offset) are FusionOptions'.
    fuse: bool = field(default=True, metadata={
        "help": "Official run-script flag: False trains plain DPO against the frozen pivot from the dataset."})
    fusion_sources: list[str] | None = field(default=None, metadata={
        "help": "Fuse only these sources, named as in the rows' source_models (`infifpo score --sources`), in this "
                "order; the others' columns are dropped before validation. Default: every scored source. For "
                "source-subset ablations on the same scored pairs."})
    selector_path: str | None = field(default=None, metadata={
        "help": "fusion_method=learned: the output of `infifpo selector` (docs/methods.md §ASN). Its frozen network "
                "weighs the sources of each pair, and the pairs it was trained on are dropped from training."})
    # Parameters that control the InfiFPO-WRPO variant (loss_type=wrpo; rows also need source_chosen scores)
    alpha_max: float = field(default=0.1, metadata={"help": "loss_type=wrpo: final WRPO α (docs/methods.md §WRPO)."})
    is_dynamic: bool = field(default=True, metadata={
        "help": "loss_type=wrpo: α rises 0 -> alpha_max; False: constant."})
    # Parameters that control the data
    skip_invalid_rows: bool = field(default=False, metadata={
        "help": "Drop (and count in the log) rows that fail validation instead of raising a named error."})
    allow_reference_model_mismatch: bool = field(default=False, metadata={
        "help": "Train although the rows' pivot_model is not the model trained (a logged warning instead of an "
                "error): for a reference deliberately scored with another model, e.g. the SFT checkpoint's parent."})
    # Aliases of the official InfiFPO run script (run.sh); None means "not given".
    fusion_type: str | None = field(default=None, metadata={"help": "Alias of fusion_method (official run.sh)."})
    length_norm: bool | None = field(default=None, metadata={"help": "Alias of length_normalize (official run.sh)."})
    # Overridden DPOConfig defaults
    beta: float | None = field(default=None, metadata={
        "help": "β of the loss; default 2.5 with length normalisation and 0.1 without (paper / run.sh)."})
    precompute_ref_log_probs: bool = field(default=True, metadata={
        "help": "Always True: the reference log-probs are dataset columns; no reference model is loaded."})
    max_length: int | None = field(default=4096, metadata={
        "help": "Maximum prompt + response tokens (the paper's 4096). A longer row is an error naming it (or a "
                "counted drop with skip_invalid_rows): the scores cover the whole response, so it is never cut."})

    def __post_init__(self):
        if self.fusion_type is not None:
            self.fusion_method = self.fusion_type
        if self.length_norm is not None:
            self.length_normalize = self.length_norm
        if self.beta is None:
            self.beta = 2.5 if self.length_normalize else 0.1
        if not self.precompute_ref_log_probs:
            logger.warning("InfiFPO reads reference log-probs from the dataset; precompute_ref_log_probs forced True.")
        self.precompute_ref_log_probs = True
        super().__post_init__()
        if len(self.loss_type) != 1 or self.loss_type[0] not in LOSS_TYPES:
            raise ConfigError(f"loss_type={self.loss_type}: InfiFPO supports exactly one of {list(LOSS_TYPES)}.")
        self.check_fusion_options()
        check_learned_options(self.fusion_method, self.selector_path, self.loss_type[0])
        if self.loss_type[0] == "ipo" and not self.length_normalize:
            raise ConfigError("loss_type=ipo is defined on per-token mean log-probs (as TRL's ipo and the paper); "
                              "set length_normalize: true, or use loss_type sigmoid with sums.")
        check_truncation_mode(self)
        refuse_ignored_dpo_options(self, "InfiFPOTrainer")


def select_sources(dataset: Dataset, names: list[str], responses: tuple[str, ...]) -> Dataset:
    """``dataset`` with only the sources ``names`` (in that order) in its ``fuse_*`` columns and ``source_models``.

    Each row's values are picked by its own ``source_models``; a name a row does not list is a ConfigError."""
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"fusion_sources={names}: give one or more distinct source names.")
    if "source_models" not in dataset.column_names:
        raise ConfigError("fusion_sources needs the rows' source_models column (written by `infifpo score`).")
    cols = [c for r in responses for c in (*fuse_columns(r), entropy_columns(r)[1]) if c in dataset.column_names]

    def pick(row: dict[str, Any]) -> dict[str, Any]:
        have = list(row["source_models"])
        if any(n not in have for n in names):
            raise ConfigError(f"row {row.get('id')!r}: fusion_sources {names} are not all among its source_models "
                              f"{have}; use the names given to `infifpo score --sources`.")
        index = [have.index(n) for n in names]
        return {"source_models": list(names),
                **{c: [row[c][i] for i in index] for c in cols if isinstance(row[c], list)}}

    return dataset.map(pick)


class InfiFPOTrainer(DPOTrainer):
    """TRL DPOTrainer whose reference is the fused source reference f(y) built from scored-pair columns.

    Drop-in: ``InfiFPOTrainer(model, args=InfiFPOConfig(...), train_dataset=..., processing_class=...,
    peft_config=..., quantization_config=...)``. ``ref_model`` is refused: the frozen pivot's log-probs are columns.
    """

    _tag_names = ["trl", "dpo", "infifpo"]
    _name = "InfiFPO"
    _paper = {  # the model card's "introduced in" and citation (TRL's create_model_card)
        "title": "InfiFPO: Implicit Model Fusion via Preference Optimization in Large Language Models",
        "id": "2505.13878",
        "citation": "@article{gu2025infifpo,\n"
                    "    title   = {{InfiFPO: Implicit Model Fusion via Preference Optimization in Large Language "
                    "Models}},\n"
                    "    author  = {Yanggan Gu and Yuanyi Wang and Zhaoyi Yan and Yiming Zhang and Qi Zhou and Fei Wu "
                    "and Hongxia Yang},\n"
                    "    year    = 2025,\n"
                    "    journal = {arXiv preprint arXiv:2505.13878},\n"
                    "}",
    }

    def __init__(self, model: Any, ref_model: Any = None, args: InfiFPOConfig | None = None,
                 data_collator: Any = None, **kwargs: Any):
        if ref_model is not None:
            raise ConfigError("InfiFPOTrainer takes no ref_model: the frozen pivot's log-probs are dataset columns "
                              "(ref_*_logps, written by `infifpo score`).")
        args = args or InfiFPOConfig(output_dir="infifpo-out")
        if not isinstance(args, InfiFPOConfig):
            raise ConfigError(f"args must be an InfiFPOConfig, got {type(args).__name__}.")
        wrpo = args.loss_type[0] == "wrpo"
        self._responses = ("source_chosen", "chosen", "rejected") if wrpo else ("chosen", "rejected")
        # docs/methods.md §UDF: uncertainty fusion also reads mean entropies and mean log-probs
        udf = args.fuse and args.fusion_method == "uncertainty"
        self._uncertainty_columns = uncertainty_columns(self._responses, pivot=args.include_pivot) if udf else []
        self._score_columns = tuple(dict.fromkeys(
            score_columns(self._responses, length_normalize=args.length_normalize, sources=True)
            + self._uncertainty_columns))
        self._source_names: list[str] = []
        self._selector = None  # learned fusion (docs/methods.md §ASN): the frozen selector and its held-out pairs
        if args.fuse and args.fusion_method == "learned":
            self._selector = load_selector(args.selector_path)
            self._selector.check_options(length_normalize=args.length_normalize, clip=args.clip,
                                         include_pivot=args.include_pivot)
            self._score_columns += (WEIGHTS_COLUMN,)
        self._model_ref = model_reference(model)  # the pivot the scores must come from (data.prepare_scored_dataset)
        super().__init__(model, args=args, data_collator=data_collator, **kwargs)
        if data_collator is None:
            self.data_collator = ScoredPreferenceCollator(
                pad_token_id=self._tokenizer.pad_token_id, max_length=args.max_length,
                truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of,
                responses=self._responses, score_columns=self._score_columns)

    # -- data hooks ---------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: InfiFPOConfig, dataset_name: str
                         ) -> Dataset:
        trl_prepare = super()._prepare_dataset

        def tokenize(rows: Dataset) -> Dataset:  # TRL drops no row: too-long rows are named (or counted) after it
            rows = trl_prepare(rows, processing_class, without_max_length(args), dataset_name)
            if "source_chosen" in self._responses:
                rows = add_response_ids(rows, "source_chosen", self._tokenizer)
            return rows

        if args.fusion_sources is not None:
            dataset = select_sources(dataset, args.fusion_sources, self._responses)
        if self._selector is not None:
            self._selector.check_pool(dataset)
            dataset = self._selector.drop_held_out(dataset)
        dataset = prepare_scored_dataset(
            dataset, tokenize, responses=self._responses, length_normalize=args.length_normalize, sources=True,
            ref=True, skip_invalid=args.skip_invalid_rows, max_length=args.max_length,
            tokenizer_name=self._tokenizer.name_or_path, model=self._model_ref,
            allow_model_mismatch=args.allow_reference_model_mismatch, uncertainty=self._uncertainty_columns)
        if self._selector is not None:
            dataset = self._selector.add_weights(dataset)
        if "source_models" in dataset.column_names and not self._source_names:
            self._source_names = list(dataset[0]["source_models"])
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [f"{r}_ids" for r in self._responses] + list(self._score_columns)
        self._signature_columns = list(dict.fromkeys(self._signature_columns + extra))

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        return dataset  # the reference log-probs are already columns (docs/stack-notes.md: "Supplying your own ...")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The fused LM head builds no logits, so evaluation reports the loss only.
        return super().prediction_step(model, inputs, True, ignore_keys)

    # -- loss -----------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        scores = pop_score_columns(inputs, self._score_columns)
        logps, num_tokens = completion_logps(model, inputs)
        values = logps / num_tokens.clamp(min=1) if self.args.length_normalize else logps  # docs/methods.md §LN
        policy = dict(zip(self._responses, values.chunk(len(self._responses)), strict=True))
        fused, info = self._fused_reference(scores, policy)
        losses = self._pair_losses(policy, fused)
        self._log_step(mode, policy, fused, info, dict(zip(self._responses, num_tokens.chunk(len(policy)),
                                                           strict=True)))
        loss = losses.mean()
        return (loss, None) if return_outputs else loss

    def _fused_reference(self, scores: dict[str, torch.Tensor], policy: dict[str, torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], fusion.FusionInfo | None]:
        """f(y) [B] per response (docs/methods.md §Fusion), and the diagnostics of the (chosen, rejected) fusion
        (None when ``fuse`` is off: the reference is the pivot's own values)."""
        pick = 1 if self.args.length_normalize else 0
        ref = {r: scores[ref_columns(r)[pick]] for r in self._responses}
        src = {r: scores[fuse_columns(r)[pick]] for r in self._responses}
        if not self.args.fuse:
            return ref, None
        kw = self.args.fusion_kwargs()
        if WEIGHTS_COLUMN in scores:  # learned fusion: the frozen selector's p̂ of each pair
            kw["pair_weights"] = scores[WEIGHTS_COLUMN]
        f_c, f_r, info = fusion.fuse_reference(ref["chosen"], ref["rejected"], src["chosen"], src["rejected"],
                                               policy_chosen=policy["chosen"], policy_rejected=policy["rejected"],
                                               **kw, **self._uncertainty(scores, "chosen", "rejected"))
        fused = {"chosen": f_c, "rejected": f_r}
        if "source_chosen" in policy:  # InfiFPO-WRPO: y_ws is fused as a preferred response against the same y_l
            fused["source_chosen"] = fusion.fuse_reference(
                ref["source_chosen"], ref["rejected"], src["source_chosen"], src["rejected"],
                policy_chosen=policy["source_chosen"], policy_rejected=policy["rejected"], **kw,
                **self._uncertainty(scores, "source_chosen", "rejected"))[0]
        return fused, info

    def _uncertainty(self, scores: dict[str, torch.Tensor], chosen: str, rejected: str
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``fuse_reference``'s src_uncertainty (and ref_uncertainty with include_pivot) for ``uncertainty`` fusion:
        H̄ + CE of each response from its mean-entropy and mean log-prob columns, nats/token (docs/methods.md §UDF);
        {} for the other methods."""
        if not self._uncertainty_columns:
            return {}

        def h_plus_ce(response: str, who: int) -> torch.Tensor:  # who: 0 the frozen pivot, 1 the sources
            mean_logps = (ref_columns, fuse_columns)[who](response)[1]
            return fusion.udf_uncertainty(scores[entropy_columns(response)[who]], scores[mean_logps])

        kw = {"src_uncertainty": (h_plus_ce(chosen, 1), h_plus_ce(rejected, 1))}
        if self.args.include_pivot:
            kw["ref_uncertainty"] = (h_plus_ce(chosen, 0), h_plus_ce(rejected, 0))
        return kw

    def _pair_losses(self, policy: dict[str, torch.Tensor], fused: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.args.loss_type[0] == "wrpo":
            alpha = fusion.wrpo_alpha(self.state.global_step, max(self.state.max_steps, 1), self.args.alpha_max,
                                      self.args.is_dynamic)
            self._metrics["train" if self.model.training else "eval"]["alpha"].append(alpha)
            return fusion.wrpo_loss(policy["source_chosen"], policy["chosen"], policy["rejected"],
                                    fused["source_chosen"], fused["chosen"], fused["rejected"],
                                    alpha=alpha, beta=self.beta)
        return fusion.infifpo_loss(policy["chosen"], policy["rejected"], fused["chosen"], fused["rejected"],
                                   beta=self.beta, loss_type=self.args.loss_type[0])

    # -- metrics --------------------------------------------------------------------------------------------------
    def _log_step(self, mode: str, policy: dict[str, torch.Tensor], fused: dict[str, torch.Tensor],
                  info: fusion.FusionInfo | None, num_tokens: dict[str, torch.Tensor]) -> None:
        """TRL's rewards/* and logps/* keys (rewards = β(v_π − f)) plus fusion/* diagnostics, gathered over ranks.

        Across ranks: every per-pair tensor (B,) is all-gathered in one ``gather_for_metrics`` call per micro-step
        (``forward.gather_means``) and averaged, so each rank appends the mean over the global micro-batch, not its
        own; TRL's ``log`` then averages the micro-steps of the logging window. With equal micro-batches the logged
        value equals one process's on the same global batch (tests/trainers/test_distributed.py).
        """
        rw_c, rw_r = fusion.implicit_rewards(policy["chosen"], policy["rejected"], fused["chosen"], fused["rejected"],
                                             beta=self.beta)
        per_pair = {
            "rewards/chosen": rw_c, "rewards/rejected": rw_r, "rewards/accuracies": (rw_c > rw_r).float(),
            "rewards/margins": rw_c - rw_r, "logps/chosen": policy["chosen"], "logps/rejected": policy["rejected"],
            "fusion/margin": fused["chosen"] - fused["rejected"],
            "fusion/chosen_num_tokens": num_tokens["chosen"], "fusion/rejected_num_tokens": num_tokens["rejected"],
        }
        if info is not None:
            per_pair["fusion/clip_rate"] = info.clip_rate.expand_as(rw_c)
            names = candidate_names(self._source_names, self.args.include_pivot, info.num_candidates)
            per_pair.update(share_metrics(info, names, "fusion", len(rw_c), sides=("chosen", "rejected")))
        for key, value in gather_means(self.accelerator, per_pair).items():
            self._metrics[mode][key].append(value)

