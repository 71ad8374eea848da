"""Fixtures for the trainer tests: scored-pair rows for the tiny offline models, and fast CPU trainer configs."""

from __future__ import annotations

import random

import pytest

from infifpo.logprobs import response_spans

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "two", "plus", "three", "is", "five", "so", "we", "add", "it",
         "up", "to", "get", "ten"]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_scored_rows(tokenizer, n: int = 8, k: int = 2, *, seed: int = 0, wrpo: bool = False,
                     counts: bool = True, sources: tuple[str, ...] | None = None) -> list[dict]:
    """Scored-pair rows in our format (schema.py) whose token counts match ``tokenizer``'s completion split.

    Log-probs are random negative numbers (nats): the trainers never recompute them, so any valid value works.
    """
    rng = random.Random(seed)
    responses = ("source_chosen", "chosen", "rejected") if wrpo else ("chosen", "rejected")
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"q{i}: " + _sentence(rng, 3)}]
        texts = {r: _sentence(rng, 2 + rng.randrange(3)) + f" {r[0]}{i}" for r in responses}
        _, spans = response_spans(tokenizer, prompt, [texts[r] for r in responses])
        row = {"id": f"p{i:03d}", "split": "po", "prompt": prompt, "pivot_model": "tiny",
               "source_models": list(sources or [f"m{j}" for j in range(k)])}
        for r, span in zip(responses, spans, strict=True):
            row[r] = [{"role": "assistant", "content": texts[r]}]
            n_tok = len(span)
            ref = -rng.uniform(0.5, 3.0) * n_tok
            src = [-rng.uniform(0.5, 3.0) * n_tok for _ in range(k)]
            src_n = [n_tok + rng.randrange(3) for _ in range(k)]
            row.update({f"ref_{r}_logps": ref, f"ref_mean_{r}_logps": ref / n_tok,
                        f"fuse_{r}_logps": src,
                        f"fuse_mean_{r}_logps": [s / m for s, m in zip(src, src_n, strict=True)]})
            if counts:
                row.update({f"ref_{r}_num_tokens": n_tok, f"fuse_{r}_num_tokens": src_n})
        rows.append(row)
    return rows


def cpu_args(**kw) -> dict:
    """Training-argument overrides for a fast, deterministic, silent CPU run."""
    base = dict(use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=2, max_steps=3,
                logging_steps=1, save_strategy="no", learning_rate=1e-3, max_length=128, seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return base


@pytest.fixture(scope="session")
def tiny_tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def assert_same_loss_and_grads(trainer_a, batch_a, trainer_b, batch_b, atol: float = 1e-6) -> None:
    """Both trainers give the same loss on their batch, it is not DPO's trivial ln 2, and every parameter gradient
    agrees to ``atol`` (the identity tests: InfiFPO/WRPO reduced to DPO)."""
    import math

    from torch.testing import assert_close

    loss_a = trainer_a.compute_loss(trainer_a.model, batch_a)
    loss_b = trainer_b.compute_loss(trainer_b.model, batch_b)
    assert abs(loss_b.item() - math.log(2.0)) > 1e-3  # a non-trivial loss, so the identity is not vacuous
    assert_close(loss_a, loss_b, atol=atol, rtol=0)
    loss_a.backward()
    loss_b.backward()
    grads_b = dict(trainer_b.model.named_parameters())
    for name, p in trainer_a.model.named_parameters():
        assert_close(p.grad, grads_b[name].grad, atol=atol, rtol=0, msg=name)


def plain_completion_logps(model, tokenizer, prompt, texts):
    """Independent of the trainers: (summed log-probs [R] with grad, token counts [R]) of each assistant text after
    ``prompt``, from one plain full-logits forward per response (no fused head, no batching, no padding)."""
    import torch

    prompt_ids, spans = response_spans(tokenizer, prompt, list(texts))
    sums, counts = [], []
    for span in spans:
        ids = torch.tensor([prompt_ids + span])
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        sums.append(logp[len(prompt_ids) - 1:].sum())
        counts.append(len(span))
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float32)


def sgd_args(**kw) -> dict:
    """One plain SGD step (no momentum, decay, clipping, warm-up or schedule): Δθ = −lr ∇L exactly."""
    return cpu_args(**{"optim": "sgd", "max_steps": 1, "lr_scheduler_type": "constant", "weight_decay": 0.0,
                       "max_grad_norm": 0.0, "learning_rate": 0.5, **kw})


def assert_sgd_step(trainer, hand_loss_fn, lr: float, atol: float = 1e-6) -> None:
    """Train one SGD step and check every trainable parameter moved by exactly −lr × ∇ of ``hand_loss_fn(model)``,
    an independently computed loss evaluated on a copy of the model before the step; the move is non-trivial."""
    import copy

    import torch

    hand = copy.deepcopy(trainer.model)
    for module in hand.modules():  # accelerate patches instance `forward`s bound to the original: drop the copies
        module.__dict__.pop("forward", None)
    if getattr(hand, "is_gradient_checkpointing", False):  # TRL turns it on; the plain forward needs no recompute
        hand.gradient_checkpointing_disable()
    hand_loss_fn(hand).backward()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    grads = {n: p.grad for n, p in hand.named_parameters() if p.requires_grad}
    after = dict(trainer.model.named_parameters())
    moved = 0.0
    for name, old in before.items():
        expected = -lr * (grads[name] if grads[name] is not None else torch.zeros_like(old))
        torch.testing.assert_close(after[name].detach() - old, expected, atol=atol, rtol=1e-4, msg=name)
        moved = max(moved, float(expected.abs().max()))
    assert moved > 100 * atol  # the step is not vacuous


@pytest.fixture(autouse=True)
def _no_stale_dataloader():
    """accelerate's GradientState is process-wide and keeps (weak) references to the dataloaders being iterated. A
    run stopped at max_steps on its last, partial batch leaves its train dataloader "active" at its end with a
    remainder, and a trainer kept alive (entry's _KEPT) keeps that reference valid; a later test that calls
    compute_loss outside any dataloader then has gather_for_metrics cut its per-pair metrics to that remainder. Each
    test starts with no active dataloader, as a fresh process does."""
    from accelerate.state import GradientState

    GradientState().dataloader_references = [None]
    yield
