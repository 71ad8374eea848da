"""FusedDistillationConfig / FusedDistillationTrainer: on-policy distillation from fused heterogeneous teachers.

Owns: the OPD options (docs/methods.md §On-policy distillation, fusion option names as in ``InfiFPOConfig``), scoring
each generation batch (teachers, the frozen initial student v_r, the current student v̂_π), the group-baseline
advantages, the loss hook and the ``opd/*`` metrics. Does not own: the math (``infifpo.fusion``), teacher loading and
scoring (``trainers.teachers``), token spans and chunked log-probs (``infifpo.logprobs``).

Why TRL's ``DistillationTrainer``: it already owns on-policy generation (``model.generate``, or vLLM colocate/server
through TRL's own ``VLLMGeneration``, so this package never imports vllm), the generation-batch buffering across
gradient accumulation, PEFT checks, ``_forward_redirection`` for DDP/FSDP and the student's chunked hidden states.
GRPOTrainer would bring rewards, clipping ratios and importance sampling we do not use. Departures from it:
``_get_train_sampler`` repeats every prompt G = ``num_generations`` times (GRPO's layout; TRL's distillation has
G = 1); ``_generate_and_score_completions`` adds the advantages; ``compute_loss`` is the sequence-level score-function
surrogate −mean_i (A_i − 1/n_i)·log π(y_i) on the *summed* log-probs (−mean_i A_i·log π(y_i) without LN; ``fusion.
opd_sequence_loss``) (+ the optional token-level generalised JSD for same-vocabulary teachers); the teacher is a list
of ``Teacher`` records with their own tokenizers, not ``teacher_model``.

The gradient is an unbiased estimate of ∇ E_y~π[v_π(y) − f(y)] (f detached) with the default leave-one-out baseline
(A_i = g_i − mean of g over the other G − 1 samples, g = f − v̂_π in the space of v); ``advantage_baseline:
group_mean`` (docs/methods.md's literal group mean) scales the score term by (G − 1)/G but not the LN term 1/n_i, so it
is biased with LN. The estimator needs samples from the policy it differentiates: generation runs at temperature 1
with no truncation (top_p 1, top_k 0, no min_p, repetition_penalty 1); other settings raise ConfigError.

(choice) ``clip`` is off by default here, unlike InfiFPO: an on-policy sample is by construction likely under the
student, and on the default pool every teacher rated the student's samples below the initial student (SmolLM2
-0.88 vs teachers -1.5 to -1.9 nats/token), so clipping set f = v_r, every advantage to 0 and the run was a no-op
(the trainer warns when a whole generation batch has zero advantages). With ``clip`` on, every sample is fused as a
preferred response: c_k = max(v_k, v_r), i.e. a teacher may pull the student toward a sample it rates above the
initial student, never below it (InfiFPO's y_w rule; with max_margin, f(y) = max(v_r, max_k v_k)). Completions cut
at ``max_completion_length`` are scored as they are: the teachers see them closed by their end-of-turn token.

What max-margin selects without clipping: f(y) = c_k*(y) with k* = argmax_k |exp(c_k) − exp(v_r)|, the teacher
(or the initial student, a candidate when ``include_pivot``) whose sequence probability differs most from the initial
student's, in either direction. A teacher far more confident than the student on a sample is selected (that is how
the good teacher pulls the student toward its answers); but when every teacher rates the sample below the student,
the one that disagrees most is the most pessimistic one, so f(y) is the lowest teacher score and the advantage
follows the harshest teacher. (|exp(c) − exp(v_r)| saturates at exp(v_r) for c far below v_r, so among very
pessimistic teachers the larger |c − v_r| wins.) ``clip`` on removes that downward pull (c_k ≥ v_r), at the price of
zero advantages when no teacher beats the student. Conversely, where the initial student is unlikely (v_r far below
the teachers, e.g. text it never produced) max-margin takes the most confident teacher, so E_y~π[v_π − f] there is at
most the student's divergence from any single teacher: the objective is minimised by matching whichever teacher is
easiest to match, a weak high-entropy one included (tests/trainers/test_opd.py shows such a run).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl import DistillationConfig, DistillationTrainer
from trl.trainer.utils import RepeatSampler

from infifpo import fusion
from infifpo.logprobs import head_token_logprobs, logit_softcap
from infifpo.schema import ConfigError
from infifpo.trainers.forward import gather_means
from infifpo.trainers.fusion_options import FusionOptions
from infifpo.trainers.metrics import candidate_names, share_metrics
from infifpo.trainers.teachers import (
    Teacher,
    check_prompts,
    check_shared_vocabulary,
    freeze,
    load_teachers,
    rowwise_sums,
    softcapped_logits,
    teacher_sequence_logps,
)

logger = logging.getLogger(__name__)
# OPD samples are not pairs: max_margin_pair picks per pair, and the learned selector is trained on pairs;
# teachers are scored without entropies (uncertainty).
FUSION_METHODS = [m for m in fusion.FUSIONS if m not in ("max_margin_pair", "learned", "uncertainty")]
# Generation settings (DistillationConfig fields or generation_kwargs keys) and the values that leave the student's
# distribution unchanged (the first is the one to set); anything else samples from a different policy.
SAMPLING_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "temperature": (1.0,), "top_p": (1.0,), "top_k": (0, None), "min_p": (None, 0.0),
    "repetition_penalty": (1.0, None), "do_sample": (True,), "num_beams": (1,), "typical_p": (1.0, None),
    "epsilon_cutoff": (0.0, None), "eta_cutoff": (0.0, None), "no_repeat_ngram_size": (0, None),
}


@dataclass
class FusedDistillationConfig(DistillationConfig, FusionOptions):
    """DistillationConfig plus the fused-teacher options (docs/methods.md §OPD, §Fusion). ``help`` is the
    documentation.

    Inherited and used: generation (max_completion_length, use_vllm, ...; sampling must be untempered and
    untruncated, see ``SAMPLING_NEUTRAL``), ``beta`` (the token-level JSD's interpolation: 1 = reverse KL),
    ``teacher_model_init_kwargs`` (applied to every teacher).
    """

    # Parameters that control the teachers
    teacher_models: list[str] = field(default_factory=list, metadata={
        "help": "Teacher references (local directory, packaged name or hub id); tokenizers may all differ."})
    teacher_names: list[str] | None = field(default=None, metadata={
        "help": "Names for the metric keys, one per teacher; default the last path component of each reference."})
    teacher_batch_size: int = field(default=8, metadata={"help": "Completions per teacher forward (memory bound)."})
    # Parameters that control on-policy sampling
    num_generations: int = field(default=4, metadata={
        "help": "G completions per prompt; the advantage baseline is computed within these G (needs G >= 2)."})
    advantage_baseline: str = field(default="leave_one_out", metadata={
        "help": "Baseline subtracted from f - v̂ within a prompt's G samples: 'leave_one_out' (mean of the other "
                "G - 1; unbiased gradient) or 'group_mean' (mean of all G, docs/methods.md's text; scales the score "
                "term by (G-1)/G but not the 1/n length term, so biased with length_normalize).",
        "choices": list(fusion.OPD_BASELINES)})
    # The fused teacher score f(y): FusionOptions (docs/methods.md §LN, §Clipping, §Fusion), with clip off here
    clip: bool = field(default=False, metadata={
        "help": "Clip teachers against the frozen initial student, c_k = max(v_k, v_r); off by default because "
                "teachers usually rate on-policy samples below the student, which makes every advantage 0. Without "
                "clipping max_margin selects the teacher that disagrees most with the student, which for a sample "
                "every teacher rates below the student is the most pessimistic teacher."})
    # Parameters that control the optional token-level term (same-vocabulary teachers only)
    token_level_weight: float = field(default=0.0, metadata={
        "help": "Weight of TRL-style token-level generalised JSD (beta) to same-vocabulary teachers; 0 = off."})
    token_level_teachers: list[str] | None = field(default=None, metadata={
        "help": "Names of the teachers for the token-level term; default every teacher (each must share the "
                "student's vocabulary, else ConfigError)."})
    # Overridden DistillationConfig defaults
    disable_dropout: bool = field(default=True, metadata={
        "help": "Disable dropout so v̂_π at generation time equals the value the loss differentiates."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature; must be 1: the score-function gradient needs samples from the policy it "
                "differentiates (log-probs at temperature 1)."})
    top_p: float = field(default=1.0, metadata={
        "help": "Nucleus sampling; must be 1 (no truncation), for the same reason as temperature."})

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_model_name_or_path is not None:
            raise ConfigError("FusedDistillationConfig takes a list `teacher_models`, not teacher_model_name_or_path.")
        if self.fusion_method == "uncertainty":
            raise ConfigError("fusion_method='uncertainty' needs each teacher's mean next-token entropy on every "
                              "sample, which OPD's teacher scoring (trainers.teachers) does not compute; use "
                              f"one of {FUSION_METHODS}.")
        self.check_fusion_options(FUSION_METHODS, " (max_margin_pair and learned need preference pairs)")
        if self.advantage_baseline not in fusion.OPD_BASELINES:
            raise ConfigError(f"advantage_baseline={self.advantage_baseline!r}; valid: {list(fusion.OPD_BASELINES)}.")
        self._check_sampling_is_the_policy()
        if self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations}: the group baseline needs G >= 2 samples per "
                              "prompt (with G = 1 every advantage is 0).")
        per_process = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if per_process % self.num_generations:
            raise ConfigError(f"per_device_train_batch_size x gradient_accumulation_steps = {per_process} must be a "
                              f"multiple of num_generations={self.num_generations}, so every prompt's G samples are "
                              "scored in the same process.")
        if self.token_level_weight < 0:
            raise ConfigError(f"token_level_weight must be >= 0, got {self.token_level_weight}.")

    def _check_sampling_is_the_policy(self) -> None:
        """ConfigError unless generation samples from π itself (docs/methods.md §OPD: E_y~π with π
        at temperature 1)."""
        settings = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        extra = self.generation_kwargs if isinstance(self.generation_kwargs, dict) else {}
        settings.update({k: v for k, v in extra.items() if k in SAMPLING_NEUTRAL})
        bad = {k: v for k, v in settings.items() if v not in SAMPLING_NEUTRAL[k]}
        if bad:
            got = ", ".join(f"{k}={v!r}" for k, v in bad.items())
            fix = ", ".join(f"{k}: {SAMPLING_NEUTRAL[k][0]}" for k in bad)
            raise ConfigError(f"OPD samples must come from the student's own distribution (the score-function "
                              f"gradient differentiates log-probs at temperature 1), got {got}; set {fix} "
                              "(also in generation_kwargs).")


class FusedDistillationTrainer(DistillationTrainer):
    """On-policy distillation where several heterogeneous teachers score the student's samples at sequence level.

    ``FusedDistillationTrainer(model, teachers=None, args=FusedDistillationConfig(teacher_models=[...]),
    train_dataset=Dataset with a conversational "prompt" column, processing_class=..., peft_config=...)``.
    ``teachers``: ``Teacher`` records or model references; default ``args.teacher_models``.
    """

    _tag_names = ["trl", "distillation", "infifpo", "opd"]
    _name = "FusedDistillation"
    loss_is_scaled_for_ga = False  # the loss is a per-micro-batch mean; Trainer divides it by the GA steps

    def __init__(self, model: Any, teachers: list[Teacher | str] | None = None,
                 args: FusedDistillationConfig | None = None, train_dataset: Any = None, **kwargs: Any):
        args = args or FusedDistillationConfig(output_dir="opd-out")
        if not isinstance(args, FusedDistillationConfig):
            raise ConfigError(f"args must be a FusedDistillationConfig, got {type(args).__name__}.")
        teachers = teachers if teachers is not None else args.teacher_models
        if not teachers:
            raise ConfigError("no teachers: set `teacher_models` (model references) or pass teachers=[...].")
        check_prompts(train_dataset)
        super().__init__(model, teacher_model=None, args=args, train_dataset=train_dataset, **kwargs)
        self.teachers = self._setup_teachers(teachers)
        self._token_level_teachers = self._select_token_level_teachers()
        # v_r: the LoRA-disabled model under PEFT, else a frozen copy of the student as it is now.
        self.ref_model = None if is_peft_model(self.model) else copy.deepcopy(self.model).eval().requires_grad_(False)

    def _setup_teachers(self, teachers: list[Teacher | str]) -> list[Teacher]:
        if all(isinstance(t, str) for t in teachers):
            teachers = load_teachers(teachers, names=self.args.teacher_names,
                                     trust_remote_code=self.args.trust_remote_code,
                                     init_kwargs=self.args.teacher_model_init_kwargs)
        elif not all(isinstance(t, Teacher) for t in teachers):
            raise ConfigError("teachers must be all model references (str) or all Teacher records.")
        for t in teachers:
            freeze(t).model.to(self.accelerator.device)
        return list(teachers)

    def _select_token_level_teachers(self) -> list[Teacher]:
        if self.args.token_level_weight == 0:
            return []
        by_name = {t.name: t for t in self.teachers}
        names = self.args.token_level_teachers or list(by_name)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"token_level_teachers {unknown} are not teachers; teachers are {list(by_name)}.")
        for n in names:
            check_shared_vocabulary(self._tokenizer, self.model, by_name[n])
        return [by_name[n] for n in names]

    # -- sampling: every prompt G times in a row, so groups are consecutive blocks of G ------------------------
    def _get_train_sampler(self, dataset: Any = None) -> RepeatSampler:
        generation_batch = (self.args.per_device_train_batch_size * self.accelerator.num_processes
                            * self.args.gradient_accumulation_steps)
        return RepeatSampler(dataset if dataset is not None else self.train_dataset,
                             mini_repeat_count=self.args.num_generations,
                             batch_size=generation_batch // self.args.num_generations,
                             repeat_count=self.args.gradient_accumulation_steps, shuffle=self.shuffle_dataset,
                             seed=self.args.seed)

    def _get_eval_sampler(self, eval_dataset: Any) -> RepeatSampler:
        return RepeatSampler(eval_dataset, mini_repeat_count=self.args.num_generations, seed=self.args.seed)

    # -- scoring one generation batch ----------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super()._generate_and_score_completions(inputs)
        batch["advantages"] = self._score_completions([x["prompt"] for x in inputs], batch)
        return batch

    def _score_completions(self, prompts: list[Any], batch: dict[str, Any]) -> torch.Tensor:
        """Advantages A (N,) of a generation batch: teachers → LN → fuse_reference → group baseline
        (docs/methods.md)."""
        mask = batch["completion_mask"].bool()
        texts = self._tokenizer.batch_decode([c[m] for c, m in zip(batch["completion_ids"], mask, strict=True)],
                                             skip_special_tokens=True)
        num_tokens = mask.sum(dim=1)
        policy = self._values(self._no_grad_logps(self.accelerator.unwrap_model(self.model), batch), num_tokens)
        with self._initial_policy() as initial:
            ref = self._values(self._no_grad_logps(initial, batch), num_tokens)
        scored = [teacher_sequence_logps(t, prompts, texts, batch_size=self.args.teacher_batch_size)
                  for t in self.teachers]
        src = self._values(torch.stack([s for s, _ in scored], 1), torch.stack([n for _, n in scored], 1))
        src = src.to(ref.device)
        a = self.args
        # Each sample is fused as a preferred response (module docstring); the mirrored rejected side is unused.
        fused, _, info = fusion.fuse_reference(ref, ref, src, src, policy_chosen=policy, policy_rejected=policy,
                                               **a.fusion_kwargs())
        advantages = fusion.opd_sequence_advantages(fused, policy, a.num_generations, baseline=a.advantage_baseline)
        # Clip rate of the side used (c_k = max(v_k, v_r) changes v_k iff v_k < v_r); FusionInfo.clip_rate also
        # counts the unused mirrored side.
        clipped = (src < ref[:, None]).float().mean(dim=1) if a.clip else torch.zeros_like(ref)
        if not bool(advantages.any()):
            self._warn_zero_advantages(float(clipped.mean()))
        self._log_scores(policy, ref, src, fused, info, advantages, num_tokens, clipped)
        return advantages

    def _warn_zero_advantages(self, clip_rate: float) -> None:
        # "Is my run healthy?": a distillation run that silently trains on nothing must say so.
        rest = (" (with length_normalize only the 1/n length term of the gradient remains, which favours longer "
                "completions)" if self.args.length_normalize else "")
        logger.warning("OPD step %d: every advantage is 0, so the teachers do not move the student this step%s; "
                       "clip rate %.2f (fraction of teacher values raised to the initial student). With clip=True "
                       "this happens when every teacher rates the samples below the initial student (f = v_r); set "
                       "clip: false or add teachers that are more confident than the student.",
                       self.state.global_step, rest, clip_rate)

    def _values(self, logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """v: summed log-probs (nats) or, with LN, per-token means (nats/token) (docs/methods.md §LN)."""
        return fusion.length_normalize(logps, num_tokens) if self.args.length_normalize else logps

    @contextlib.contextmanager
    def _initial_policy(self):
        student = self.accelerator.unwrap_model(self.model)
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with student.disable_adapter():
                yield student

    def _no_grad_logps(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Summed completion log-probs (N,) under ``model``, no grad, in micro-batches, under the loss's autocast."""
        step = self.args.per_device_train_batch_size
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        out = []
        with torch.no_grad(), self.compute_loss_context_manager():
            for s in range(0, batch["completion_ids"].shape[0], step):
                out.append(self._completion_logps(model, {k: batch[k][s : s + step] for k in keys})[0].float())
        return torch.cat(out)

    def _completion_logps(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probs (B,) in nats over each row's completion tokens, last hidden states of those tokens)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"].bool()
        hidden = self._get_last_hidden_state(model, input_ids, attention_mask, mask.shape[1])[mask]
        token_logps = head_token_logprobs(hidden, inputs["completion_ids"][mask], model.get_output_embeddings(),
                                          softcap=logit_softcap(model.config))
        return rowwise_sums(token_logps, mask), hidden

    # -- loss ---------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Through `_forward_redirection`, as TRL does, so DDP/FSDP see the backbone call as the wrapper's forward.
        student = self.accelerator.unwrap_model(model)
        loss, divergence = self._forward_redirection(model, student, self._opd_loss, student, inputs)
        if divergence is not None:
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["opd/token_level_divergence"].append(
                self.accelerator.gather_for_metrics(divergence[None]).mean().item())
        return (loss, None) if return_outputs else loss

    def _opd_loss(self, student: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """−mean_i (A_i − 1/n_i)·log π(y_i) with LN, −mean_i A_i·log π(y_i) without (docs/methods.md §OPD; log π summed
        over the completion tokens) [+ token_level_weight · mean token-level JSD], and that JSD."""
        sums, hidden = self._completion_logps(student, inputs)
        num_tokens = inputs["completion_mask"].sum(dim=1) if self.args.length_normalize else None
        loss = fusion.opd_sequence_loss(sums, inputs["advantages"], num_tokens)
        if not self._token_level_teachers:
            return loss, None
        divergence = self._token_level_divergence(student, hidden, inputs)
        return loss + self.args.token_level_weight * divergence, divergence.detach()

    def _token_level_divergence(self, student: Any, hidden: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Mean over same-vocabulary teachers of the generalised JSD (nats/token) on the student's completion tokens.

        Builds (M, V) logits for the M completion tokens of the micro-batch (not chunked: opt-in, same-vocab only).
        """
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"].bool()
        student_logits = softcapped_logits(student, hidden)
        divergences = []
        for t in self._token_level_teachers:
            with torch.no_grad():
                t_hidden = self._get_last_hidden_state(t.model, input_ids, attention_mask, mask.shape[1])[mask]
                teacher_logits = softcapped_logits(t.model, t_hidden)
            divergences.append(fusion.generalized_jsd(student_logits, teacher_logits, self.args.beta,
                                                      temperature=self.args.temperature))
        return torch.stack(divergences).mean()

    # -- metrics --------------------------------------------------------------------------------------------------
    def _log_scores(self, policy: torch.Tensor, ref: torch.Tensor, src: torch.Tensor, fused: torch.Tensor,
                    info: fusion.FusionInfo, advantages: torch.Tensor, num_tokens: torch.Tensor,
                    clipped: torch.Tensor) -> None:
        """Per-sample opd/* metrics, averaged over all processes (forward.gather_means, as InfiFPO's fusion/*).

        ``clipped`` [N]: per sample, the fraction of teacher values clipping raised to v_r (0 with clip off)."""
        mode = "train" if self.model.training else "eval"
        per_sample = {"opd/fused_teacher_score": fused, "opd/student_teacher_gap": policy - fused,
                      "opd/completion_length": num_tokens.to(ref.device), "opd/clip_rate": clipped,
                      "opd/policy_score": policy, "opd/student_init_score": ref}
        for k, t in enumerate(self.teachers):
            per_sample[f"opd/teacher_score/{t.name}"] = src[:, k]
        # args.include_pivot is resolved in __post_init__ (fusion.resolve_include_pivot), so names match K'.
        names = candidate_names([t.name for t in self.teachers], self.args.include_pivot, info.num_candidates)
        per_sample.update(share_metrics(info, names, "opd/teacher_share", len(ref)))
        for key, value in gather_means(self.accelerator, per_sample).items():
            self._metrics[mode][key].append(value)
        self._metrics[mode]["opd/advantage_std"].append(self.accelerator.gather_for_metrics(advantages).std().item())
