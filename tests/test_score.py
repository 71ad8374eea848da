"""The score stage: TRL-exact pivot scores, per-model token counts, resume/caching, the scored-pairs columns,
bad-input errors (docs/bad-inputs.md C7, D7-D9, T2, C10-C11) and its options (flags and ``--config`` YAML)."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest

from infifpo import store
from infifpo.backends.hf_engine import HFEngine
from infifpo.config import parse_config
from infifpo.logprobs import response_spans
from infifpo.schema import (
    PAIR_COLUMNS,
    ChatTemplateError,
    ConfigError,
    DataFormatError,
    ModelLoadError,
    ScoredPairsError,
    entropy_columns,
    fuse_columns,
    ref_columns,
)
from infifpo.score import stage as score_mod
from infifpo.score.stage import ScoreOptions, main, score_pairs, score_responses
from tests.conftest import make_tiny_model
from tests.test_hf_engine import naive_entropies, naive_logps
from tests.test_sample import assert_help_lists_every_option, write_yaml

ENGINE = {"dtype": "float32", "token_budget": 96}


def make_rows(n: int = 6, wrpo: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        row = {
            "id": f"r{i}", "prompt": [{"role": "user", "content": f"What is {i} + {i}?" + " Think." * (i % 3)}],
            "chosen": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"It is {2 * i + 1}" + "!" * i}],
            "split": "po", "domain": "math", "chosen_model": "a", "rejected_model": "b", "chosen_reward": 1.0,
            "rejected_reward": 0.0,
        }
        if wrpo:
            row["source_chosen"] = [{"role": "assistant", "content": f"The answer is {2 * i}"}]
        rows.append(row)
    return rows


class CountingEngine:
    """Wraps a real HFEngine: counts loads/score calls per model and can fail after N score calls (a killed run)."""

    loads: dict[str, int] = {}
    calls: dict[str, int] = {}
    fail_after: int | None = None

    def __init__(self, backend, path, **kw):
        self.inner, self.path = HFEngine(path, **kw), path
        CountingEngine.loads[path] = CountingEngine.loads.get(path, 0) + 1

    def score_with_entropy(self, prompts, completions):
        n = CountingEngine.calls[self.path] = CountingEngine.calls.get(self.path, 0) + 1
        if CountingEngine.fail_after is not None and n > CountingEngine.fail_after:
            raise KeyboardInterrupt("killed")
        return self.inner.score_with_entropy(prompts, completions)

    def close(self):
        self.inner.close()


@pytest.fixture
def counting(monkeypatch):
    CountingEngine.loads, CountingEngine.calls, CountingEngine.fail_after = {}, {}, None
    monkeypatch.setattr(score_mod, "load_engine", CountingEngine)
    return CountingEngine


def test_score_responses_sum_mean_count(tiny_llama):
    """C7: sum = the naive forward's summed log-prob of the template's completion tokens; mean = sum / num_tokens."""
    from transformers import AutoTokenizer

    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "2+2?"}]]
    out = score_responses(tiny_llama, prompts, ["hello there", "4"], **ENGINE)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for prompt, response, o in zip(prompts, ["hello there", "4"], out, strict=True):
        p, (c,) = response_spans(tok, prompt, [response])
        assert tok.decode(c) == response + "|"  # the template's end-of-turn token is scored
        assert o["num_tokens"] == len(c) == len(response) + 1
        assert o["sum"] == pytest.approx(sum(naive_logps(tiny_llama, p, c)), abs=1e-4)
        assert o["mean"] == o["sum"] / o["num_tokens"]
    nested = score_responses(tiny_llama, prompts[:1], [["hello there", "bye"]], **ENGINE)
    assert nested[0][0]["sum"] == pytest.approx(out[0]["sum"], abs=1e-5) and nested[0][1]["num_tokens"] == 4


def test_pivot_scores_equal_trl_dpo_trainer_reference_logps(tiny_llama, tmp_path):
    """THE PIVOT PROOF: our frozen-pivot sums equal DPOTrainer's own precomputed ref_chosen/rejected_logps."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = make_rows(6)
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), precompute_ref_log_probs=True, use_cpu=True, bf16=False,
                     report_to="none", per_device_train_batch_size=2, precompute_ref_batch_size=3)
    trainer = DPOTrainer(model=tiny_llama, args=args, train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(tiny_llama))
    trl_chosen = trainer.train_dataset["ref_chosen_logps"]
    trl_rejected = trainer.train_dataset["ref_rejected_logps"]
    path = score_pairs(rows, pivot=tiny_llama, sources=[tiny_llama], out_root=tmp_path / "runs", **ENGINE)
    ours = {r["id"]: r for r in store.read_output(path)}
    for i, row in enumerate(rows):
        assert ours[row["id"]]["ref_chosen_logps"] == pytest.approx(trl_chosen[i], abs=1e-4)
        assert ours[row["id"]]["ref_rejected_logps"] == pytest.approx(trl_rejected[i], abs=1e-4)
    assert len({round(x, 3) for x in trl_chosen}) == 6  # distinct values: the comparison is not vacuous


def test_scored_pairs_columns_and_values(tiny_llama, tiny_qwen, tiny_llama_b, tmp_path):
    """Exactly the schema's scored-pairs columns; fuse lists follow source order; means are sum / count; every
    source value equals scoring that model alone."""
    rows = make_rows(4, wrpo=True)
    path = score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen, tiny_llama_b], out_root=tmp_path, **ENGINE)
    scored = store.read_output(path)
    expected = set(PAIR_COLUMNS) | {"source_chosen", "pivot_model", "source_models"}
    for col in ("chosen", "rejected", "source_chosen"):
        expected |= set(ref_columns(col)) | set(fuse_columns(col)) | set(entropy_columns(col))
    assert [r["id"] for r in scored] == [r["id"] for r in rows]
    responses = [[row[c][0]["content"] for c in ("chosen", "rejected", "source_chosen")] for row in rows]
    alone = [score_responses(m, [r["prompt"] for r in rows], responses, **ENGINE) for m in (tiny_qwen, tiny_llama_b)]
    for i, out in enumerate(scored):
        assert set(out) == expected
        assert out["pivot_model"] == tiny_llama and out["source_models"] == [tiny_qwen, tiny_llama_b]
        for k in (0, 1):
            assert out["fuse_rejected_logps"][k] == pytest.approx(alone[k][i][1]["sum"], abs=1e-5)
            assert out["fuse_source_chosen_num_tokens"][k] == alone[k][i][2]["num_tokens"]
        assert out["ref_mean_chosen_logps"] == out["ref_chosen_logps"] / out["ref_chosen_num_tokens"]
        assert out["fuse_mean_chosen_logps"][1] == out["fuse_chosen_logps"][1] / out["fuse_chosen_num_tokens"][1]
        assert len(out["fuse_chosen_logps"]) == 2 and out["fuse_chosen_logps"][0] != out["fuse_chosen_logps"][1]


def test_mean_entropy_columns_equal_the_full_softmax_entropy(tiny_llama, tiny_qwen, tmp_path):
    """ref_mean_R_entropy / fuse_mean_R_entropy: the mean over R's tokens (each model's own tokenizer and template,
    the tokens of its log-prob) of the full-vocabulary next-token entropy from a plain forward, nats/token."""
    from transformers import AutoTokenizer

    rows = make_rows(3)
    scored = store.read_output(score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen], out_root=tmp_path, **ENGINE))
    for model, pick in ((tiny_llama, lambda out, col: out[col[0]]), (tiny_qwen, lambda out, col: out[col[1]][0])):
        tok = AutoTokenizer.from_pretrained(model)
        for row, out in zip(rows, scored, strict=True):
            texts = [row[c][0]["content"] for c in ("chosen", "rejected")]
            prompt_ids, spans = response_spans(tok, row["prompt"], texts)
            for column, span in zip(("chosen", "rejected"), spans, strict=True):
                want = naive_entropies(model, prompt_ids, span)
                assert pick(out, entropy_columns(column)) == pytest.approx(sum(want) / len(want), abs=1e-5)


def test_an_engine_without_entropies_writes_no_entropy_columns(tiny_llama, tiny_qwen, tmp_path, monkeypatch):
    """An engine that cannot give entropies (the vLLM one returns None) leaves the entropy columns out of the
    per-model rows and the scored pairs; the rest is unchanged. The per-model key carries the score version, so
    outputs written before the entropy columns existed are not reused."""

    class NoEntropyEngine(CountingEngine):
        def score_with_entropy(self, prompts, completions):
            return self.inner.score(prompts, completions), None

    rows = make_rows(2)
    with_entropy = store.read_output(score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen],
                                                 out_root=tmp_path / "a", **ENGINE))
    monkeypatch.setattr(score_mod, "load_engine", NoEntropyEngine)
    path = score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen], out_root=tmp_path / "b", **ENGINE)
    for a, b in zip(with_entropy, store.read_output(path), strict=True):
        assert set(a) - set(b) == {c for r in ("chosen", "rejected") for c in entropy_columns(r)}
        assert {k: a[k] for k in b} == b
    per_model = json.loads(next((tmp_path / "b").glob("score-*/meta.json")).read_text())
    assert per_model["key"]["version"] == score_mod.SCORE_VERSION == 2
    assert not any(k.endswith("_entropy") for f in (tmp_path / "b").glob("score-*/part-*.jsonl")
                   for r in store.read_jsonl(f) for k in r)


def test_resume_after_kill_no_lost_or_duplicated_rows(tiny_llama, tiny_qwen, tmp_path, counting):
    """A run killed after its first written batch resumes: only the rest is scored, every id exactly once, values
    equal an uninterrupted run's."""
    rows = make_rows(6)
    counting.fail_after = 1
    with pytest.raises(KeyboardInterrupt):
        score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen], out_root=tmp_path / "a", write_every=2, **ENGINE)
    (pivot_dir,) = (tmp_path / "a").glob("score-*")
    assert sum(1 for line in next(pivot_dir.glob("part-*")).read_text().splitlines() if line) == 2
    counting.fail_after, counting.calls = None, {}
    path = score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen], out_root=tmp_path / "a", write_every=2, **ENGINE)
    assert counting.calls == {tiny_llama: 2, tiny_qwen: 3}  # 4 remaining pivot rows in 2 batches; all 6 for qwen
    resumed = store.read_output(path)
    assert [r["id"] for r in resumed] == [r["id"] for r in rows]
    clean = store.read_output(score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen], out_root=tmp_path / "b",
                                          **ENGINE))
    for a, b in zip(resumed, clean, strict=True):
        assert a["ref_chosen_logps"] == pytest.approx(b["ref_chosen_logps"], abs=1e-5)
        assert a["fuse_rejected_logps"] == pytest.approx(b["fuse_rejected_logps"], abs=1e-5)


def test_changing_one_source_rescores_only_it(tiny_llama, tiny_qwen, tiny_llama_b, tmp_path, counting):
    """C11: per-model outputs are keyed by model content, so swapping a source loads only the new one; re-running
    an unchanged job loads nothing."""
    rows = make_rows(3)
    score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen, tiny_llama_b], out_root=tmp_path, **ENGINE)
    counting.loads = {}
    first = score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen, tiny_llama_b], out_root=tmp_path, **ENGINE)
    assert counting.loads == {}
    other = make_tiny_model(str(tmp_path / "src_c"), "llama", seed=7)
    second = score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen, other], out_root=tmp_path, **ENGINE)
    assert counting.loads == {other: 1}
    assert second != first
    a, b = store.read_output(first), store.read_output(second)
    assert [r["ref_chosen_logps"] for r in a] == [r["ref_chosen_logps"] for r in b]
    assert [r["fuse_chosen_logps"][1] for r in a] != [r["fuse_chosen_logps"][1] for r in b]


def test_shards_merge_to_the_unsharded_result(tiny_llama, tiny_qwen, tmp_path):
    """D13: shards 0/2 and 1/2 write into the same per-model outputs; the second assembles the same rows."""
    rows = make_rows(6)
    kw = {"pivot": tiny_llama, "sources": [tiny_qwen], "out_root": tmp_path / "s", **ENGINE}
    assert score_pairs(rows, shard=(1, 2), **kw) is None
    sharded = store.read_output(score_pairs(rows, shard=(0, 2), **kw))
    whole = store.read_output(score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen], out_root=tmp_path / "w",
                                          **ENGINE))
    assert json.dumps(sharded) == json.dumps(whole)


def test_empty_response_error_names_row_and_field_or_is_dropped(tiny_llama, tmp_path, caplog):
    rows = make_rows(3)
    rows[1]["rejected"][0]["content"] = "  \n "
    with pytest.raises(DataFormatError, match=r"id='r1'.*'rejected'.*empty.*--on_empty drop"):
        score_pairs(rows, pivot=tiny_llama, sources=[], out_root=tmp_path, **ENGINE)
    with caplog.at_level(logging.WARNING):
        path = score_pairs(rows, pivot=tiny_llama, sources=[], out_root=tmp_path, on_empty="drop", **ENGINE)
    assert [r["id"] for r in store.read_output(path)] == ["r0", "r2"]
    assert "dropped 1 row(s) with an empty response" in caplog.text


def test_too_long_error_names_row_and_model_or_is_dropped(tiny_llama, tmp_path):
    rows = make_rows(3)
    rows[2]["chosen"][0]["content"] = "x" * 60
    pattern = rf"id='r2'\), model '{re.escape(tiny_llama)}'.*over the model's limit of 40"
    with pytest.raises(DataFormatError, match=pattern):
        score_pairs(rows, pivot=tiny_llama, sources=[], out_root=tmp_path, max_length=40, **ENGINE)
    path = score_pairs(rows, pivot=tiny_llama, sources=[], out_root=tmp_path, max_length=40, on_too_long="drop",
                       **ENGINE)
    assert [r["id"] for r in store.read_output(path)] == ["r0", "r1"]


def test_chat_template_rejection_names_row_and_model(tmp_path):
    strict = make_tiny_model(str(tmp_path / "strict"), "llama", seed=0)
    tok_cfg = tmp_path / "strict" / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                            "role') }}{% endif %}<{{ m['role'][0] }}>{{ m['content'] }}|{% endfor %}"
                            "{% if add_generation_prompt %}<a>{% endif %}")
    tok_cfg.write_text(json.dumps(cfg))
    (tmp_path / "strict" / "chat_template.jinja").unlink(missing_ok=True)
    rows = make_rows(2)
    rows[1]["prompt"] = [{"role": "system", "content": "be brief"}, *rows[1]["prompt"]]
    with pytest.raises(ChatTemplateError, match=r"id='r1'\), model '.*strict'.*no system role"):
        score_pairs(rows, pivot=strict, sources=[], out_root=tmp_path / "runs", **ENGINE)


def test_model_load_failures_name_the_model(tiny_llama, tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-model-xyz"):
        score_pairs(make_rows(1), pivot=tiny_llama, sources=["no-such-model-xyz"], out_root=tmp_path, **ENGINE)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": "many"}')
    with pytest.raises(ModelLoadError, match="broken"):
        score_pairs(make_rows(1), pivot=str(broken), sources=[], out_root=tmp_path, **ENGINE)


def test_non_finite_scores_name_row_and_model(tiny_llama, tmp_path, monkeypatch):
    class NaNEngine(CountingEngine):
        def score_with_entropy(self, prompts, completions):
            out, entropies = self.inner.score_with_entropy(prompts, completions)
            out[1][0] = math.nan
            return out, entropies

    monkeypatch.setattr(score_mod, "load_engine", NaNEngine)
    pattern = rf"id='r0'\), field 'rejected', model '{re.escape(tiny_llama)}'.*not finite"
    with pytest.raises(ScoredPairsError, match=pattern):
        score_pairs(make_rows(1), pivot=tiny_llama, sources=[], out_root=tmp_path, **ENGINE)


def test_malformed_response_names_row(tiny_llama, tmp_path):
    rows = make_rows(2)
    rows[0]["chosen"] = [{"role": "user", "content": "not an answer"}]
    with pytest.raises(DataFormatError, match=r"id='r0'.*'chosen'.*assistant"):
        score_pairs(rows, pivot=tiny_llama, sources=[], out_root=tmp_path, **ENGINE)


def test_cli_scores_a_pairs_file(tiny_llama, tiny_qwen, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_rows(2)))
    rc = main(["--pairs", str(pairs), "--pivot", tiny_llama, "--sources", tiny_qwen, "--out", str(tmp_path / "o"),
               "--dtype", "float32", "--token-budget", "64"])
    assert rc == 0
    out_dir = capsys.readouterr().out.strip().splitlines()[-1]
    rows = store.read_output(out_dir)
    assert [r["source_models"] for r in rows] == [[tiny_qwen]] * 2
    assert all(r["ref_chosen_logps"] < 0 and r["fuse_chosen_num_tokens"][0] > 0 for r in rows)
    # The same options as a --config YAML (a flag overriding one of its keys): the same output, found finished.
    cfg = write_yaml(tmp_path / "score.yaml", json.dumps({"pairs": str(pairs), "pivot": tiny_llama,
                                                          "sources": [tiny_qwen], "dtype": "bfloat16",
                                                          "token_budget": 64}))
    assert main(["--config", cfg, "--out", str(tmp_path / "o"), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == out_dir


def options(argv: list[str]) -> ScoreOptions:
    return parse_config(ScoreOptions, argv, prog="infifpo score")


def test_help_lists_every_option(capsys):
    assert_help_lists_every_option(main, ScoreOptions, capsys)


def test_config_yaml_misspelt_key_and_flag_override(tmp_path):
    cfg = write_yaml(tmp_path / "s.yaml", "pairs: p\npivot: m\nsources: [a, b]\nwrite_every: 4\n")
    assert options(["--config", cfg]).write_every == 4
    assert options(["--config", cfg, "--write_every", "8"]).write_every == 8
    bad = write_yaml(tmp_path / "bad.yaml", "pairs: p\npivot: m\nsources: [a]\non_emtpy: drop\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: 'on_emtpy' \(did you mean 'on_empty'\?\)"):
        main(["--config", bad])
    with pytest.raises(ConfigError, match=r"sources: expected a list"):
        options(["--config", write_yaml(tmp_path / "one.yaml", "pairs: p\npivot: m\nsources: a\n")])


def test_dashed_flags_as_the_pipeline_passes_them():
    opts = options(["--pairs", "p", "--pivot", "m", "--sources", "a", "b", "--out", "o", "--backend", "transformers",
                    "--dtype", "float32", "--write-every", "4", "--on-empty", "drop", "--on-too-long", "drop",
                    "--max-length", "100", "--token-budget", "64", "--compile-head", "--engine-arg", "x=1"])
    assert (opts.sources, opts.write_every, opts.on_empty, opts.on_too_long, opts.max_length) == (
        ["a", "b"], 4, "drop", "drop", 100)
    assert opts.engine_kwargs() == {"device": "cpu", "token_budget": 64, "compile_head": True, "x": 1}
    vllm = options(["--pairs", "p", "--pivot", "m", "--sources", "a", "--backend", "vllm",
                    "--tensor-parallel-size", "2"])
    assert vllm.engine_kwargs() == {"tensor_parallel_size": 2}


# ---------------------------------------------------------------- real packaged models


@pytest.mark.slow
def test_cross_tokenizer_counts_and_suffixes_real_models():
    """The same response under SmolLM2, Qwen2.5-Coder and Gemma-3: each model's own token count and chat-template
    suffix (end-of-turn token), checked against the tokenizers directly."""
    from infifpo.models.resolve import load_tokenizer, resolve_model

    prompt = [{"role": "user", "content": "Write 12*7."}]
    response = "12 * 7 = 84. Photosynthesis converts sunlight into glucose; def is_prime(n): return n > 1"
    counts = {}
    for name in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m"):
        tok = load_tokenizer(name)
        gen_prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        assert full.startswith(gen_prompt)
        suffix = full[len(gen_prompt):]
        # Gemma's plain template answers after "Answer:" with a space token; each template ends the turn its way.
        assert suffix.lstrip(" ").startswith(response)
        assert {"smollm2-135m-instruct": "<|im_end|>", "qwen2.5-coder-0.5b-instruct": "<|im_end|>",
                "gemma3-270m": "<eos>"}[name] in suffix[len(response):]
        want = tok(full, add_special_tokens=False)["input_ids"][len(tok(gen_prompt, add_special_tokens=False)
                                                                    ["input_ids"]):]
        (got,) = score_responses(name, [prompt], [response], dtype="float32")
        assert got["num_tokens"] == len(want)
        prompt_ids = tok(gen_prompt, add_special_tokens=False)["input_ids"]
        assert got["sum"] == pytest.approx(sum(naive_logps(resolve_model(name), prompt_ids, want)), abs=1e-3)
        assert tok.decode(want) == suffix
        # TRL's split keeps everything the template emits after the answer: "<|im_end|>\n" (ChatML), "<eos>" (Gemma).
        tail = {"gemma3-270m": ["<eos>"]}.get(name, ["<|im_end|>", "\u010a"])
        assert tok.convert_ids_to_tokens(want[-len(tail):]) == tail
        assert got["mean"] == got["sum"] / got["num_tokens"]
        counts[name] = got["num_tokens"]
    assert len(set(counts.values())) > 1, counts  # three tokenizers, not one count copied around


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_scores_in_subprocesses_match_transformers(tiny_llama, tiny_qwen, tmp_path):
    """backend="vllm": each model's engine runs in its own spawned process; the scored pairs agree with the
    transformers backend (fp32) to 1e-3 nats per token."""
    rows = make_rows(3)
    kw = {"pivot": tiny_llama, "sources": [tiny_qwen], "dtype": "float32"}
    hf = store.read_output(score_pairs(rows, out_root=tmp_path / "hf", **kw))
    vl = store.read_output(score_pairs(rows, out_root=tmp_path / "vllm", backend="vllm", **kw))
    for a, b in zip(hf, vl, strict=True):
        assert b["ref_chosen_num_tokens"] == a["ref_chosen_num_tokens"]
        assert abs(b["ref_chosen_logps"] - a["ref_chosen_logps"]) <= 1e-3 * a["ref_chosen_num_tokens"]
        assert (abs(b["fuse_rejected_logps"][0] - a["fuse_rejected_logps"][0])
                <= 1e-3 * a["fuse_rejected_num_tokens"][0])


# ---------------------------------------------------------------- --split and score_stats.json


def test_split_selects_the_rows_scored_and_assembled(tiny_llama, tmp_path, counting):
    """Default: po rows only when rows have a `split` column (the trainers read po rows), all rows otherwise."""
    rows = make_rows(6)
    for row in rows[::2]:
        row["split"] = "sft"
    po = [r["id"] for r in rows if r["split"] == "po"]
    kw = {"pivot": tiny_llama, "sources": [], **ENGINE}
    assert [r["id"] for r in store.read_output(score_pairs(rows, out_root=tmp_path / "d", **kw))] == po
    assert sum(CountingEngine.calls.values()) == 1 and json.loads(
        next((tmp_path / "d").glob("score-*/score_stats.json")).read_text())["models"][0]["responses"] == 2 * 3
    sft = store.read_output(score_pairs(rows, out_root=tmp_path / "s", split="sft", **kw))
    assert [r["id"] for r in sft] == [r["id"] for r in rows if r["split"] == "sft"]
    assert len(store.read_output(score_pairs(rows, out_root=tmp_path / "a", split="all", **kw))) == 6
    unsplit = [{k: v for k, v in r.items() if k != "split"} for r in rows]
    assert len(store.read_output(score_pairs(unsplit, out_root=tmp_path / "u", **kw))) == 6
    with pytest.raises(DataFormatError, match=r"id='r0'.*no 'split' column.*--split all"):
        score_pairs(unsplit, out_root=tmp_path / "u", split="po", **kw)
    with pytest.raises(DataFormatError, match=r"no row has split 'po'.*\['sft'\]"):
        score_pairs(rows[::2], out_root=tmp_path / "n", **kw)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = ["--pairs", str(pairs), "--pivot", tiny_llama, "--sources", tiny_llama, "--dtype", "float32"]
    assert main([*cli, "--out", str(tmp_path / "c"), "--split", "sft"]) == 0
    assert [r["id"] for r in store.read_output(next((tmp_path / "c").glob("scored-*")))] == [r["id"] for r in sft]


def test_score_stats_per_model_and_assembled(tiny_llama, tiny_qwen, tiny_llama_b, tmp_path):
    """docs/formats.md "Score outputs": each per-model output and the assembled output hold score_stats.json; responses
    and tokens are the counts scored (response tokens as in the scored columns, the prompt once per response); a cached
    model keeps the numbers recorded when it was scored."""
    from infifpo.models.resolve import load_tokenizer

    rows = make_rows(5)
    path = score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen], out_root=tmp_path, write_every=2, **ENGINE)
    scored = store.read_output(path)
    stats = json.loads((path / "score_stats.json").read_text())
    assert stats["rows"] == 5 and [(m["model"], m["role"]) for m in stats["models"]] == [
        (tiny_llama, "pivot"), (tiny_qwen, "source")]
    want = {"pivot": ("ref_chosen_num_tokens", "ref_rejected_num_tokens"),
            "source": ("fuse_chosen_num_tokens", "fuse_rejected_num_tokens")}
    for m in stats["models"]:
        tok = load_tokenizer(m["model"])  # the prompt of each row's joint split, forwarded once per response
        prompt_tokens = sum(len(response_spans(tok, r["prompt"], [r[c][0]["content"] for c in ("chosen", "rejected")])
                                [0]) for r in rows)
        tokens = sum(r[c] if m["role"] == "pivot" else r[c][0] for r in scored for c in want[m["role"]])
        assert m["responses"] == 10 and m["tokens"] == tokens and m["prompt_tokens"] == 2 * prompt_tokens
        assert m["seconds"] > 0 and m["load_seconds"] > 0 and m["backend"] == "transformers"
        assert m["dtype"] == "float32"
        own = json.loads((store.Path(m["output"]) / "score_stats.json").read_text())
        assert own["models"] == [{**m, "role": own["models"][0]["role"]}] and own["rows"] == 5
    again = score_pairs(rows, pivot=tiny_llama, sources=[tiny_qwen, tiny_llama_b], out_root=tmp_path, **ENGINE)
    cached = json.loads((again / "score_stats.json").read_text())["models"]
    assert cached[:2] == stats["models"], "cached models keep the numbers recorded when they were scored"
    assert cached[2]["model"] == tiny_llama_b and cached[2]["responses"] == 10
