"""WRPOTrainer: α = 0 is DPO, the α schedule over optimizer steps, training with precomputed and live references."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from infifpo.fusion import wrpo_alpha
from infifpo.schema import ConfigError
from infifpo.trainers.wrpo import WRPOConfig, WRPOTrainer
from tests.trainers.conftest import (
    assert_same_loss_and_grads,
    assert_sgd_step,
    cpu_args,
    make_scored_rows,
    plain_completion_logps,
    sgd_args,
)


def _without_ref_columns(rows):
    return Dataset.from_list([{k: v for k, v in r.items() if not k.startswith("ref_")} for r in rows])


def test_alpha_zero_is_dpo_on_target_chosen_and_rejected(tiny_llama, tiny_llama_b, tiny_tok, tmp_path):
    """α_max = 0: −log σ(ρ(y_wt) − ρ(y_l)), TRL's sigmoid DPO on (chosen, rejected) with the same live reference."""
    rows = make_scored_rows(tiny_tok, 4, wrpo=True)
    args = cpu_args(beta=0.5)
    wrpo = WRPOTrainer(tiny_llama_b, ref_model=AutoModelForCausalLM.from_pretrained(tiny_llama),
                       train_dataset=_without_ref_columns(rows), processing_class=tiny_tok,
                       args=WRPOConfig(output_dir=str(tmp_path / "w"), alpha_max=0.0, is_dynamic=False, **args))
    plain = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    dpo = DPOTrainer(tiny_llama_b, ref_model=AutoModelForCausalLM.from_pretrained(tiny_llama), train_dataset=plain,
                     processing_class=tiny_tok, args=DPOConfig(output_dir=str(tmp_path / "d"), **args))
    assert wrpo.ref_model is not None and not wrpo.precompute_ref_logps
    batch_w = wrpo.data_collator([wrpo.train_dataset[i] for i in range(4)])
    batch_d = dpo.data_collator([dpo.train_dataset[i] for i in range(4)])
    assert_same_loss_and_grads(wrpo, batch_w, dpo, batch_d)


def test_alpha_schedule_respects_max_steps_and_gradient_accumulation(tiny_llama, tiny_tok, tmp_path):
    """T = max_steps = 4 optimizer steps of 2 micro-batches each (8 rows, 1 epoch would be 4 steps at accumulation 1).

    α(t) = 0.1 · t / 4 at optimizer step t, constant across its micro-batches: logged 0, .025, .05, .075; α(T) = 0.1.
    """
    rows = make_scored_rows(tiny_tok, 8, wrpo=True)
    trainer = WRPOTrainer(tiny_llama, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok,
                          args=WRPOConfig(output_dir=str(tmp_path), **cpu_args(
                              max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=1)))
    assert trainer.ref_model is None  # reference log-probs come from the ref_* columns
    trainer.train()
    logged = [h["alpha"] for h in trainer.state.log_history if "alpha" in h]
    assert logged == pytest.approx([0.0, 0.025, 0.05, 0.075])
    assert [wrpo_alpha(t, 4, 0.1) for t in (0, 2, 4)] == pytest.approx([0.0, 0.05, 0.1])
    assert wrpo_alpha(1, 4, 0.1, is_dynamic=False) == 0.1


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_sgd_step_follows_the_hand_computed_gradient(tiny_llama, tiny_tok, tmp_path, lora):
    """One SGD step moves every trainable parameter by −lr ∇L, L = mean −log σ(α ρ_ws + (1 − α) ρ_wt − ρ_l),
    ρ = β(π − r), computed by hand from plain forwards. α = α_max = 0.3 (constant) so all three terms count.
    Full: r from the ref_* columns. LoRA: the live reference is the adapter-disabled model (= the base weights)."""
    from peft import LoraConfig

    rows = make_scored_rows(tiny_tok, 2, wrpo=True)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    data = _without_ref_columns(rows) if lora else Dataset.from_list(rows)
    trainer = WRPOTrainer(tiny_llama, train_dataset=data, processing_class=tiny_tok, peft_config=peft,
                          args=WRPOConfig(output_dir=str(tmp_path), beta=0.5, alpha_max=0.3, is_dynamic=False,
                                          precompute_ref_log_probs=not lora, **sgd_args(learning_rate=0.5)))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    responses = ("source_chosen", "chosen", "rejected")

    def hand_loss(model):
        losses = []
        for row in rows:
            texts = [row[r][0]["content"] for r in responses]
            pi = plain_completion_logps(model, tiny_tok, row["prompt"], texts)[0]
            with torch.no_grad():
                ref = (plain_completion_logps(base, tiny_tok, row["prompt"], texts)[0] if lora
                       else torch.tensor([row[f"ref_{r}_logps"] for r in responses]))
            rho = 0.5 * (pi - ref)
            losses.append(-torch.nn.functional.logsigmoid(0.3 * rho[0] + 0.7 * rho[1] - rho[2]))
        return torch.stack(losses).mean()

    assert_sgd_step(trainer, hand_loss, lr=0.5)
    assert not lora or all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert "rewards/source_chosen" in trainer.state.log_history[0]
    assert WRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).max_length == 2048  # released setting


def test_precompute_without_reference_columns_is_a_config_error(tiny_llama, tiny_tok, tmp_path):
    rows = make_scored_rows(tiny_tok, 2, wrpo=True)
    with pytest.raises(ConfigError, match="ref_source_chosen_logps"):
        WRPOTrainer(tiny_llama, train_dataset=_without_ref_columns(rows), processing_class=tiny_tok,
                    args=WRPOConfig(output_dir=str(tmp_path), precompute_ref_log_probs=True, **cpu_args()))
