"""FusedDistillationTrainer: hand-computed advantages and gradient, learning from the better teacher on a toy task,
shared fusion functions, metrics, the token-level term's vocabulary check, and `infifpo train --method opd`.

Pool (all offline, tiny, character tokenizers with the same chat template): a Llama student; teacher "good" (Qwen2,
tokenizer with 2 extra characters and every character's id reversed) that always answers "x"; teacher "weak" (Llama,
3 other extra characters, random weights). Three vocabulary sizes and different ids for the same character, so only
sequence-level fusion on the completion text can combine them (docs/bad-inputs.md T8: student ids fed to a teacher
would fail).
"""

from __future__ import annotations

import copy
import random
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import infifpo.trainers.infifpo as infifpo_trainer
from infifpo import fusion
from infifpo.logprobs import response_spans
from infifpo.schema import ConfigError, DataFormatError
from infifpo.trainers import entry
from infifpo.trainers.opd import FusedDistillationConfig, FusedDistillationTrainer
from infifpo.trainers.teachers import Teacher
from tests.conftest import make_tiny_model

STUDENT_CHARS = "abcdefgx"  # the student answers one of these uniformly; the good teacher always answers "x"
OPD_KEYS = ("opd/fused_teacher_score", "opd/student_teacher_gap", "opd/completion_length", "opd/clip_rate",
            "opd/advantage_std", "opd/teacher_share/good", "opd/teacher_share/weak", "opd/teacher_share/pivot",
            "opd/teacher_score/good", "opd/teacher_score/weak")


def _sft(path: str, answers: str, *, steps: int = 60, seed: int = 0) -> str:
    """Fit a tiny model to answer every prompt with one character drawn uniformly from ``answers`` (then EOS)."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    rng = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        rows = [response_spans(tok, [{"role": "user", "content": f"q{rng.randrange(100)}"}], [rng.choice(answers)])
                for _ in range(16)]
        width = max(len(p) + len(c[0]) for p, c in rows)
        ids = torch.full((16, width), tok.pad_token_id)
        labels = torch.full((16, width), -100)
        for i, (p, (c,)) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    return path


def _reverse_character_ids(path: str) -> None:
    """Rewrite a saved char tokenizer so ordinary characters get their ids in reverse order (specials keep theirs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    old = AutoTokenizer.from_pretrained(path)
    fixed = {old.pad_token, old.eos_token, old.unk_token}
    items = sorted(old.get_vocab().items(), key=lambda kv: kv[1])
    chars = [t for t, _ in items if t not in fixed]
    vocab = {t: i for t, i in items if t in fixed} | dict(zip(chars[::-1], [i for t, i in items if t not in fixed],
                                                            strict=True))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=old.unk_token))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    new = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=old.eos_token, pad_token=old.pad_token,
                                  unk_token=old.unk_token, padding_side="left")
    new.chat_template = old.chat_template
    new.save_pretrained(path)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_pool")
    tiny = dict(hidden=32, layers=1)
    student = _sft(make_tiny_model(str(root / "student"), "llama", seed=0, **tiny), STUDENT_CHARS)
    good = make_tiny_model(str(root / "good"), "qwen2", seed=1, tokenizer_kwargs={"extra_chars": "§¶"}, **tiny)
    _reverse_character_ids(good)
    good = _sft(good, "x")
    s_tok, g_tok = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(good)
    assert s_tok("x")["input_ids"] != g_tok("x")["input_ids"] and len(s_tok) != len(g_tok)
    weak = make_tiny_model(str(root / "weak"), "llama", seed=2, tokenizer_kwargs={"extra_chars": "ÄÖÜ"}, **tiny)
    return {"student": student, "good": good, "weak": weak}


def _prompts(n: int) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(n)])


def _config(tmp_path, pool, **kw) -> FusedDistillationConfig:
    base = dict(output_dir=str(tmp_path / "out"), teacher_models=[pool["good"], pool["weak"]],
                teacher_names=["good", "weak"], use_cpu=True, bf16=False, report_to="none",
                per_device_train_batch_size=8, num_generations=4, max_steps=2, logging_steps=1, save_strategy="no",
                learning_rate=1e-3, lr_scheduler_type="constant", max_completion_length=3, disable_tqdm=True, seed=0)
    return FusedDistillationConfig(**{**base, **kw})


def _trainer(tmp_path, pool, n_prompts: int = 8, **kw) -> FusedDistillationTrainer:
    return FusedDistillationTrainer(pool["student"], args=_config(tmp_path, pool, **kw),
                                    train_dataset=_prompts(n_prompts),
                                    processing_class=AutoTokenizer.from_pretrained(pool["student"]))


# ---------------------------------------------------------------- hand computation on a fixed batch
def _plain_sum_logps(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """Σ log p(ids[t] | ids[:t]) over t >= n_prompt from one full-logits forward of the unpadded sequence (nats)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logps = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return logps[n_prompt - 1 :].sum()


def _hand_teacher_value(tok, model, prompt, text: str) -> torch.Tensor:
    """Per-token mean log-prob of the assistant turn under a char-level teacher, split by string rendering."""
    p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": text}], tokenize=False)
    assert full.startswith(p) and full[len(p) :] == text + "|"
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        return _plain_sum_logps(model, ids, n_prompt) / (len(ids) - n_prompt)


def _hand_fused(v_r: torch.Tensor, teachers: torch.Tensor, clip: bool) -> torch.Tensor:
    """max_margin with the initial student appended (docs/methods.md §Fusion), written out per sample."""
    if clip:  # c_k = max(v_k, v_r): max-margin then picks the largest candidate
        return torch.maximum(v_r, teachers.max(dim=1).values)
    cand = torch.cat([teachers, v_r[:, None]], dim=1).double()
    distance = (cand.exp() - v_r.double()[:, None].exp()).abs()  # |exp(c_k) - exp(v_r)|, no ties in this batch
    return cand.gather(1, distance.argmax(dim=1, keepdim=True)).squeeze(1).float()


@pytest.mark.parametrize("clip", [False, True])
def test_advantages_loss_and_gradient_match_hand_computation(pool, tmp_path, clip):
    """Fixed completions, 2 prompts x G=4, student perturbed away from its initial weights (so v̂_π != v_r):
    v = mean log-prob per completion token (LN), f = max-margin over (v_good, v_weak, v_r) (with clip: max(v_r,
    v_good, v_weak)), g = f - v̂, A_i = g_i - mean of g over the prompt's other 3 samples (leave-one-out), all from
    plain full-logits forwards and fusion written out here. The trainer's loss and gradient must equal those of the
    unbiased estimator of ∇ E_y~π[v_π(y) - f(y)] written out on an independent copy of the student:
    -mean_i (A_i - 1/n_i) Σ_t log p(y_i,t), the sum over the completion's n_i tokens (docs/methods.md §OPD)."""
    trainer = _trainer(tmp_path, pool, clip=clip)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = trainer.processing_class
    texts = ["x", "ab", "xx", "g", "c", "x", "dx", "b"]
    prompts = [[{"role": "user", "content": "q1"}]] * 4 + [[{"role": "user", "content": "q22"}]] * 4
    fixed = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    trainer._generate_single_turn = lambda *args, **kwargs: [list(c) for c in fixed]
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts])

    initial = AutoModelForCausalLM.from_pretrained(pool["student"])
    hand_policy = copy.deepcopy(trainer.model)
    v_hat, v_r, sum_logps, n_tokens = [], [], [], []
    for prompt, completion in zip(prompts, fixed, strict=True):
        p_ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        p_ids = list(p_ids["input_ids"])
        n = len(completion)
        with torch.no_grad():
            v_hat.append(_plain_sum_logps(trainer.model, p_ids + completion, len(p_ids)) / n)
            v_r.append(_plain_sum_logps(initial, p_ids + completion, len(p_ids)) / n)
        sum_logps.append(_plain_sum_logps(hand_policy, p_ids + completion, len(p_ids)))
        n_tokens.append(n)
    v_hat, v_r = torch.stack(v_hat), torch.stack(v_r)
    loaded = [(AutoTokenizer.from_pretrained(pool[k]), AutoModelForCausalLM.from_pretrained(pool[k]))
              for k in ("good", "weak")]
    teachers = torch.tensor([[_hand_teacher_value(t_tok, t_model, p, t) for t_tok, t_model in loaded]
                             for p, t in zip(prompts, texts, strict=True)])
    fused = _hand_fused(v_r, teachers, clip)
    gap = (fused - v_hat).view(2, 4)
    advantages = (gap - (gap.sum(dim=1, keepdim=True) - gap) / 3).reshape(-1)  # minus the mean of the other three
    assert advantages.abs().max() > 0.05  # a non-trivial batch: the good teacher lifts the "x" answers
    torch.testing.assert_close(batch["advantages"], advantages, atol=2e-5, rtol=1e-4)

    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    inverse_length = 1.0 / torch.tensor(n_tokens, dtype=torch.float32)
    hand_loss = -((advantages - inverse_length) * torch.stack(sum_logps)).mean()
    hand_loss.backward()
    torch.testing.assert_close(loss.detach(), hand_loss.detach(), atol=2e-6, rtol=1e-4)
    assert max(q.grad.abs().max().item() for q in hand_policy.parameters()) > 1e-3  # not vacuous
    for (name, p), q in zip(trainer.model.named_parameters(), hand_policy.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-3, msg=name)


# ---------------------------------------------------------------- learning
def _learn(tmp_path, pool, seed: int, **kw) -> tuple[FusedDistillationTrainer, dict[str, tuple[float, float]]]:
    """100 steps of 4 prompts x G=4; the opd/* metrics averaged over the first 10 and the last 30 steps."""
    trainer = _trainer(tmp_path, pool, n_prompts=32, per_device_train_batch_size=16, max_steps=100, seed=seed, **kw)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "opd/fused_teacher_score" in h]
    assert len(logs) == 100
    first, last = logs[:10], logs[-30:]
    summary = {k: (statistics.mean(h[k] for h in first), statistics.mean(h[k] for h in last))
               for k in logs[-1] if k.startswith("opd/")}
    print(f"seed {seed} {kw}: (first 10 steps, last 30 steps) "
          f"{ {k: (round(a, 3), round(b, 3)) for k, (a, b) in summary.items()} }")
    return trainer, summary


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_fused_teacher_score_rises_toward_the_good_teacher(pool, tmp_path, seed):
    """Student: one of 8 characters uniformly; teacher "good" always answers "x". Defaults otherwise (LN, max_margin
    over good and the initial student, no clipping): on "x" the good teacher is far more confident than the student
    and is selected (f ≈ 0); elsewhere it is the farthest candidate, far below (f ≈ -7 nats/token). So the student
    should move its mass to "x" and f rise by several nats/token (seed 0: -7.0 -> -0.74, P(x) 0.95; seeds 1, 2
    alike). The random "weak" teacher is left out: with it the objective has another basin (next test)."""
    trainer, summary = _learn(tmp_path, pool, seed, teacher_models=[pool["good"]], teacher_names=["good"])
    assert summary["opd/fused_teacher_score"][1] > summary["opd/fused_teacher_score"][0] + 2.0, summary
    assert summary["opd/teacher_score/good"][1] > summary["opd/teacher_score/good"][0] + 2.0, summary
    assert _prob_of_x(trainer.model, trainer.processing_class) > 0.5 > 0.25 > _prob_of_x(
        AutoModelForCausalLM.from_pretrained(pool["student"]), trainer.processing_class)


def test_objective_decreases_with_a_random_teacher_in_the_pool(pool, tmp_path):
    """Good and weak (random) teachers, defaults: the run descends its objective E_y~π[v_π(y) - f(y)]
    (opd/student_teacher_gap, nats/token; seed 0: 5.9 -> 0.15), but not toward "x": the student spreads over
    3-token completions cut at max_completion_length, outside the initial student's support (v_r ≈ -9.7), where
    max-margin selects the random teacher, the candidate most above v_r (share -> 0.99), and the student matches it
    (f ≈ v_π ≈ -4.6). That basin has the same objective value as answering "x" (the earlier, biased estimator ended
    there at gap 0.14 too): wherever a teacher is far above v_r, f is the most confident teacher's score, so matching
    any one teacher there, the random one included, minimises the objective (a property of the method)."""
    _, summary = _learn(tmp_path, pool, 0)
    assert summary["opd/student_teacher_gap"][0] > 3.0 > 0.5 > summary["opd/student_teacher_gap"][1], summary


def _prob_of_x(model, tok) -> float:
    """The model's probability of answering "x" first to an unseen prompt (uniform student: 1/8)."""
    ids = tok.apply_chat_template([{"role": "user", "content": "q77"}], add_generation_prompt=True, return_dict=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids["input_ids"])])).logits[0, -1]
    return logits.softmax(-1)[tok.convert_tokens_to_ids("x")].item()


# ---------------------------------------------------------------- shared math, metrics
def test_fusion_functions_are_shared_with_infifpo(pool, tmp_path, monkeypatch):
    calls = {"fuse_reference": [], "opd_sequence_advantages": [], "opd_sequence_loss": []}
    for name in calls:
        original = getattr(fusion, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name].append(args)
            return _original(*args, **kwargs)

        monkeypatch.setattr(fusion, name, spy)
    trainer = _trainer(tmp_path, pool, max_steps=1)
    trainer.train()
    assert infifpo_trainer.fusion is fusion  # InfiFPO's trainer calls the very same module
    assert len(calls["fuse_reference"]) == 1 and calls["fuse_reference"][0][2].shape == (8, 2)  # [N, K teachers]
    assert len(calls["opd_sequence_advantages"]) == 1 and len(calls["opd_sequence_loss"]) == 1


def test_metrics_are_logged_and_consistent(pool, tmp_path):
    trainer = _trainer(tmp_path, pool, max_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert all(k in h for k in OPD_KEYS), sorted(set(OPD_KEYS) - set(h))
        shares = h["opd/teacher_share/good"] + h["opd/teacher_share/weak"] + h["opd/teacher_share/pivot"]
        assert shares == pytest.approx(1.0)
        assert h["opd/student_teacher_gap"] == pytest.approx(h["opd/policy_score"] - h["opd/fused_teacher_score"],
                                                             abs=1e-5)
        assert h["opd/completion_length"] == pytest.approx(h["completions/mean_length"])
        assert h["opd/clip_rate"] == 0.0 and h["opd/advantage_std"] > 0  # clip is off by default in OPD
        assert h["opd/teacher_score/weak"] < h["opd/student_init_score"] - 1.0  # a random teacher, far below


def test_clipping_against_the_initial_student(pool, tmp_path, caplog):
    """clip=True floors f at v_r; with only the weak teacher (always below v_r) f = v_r = v̂_π at the first step, so
    every advantage is 0 and the trainer says so ("Is my run healthy?"), with the clip rate of the side it uses (1.00:
    every teacher value raised to v_r; the fusion's own clip_rate also counts the unused mirrored side, 0.50). Without
    LN the step is a no-op; with LN the 1/n length term of ∇ E[v_π] still moves the student, and the warning says
    so."""
    trainer = _trainer(tmp_path, pool, clip=True, max_steps=2)
    trainer.train()
    for h in (h for h in trainer.state.log_history if "loss" in h):
        assert h["opd/fused_teacher_score"] >= h["opd/student_init_score"] - 1e-6 and h["opd/clip_rate"] > 0
    for length_normalize in (False, True):
        caplog.clear()
        trainer = _trainer(tmp_path, pool, clip=True, max_steps=1, teacher_models=[pool["weak"]],
                           teacher_names=["weak"], length_normalize=length_normalize)
        with caplog.at_level("WARNING", logger="infifpo.trainers.opd"):
            trainer.train()
        (h,) = [h for h in trainer.state.log_history if "loss" in h]
        assert h["opd/clip_rate"] == 1.0
        assert "every advantage is 0" in caplog.text and "clip rate 1.00" in caplog.text, caplog.text
        if length_normalize:
            assert h["grad_norm"] > 0 and "1/n length term" in caplog.text
        else:
            assert h["loss"] == 0.0 and h["grad_norm"] == 0.0 and "length term" not in caplog.text


def test_lora_reference_is_the_adapter_disabled_student(pool, tmp_path):
    from peft import LoraConfig

    trainer = FusedDistillationTrainer(pool["student"], args=_config(tmp_path, pool, max_steps=3, learning_rate=5e-2),
                                       train_dataset=_prompts(8),
                                       processing_class=AutoTokenizer.from_pretrained(pool["student"]),
                                       peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["opd/policy_score"] == pytest.approx(logs[0]["opd/student_init_score"], abs=1e-6)  # B = 0 at init
    assert logs[-1]["opd/policy_score"] != pytest.approx(logs[-1]["opd/student_init_score"], abs=1e-4)


# ---------------------------------------------------------------- token-level term and errors
def test_token_level_term_needs_a_shared_vocabulary(pool, tmp_path, tiny_llama, tiny_qwen):
    with pytest.raises(ConfigError, match="teacher 'good' has"):
        _trainer(tmp_path, pool, token_level_weight=0.5, token_level_teachers=["good"])
    # docs/bad-inputs.md T6: the same tokenizer but a padded head (vocab_size 128 != len(tokenizer)) is not the same
    # vocabulary
    args = _config(tmp_path, pool, teacher_models=[tiny_qwen], teacher_names=["padded"], token_level_weight=0.5)
    with pytest.raises(ConfigError, match="teacher 'padded' has .* head size 128"):
        FusedDistillationTrainer(tiny_llama, args=args, train_dataset=_prompts(8))


def test_token_level_term_with_a_same_vocabulary_teacher(pool, tmp_path):
    """A teacher on the student's own tokenizer: the loss adds weight x reverse KL(student || teacher) per token."""
    same_vocab = make_tiny_model(str(tmp_path / "same"), "llama", seed=3, hidden=32, layers=1)
    trainer = _trainer(tmp_path, pool, teacher_models=[pool["good"], same_vocab], teacher_names=["good", "same"],
                       token_level_weight=0.5, token_level_teachers=["same"], max_steps=1)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in _prompts(2)["prompt"] for _ in range(4)])
    loss = trainer.compute_loss(trainer.model, batch)
    teacher = AutoModelForCausalLM.from_pretrained(same_vocab)
    divergences = []
    with torch.no_grad():
        for row in range(8):
            p = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
            c = batch["completion_ids"][row][batch["completion_mask"][row].bool()]
            ids = torch.cat([p, c])[None]
            s, t = (m(input_ids=ids).logits[0, len(p) - 1 : -1] for m in (trainer.model, teacher))
            divergences.append((s.log_softmax(-1).exp() * (s.log_softmax(-1) - t.log_softmax(-1))).sum(-1))
        sums = torch.stack([_plain_sum_logps(trainer.model, torch.cat([
            batch["prompt_ids"][r][batch["prompt_mask"][r].bool()], batch["completion_ids"][r][batch[
                "completion_mask"][r].bool()]]).tolist(), int(batch["prompt_mask"][r].sum())) for r in range(8)])
    expected = (-((batch["advantages"] - 1.0 / batch["completion_mask"].sum(1)) * sums).mean()
                + 0.5 * torch.cat(divergences).mean())
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-4)


def test_bad_configurations_raise_named_errors(pool, tmp_path):
    with pytest.raises(ConfigError, match="G >= 2"):
        _config(tmp_path, pool, num_generations=1)
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        _config(tmp_path, pool, per_device_train_batch_size=6)
    with pytest.raises(ConfigError, match="max_margin_pair"):
        _config(tmp_path, pool, fusion_method="max_margin_pair")
    with pytest.raises(ConfigError, match="'uncertainty' needs each teacher's mean next-token entropy"):
        _config(tmp_path, pool, fusion_method="uncertainty")
    with pytest.raises(ConfigError, match="no teachers"):
        _trainer(tmp_path, pool, teacher_models=[])
    with pytest.raises(DataFormatError, match="row 1.*'prompt'"):
        FusedDistillationTrainer(pool["student"], args=_config(tmp_path, pool),
                                 train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "q"}]},
                                                                  {"prompt": []}]))


def test_sampling_must_be_the_students_own_distribution(pool, tmp_path):
    """The score-function gradient differentiates log π at temperature 1, so samples must come from exactly that π."""
    args = _config(tmp_path, pool)
    assert (args.temperature, args.top_p, args.top_k, args.min_p, args.repetition_penalty) == (1.0, 1.0, 0, None, 1.0)
    assert args.advantage_baseline == "leave_one_out"
    for kw, fix in [({"temperature": 0.8}, "set temperature: 1.0"), ({"top_p": 0.95}, "set top_p: 1.0"),
                    ({"top_k": 50}, "set top_k: 0"), ({"min_p": 0.05}, "set min_p: None"),
                    ({"repetition_penalty": 1.1}, "set repetition_penalty: 1.0"),
                    ({"generation_kwargs": {"temperature": 0.7}}, "temperature=0.7; set temperature: 1.0")]:
        with pytest.raises(ConfigError, match=fix):
            _config(tmp_path, pool, **kw)
    with pytest.raises(ConfigError, match="advantage_baseline='mean'"):
        _config(tmp_path, pool, advantage_baseline="mean")


def test_include_pivot_defaults_to_the_fusion_methods_and_names_the_metrics(pool, tmp_path):
    assert _config(tmp_path, pool).include_pivot is True  # max_margin
    assert _config(tmp_path, pool, fusion_method="mean", include_pivot=True).include_pivot is True
    trainer = _trainer(tmp_path, pool, fusion_method="mean")
    assert trainer.args.include_pivot is False
    trainer.model.train()
    trainer._generate_and_score_completions([{"prompt": p} for p in _prompts(2)["prompt"] for _ in range(4)])
    shares = {k: v for k, v in trainer._metrics["train"].items() if k.startswith("opd/teacher_share/")}
    assert sorted(shares) == ["opd/teacher_share/good", "opd/teacher_share/weak"]
    assert shares["opd/teacher_share/good"][0] == pytest.approx(0.5)


def test_teacher_records_are_accepted(pool, tmp_path):
    """The Python API takes already-loaded Teacher records (own tokenizer each) instead of references."""
    records = [Teacher(k, AutoModelForCausalLM.from_pretrained(pool[k]), AutoTokenizer.from_pretrained(pool[k]))
               for k in ("good", "weak")]
    trainer = FusedDistillationTrainer(pool["student"], teachers=records, args=_config(tmp_path, pool, max_steps=1),
                                       train_dataset=_prompts(8))
    assert [t.name for t in trainer.teachers] == ["good", "weak"]
    assert all(not p.requires_grad for t in trainer.teachers for p in t.model.parameters())


# ---------------------------------------------------------------- `infifpo train --method opd`
def test_train_cli_opd_from_yaml(pool, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(f'{{"id": "p{i}", "prompt": [{{"role": "user", "content": "q{i}"}}], "domain": "math"}}\n'
                            for i in range(8)))
    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "infifpo/trainers/configs/opd.yaml").read_text())
    cfg = {**shipped, "model_name_or_path": pool["student"], "dataset_name": str(rows),
           "output_dir": str(tmp_path / "run"), "teacher_models": [pool["good"], pool["weak"]],
           "teacher_model_init_kwargs": {"dtype": "float32"}, "max_completion_length": 3, "max_steps": 2,
           "learning_rate": 1e-3, "bf16": False, "save_strategy": "no", "disable_tqdm": True}
    path = tmp_path / "opd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    method, script, args, model_args = entry.parse(["--method", "opd", "--config", str(path)])
    assert isinstance(args, FusedDistillationConfig) and args.fusion_method == "max_margin" and not args.clip
    trainer = entry.build_trainer(method, script, args, model_args)
    assert [t.name for t in trainer.teachers] == ["good", "weak"]
    trainer.train()
    assert sum("opd/fused_teacher_score" in h for h in trainer.state.log_history) == 2
