"""Every shipped pipeline config (configs/*.yaml) goes through the whole `infifpo pipeline` code path, offline.

One test per config, parametrised over the glob, so a new config is covered without editing this file. Each test
loads the config and replaces only what cannot run offline on a 2-core CPU machine; the recipe, the judge's and the
pair stage's settings, the fusion options, the methods, the stage order and every other option stay the config's:

- models: the pivot, every source and the reward model become tiny offline models (``answering_model``, the
  reward model of tests/judge/conftest.py), one distinct directory per model;
- hub datasets become small local copies with the same columns as the real ones (``HUB_STAND_INS``), read through
  the same ``hf`` loader (``datasets.load_dataset`` on a directory in the hub's layout, configs included);
- hardware-only options: ``accelerate_config`` and ``num_processes`` dropped (one CPU process, no relaunch under
  ``accelerate launch``: the paper's ZeRO-3 needs GPUs), ``bf16`` -> false, ``use_cpu`` -> true;
- sizes capped (the constants below): prompts per source, samples per prompt, new tokens, benchmark items, and
  ``train.seeds`` to the first seed (repetitions of the same runs; every method and ablation arm still trains),
  ``train.grid.dev_items`` to the benchmark cap (every grid point still trains and is evaluated on dev);
- lm-eval tasks dropped: their datasets are on the hub;
- engines: sampling keeps the config's backend (vLLM for both shipped configs, so the pipeline's vLLM path runs),
  but scoring and eval run on the transformers backend (``CPU_ENGINES``): on 2 cores a vLLM engine costs a fresh
  process and ~20 s to start (the scorer spawns one per model, eval one per report row: 17 more for the paper's six
  models and eleven rows), which alone would take the paper config past the time limit of a test.

It then runs ``python -m infifpo.cli pipeline --config <rewritten yaml>`` and checks that every stage finished:
checkpoints for every training run (and pairwise arm's merge), an eval for every report row, the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from data_prep.prompts import parse_spec
from infifpo import pipeline
from infifpo.store import read_output
from tests.conftest import make_tiny_model
from tests.judge.conftest import make_tiny_reward_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
# reproduce.yaml trains ~20 runs (grid points, seeds' first, arms, a pairwise component), 2 merges, a selector and
# ~25 evals: its own limit, under the test's pytest-timeout, so a slow run fails with the stage logs, not a stack dump
PIPELINE_TIMEOUT_S = 1740
TEST_TIMEOUT_S = 1800

# Caps of the hardware-only shrinking (a config's smaller values are kept).
HUB_PROMPTS = 6  # prompts per hub stand-in source
VENDORED_PROMPTS = 64  # prompts per vendored source (arithmetic, gsm8k): tiny.yaml's own sizes
SAMPLES = 4  # samples per prompt and model
NEW_TOKENS = 16  # sample and eval max_tokens
BENCHMARK_ITEMS = 2  # items per benchmark
CPU_ENGINES = {"score": "transformers", "eval": "transformers"}  # module docstring
ANSWER_DIGITS = "2789"  # what the answering models reply (see answering_model)


# -- tiny offline models ---------------------------------------------------------------------------------------
def answering_model(path: Path, arch: str, seed: int, vocab_size: int | None = None) -> str:
    """A tiny random causal LM (tests/conftest.py) whose reply is one digit of ANSWER_DIGITS, then end of turn.

    Random tiny models write text the math verifier marks wrong every time, so a verifier-first recipe (tiny.yaml)
    would find only ties and no pair. Here embedding dimension 0 is a large constant (so after the final RMSNorm it
    acts as a bias of the output layer) and dimension 1 is large after a digit: the first reply token is one of the
    digits (uniform when sampling), the next is the end-of-turn token. Single-digit arithmetic answers are then
    sometimes right, sometimes wrong; the rest of the weights stay random."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_model(str(path), arch, seed=seed, vocab_size=vocab_size)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    digits = tok.convert_tokens_to_ids(list(ANSWER_DIGITS))
    with torch.no_grad():
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb[:, 0], emb[:, 1] = 100.0, 0.0
        emb[digits, 1] = 100.0
        head[:, :2] = torch.tensor([-5.0, 0.0])  # every other token: logit -40 or less
        head[digits, 0] = 1.0  # first reply token: logit 8 per digit
        head[tok.eos_token_id, :2] = torch.tensor([-2.0, 6.0])  # after a digit: logit ~23, far above the digits
    model.save_pretrained(path)
    return str(path)


def tiny_models(root: Path, cfg: dict[str, Any]) -> dict[str, str]:
    """{model reference of the config: tiny offline stand-in}: the pivot a Llama, the sources alternately Qwen2
    (padded vocabulary) and Llama with other weights, the reward model a tiny sequence classifier."""
    out = {cfg["pivot"]: answering_model(root / "pivot", "llama", seed=0)}
    for i, src in enumerate(cfg["sources"]):
        arch = ("qwen2", "llama")[i % 2]
        out[src] = answering_model(root / f"source{i}", arch, seed=i + 1, vocab_size=128 if arch == "qwen2" else None)
    rm = (cfg.get("judge") or {}).get("reward_model")
    if rm:
        out[rm] = make_tiny_reward_model(str(root / "reward_model"))
    return out


# -- local stand-ins of hub datasets: same columns and types as the real ones ---------------------------------
def _infinity_instruct(i: int) -> dict[str, Any]:
    """BAAI/Infinity-Instruct (7M_core): ShareGPT ``conversations``."""
    topics = ["tides", "volcanoes", "rainbows", "magnets", "seasons", "clouds", "bridges", "batteries", "comets",
              "glaciers"]
    return {"id": i, "conversations": [{"from": "human", "value": f"Explain in two sentences how {topics[i]} work."},
                                       {"from": "gpt", "value": f"{topics[i].title()} work because of physics."}],
            "label": {"cate_ability_en": ["explanation"]}, "langdetect": "en", "source": "stand-in"}


def _numina_math(i: int) -> dict[str, Any]:
    """AI-MO/NuminaMath-1.5: ``problem``, ``solution``, ``answer`` and metadata."""
    a, b = 3 + i, 4 + 2 * i
    return {"problem": f"What is ${a} \\times {b}$?", "solution": f"${a} \\times {b} = {a * b}$.",
            "answer": str(a * b), "problem_type": "Algebra", "question_type": "math-word-problem",
            "problem_is_valid": "Yes", "solution_is_valid": "Yes", "source": "stand-in", "synthetic": False}


def _kodcode(i: int) -> dict[str, Any]:
    """KodCode/KodCode-V1: ``question``, reference ``solution``, pytest ``test``, ``test_info`` and metadata."""
    name = f"add_{i}"
    return {"version": "V1", "style": "instruct", "subset": "Prefill", "question_id": f"Prefill_{i}",
            "question": f"Write a Python function {name}(a, b) that returns a + b + {i}.",
            "solution": f"def {name}(a, b):\n    return a + b + {i}\n",
            "test": f"from solution import {name}\n\ndef test_{name}():\n    assert {name}(1, 2) == {3 + i}\n",
            "test_info": [{"function_name": name, "parameter_list": "(a, b)",
                           "function_declaration": f"def {name}(a, b):", "docstring": None}],
            "gpt_pass_sequence": [1], "gpt_pass_trial_num": 1, "gpt_difficulty": "easy", "gpt_pass_percentage": 1.0}


def _theoremqa(i: int) -> dict[str, Any]:
    """TIGER-Lab/TheoremQA (test): ``Question``, ``Answer``, ``Answer_type``, ``Picture`` (None: text-only item)."""
    return {"Question": f"How many edges does a tree with {i + 3} vertices have?", "Answer": str(i + 2),
            "Answer_type": "integer", "Picture": None}


HUB_STAND_INS = {  # hub id -> (row maker, {config: split}) of its local stand-in
    "BAAI/Infinity-Instruct": (_infinity_instruct, {"7M_core": "train"}),
    "AI-MO/NuminaMath-1.5": (_numina_math, {None: "train"}),
    "KodCode/KodCode-V1": (_kodcode, {None: "train"}),
    "TIGER-Lab/TheoremQA": (_theoremqa, {None: "test"}),
}
STAND_IN_ROWS = 10


def write_stand_in(root: Path, hub_id: str) -> str:
    """A directory in the hub's layout (one JSONL per config and split, a README.md declaring the configs) holding
    STAND_IN_ROWS rows of ``hub_id``'s schema; `datasets.load_dataset(dir, config, split=...)` reads it offline."""
    make, splits = HUB_STAND_INS[hub_id]
    path = root / "hub" / hub_id.replace("/", "__")
    configs = []
    for config, split in splits.items():
        sub = path / (config or "default")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{split}.jsonl").write_text("".join(json.dumps(make(i)) + "\n" for i in range(STAND_IN_ROWS)))
        configs.append({"config_name": config or "default", "data_files": [
            {"split": split, "path": f"{config or 'default'}/{split}.jsonl"}]})
    (path / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n")
    return str(path)


# -- the rewrite -----------------------------------------------------------------------------------------------
def _spec(raw: str | dict[str, Any], root: Path, cap: int) -> str | dict[str, Any]:
    """A prompt / benchmark spec with a hub dataset replaced by its stand-in and the size capped at ``cap``."""
    spec = parse_spec(raw)
    if spec["source"] == "hf":
        if spec["name"] not in HUB_STAND_INS:
            pytest.fail(f"{spec['name']!r} is a hub dataset without a local stand-in; add it to HUB_STAND_INS")
        out = dict(raw) if isinstance(raw, dict) else {k: v for k, v in spec.items() if v is not None}
        return {**out, "name": write_stand_in(root, spec["name"]), "n": min(spec["n"] or cap, cap)}
    n = min(spec["n"] or cap, cap)
    if isinstance(raw, dict):
        return {**raw, "n": n}
    if spec["source"] in ("gsm8k", "arithmetic", "humaneval"):
        return f"{spec['source']}:{spec['split']}:{n}"
    return {**{k: v for k, v in spec.items() if v is not None}, "n": n}


def offline_config(cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    """``cfg`` with only what cannot run offline on a 2-core CPU replaced (module docstring)."""
    cfg = json.loads(json.dumps(cfg))  # a deep copy
    models = tiny_models(root / "models", cfg)
    cfg["run_dir"] = str(root / "run")
    cfg["pivot"], cfg["sources"] = models[cfg["pivot"]], [models[m] for m in cfg["sources"]]
    if (cfg.get("judge") or {}).get("reward_model"):
        cfg["judge"]["reward_model"] = models[cfg["judge"]["reward_model"]]
    p = cfg["prompts"]
    p["sources"] = [_spec(s, root, HUB_PROMPTS if parse_spec(s)["source"] == "hf" else VENDORED_PROMPTS)
                    for s in p["sources"]]
    s = cfg.setdefault("sample", {})
    s["max_tokens"] = min(int(s.get("max_tokens", NEW_TOKENS)), NEW_TOKENS)
    for who in ("pivot", "sources"):
        if "n" in s.get(who, {}):
            s[who]["n"] = min(int(s[who]["n"]), SAMPLES)
    t = cfg.get("train") or {}
    if "seeds" in t:  # repetitions of the same runs: the first seed only
        t["seeds"] = t["seeds"][:1]
        if "ablation_seeds" in t:
            t["ablation_seeds"] = t["seeds"]
    if t.get("grid"):
        t["grid"]["dev_items"] = min(int(t["grid"]["dev_items"]), BENCHMARK_ITEMS)
    for arm in (t.get("ablations") or {}).values():  # an arm's source pool names models of the config
        if "sources" in arm:
            arm["sources"] = [models[m] for m in arm["sources"]]
    common = t.get("common") or {}
    for scope in [common, *(t.get(m) or {} for m in ("sft", *pipeline.methods_of(cfg)))]:
        for key in ("accelerate_config", "num_processes"):  # no relaunch: one CPU process
            scope.pop(key, None)
        scope.update({k: v for k, v in {"bf16": False, "use_cpu": True}.items() if k in scope})
    e = cfg.get("eval")
    if e:
        e["benchmarks"] = [_spec(b, root, BENCHMARK_ITEMS) for b in e["benchmarks"]]
        e["max_tokens"] = min(int(e.get("max_tokens", NEW_TOKENS)), NEW_TOKENS)
        e["backend"] = CPU_ENGINES["eval"]
        e.pop("lm_eval", None)  # lm-eval tasks load their datasets from the hub
        e.pop("lm_eval_limit", None)
    cfg.setdefault("score", {})["backend"] = CPU_ENGINES["score"]
    return cfg


def _uses_vllm(path: Path) -> bool:
    cfg = yaml.safe_load(path.read_text()) or {}
    return "vllm" in {cfg.get("backend", "transformers"), *CPU_ENGINES.values()}


def test_every_shipped_pipeline_config_is_covered():
    assert {p.name for p in SHIPPED} >= {"tiny.yaml", "paper_phi4.yaml"}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the pipeline's process group (its stages stop their engines and workers), SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            return


def _timings(run_dir: Path) -> dict[str, float]:
    path = run_dir / "timings.json"
    return {k: v["seconds"] for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def _failed_stage_log(run_dir: Path) -> str:
    logs = sorted((run_dir / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
    return f"{logs[-1]}:\n{logs[-1].read_text()[-6000:]}" if logs else "(no stage log)"


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("path", [pytest.param(p, id=p.name, marks=[pytest.mark.vllm] if _uses_vllm(p) else [])
                                  for p in SHIPPED])
def test_shipped_config_runs_every_stage_offline(path: Path, tmp_path: Path):
    """The config runs prompts -> sample -> judge -> pair -> train sft -> score -> train every method -> eval of
    every report row -> report, with only models, hub data and hardware options replaced (module docstring)."""
    original = pipeline.load_config(path)
    cfg = offline_config(original, tmp_path)
    rewritten = tmp_path / path.name
    rewritten.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_dir, err = Path(cfg["run_dir"]), tmp_path / "pipeline.stderr"
    start = time.monotonic()
    with open(err, "w") as stderr:  # its own session: on a timeout the whole tree of stage processes is stopped
        proc = subprocess.Popen([sys.executable, "-m", "infifpo.cli", "pipeline", "--config", str(rewritten)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            proc.wait(timeout=PIPELINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _stop(proc)
            pytest.fail(f"{path.name}: the pipeline ran over {PIPELINE_TIMEOUT_S} s (stopped); timings so far: "
                        f"{_timings(run_dir)}")
    assert proc.returncode == 0, f"{err.read_text()[-3000:]}\n--- last stage log: {_failed_stage_log(run_dir)}"
    print(f"{path.name}: pipeline finished in {time.monotonic() - start:.0f} s; stages: {_timings(run_dir)}")

    out = pipeline.load_outputs(run_dir)
    runs = pipeline.planned_runs(cfg)
    assert set(out["checkpoints"]) == set(runs) >= {"sft", *original["train"]["methods"]}
    for label, ckpt in out["checkpoints"].items():  # trained, or a pairwise arm's merge of trained runs
        done = pipeline.MERGE_DONE if "merge" in runs[label] else pipeline.TRAIN_DONE
        assert (Path(ckpt) / done).exists() and list(Path(ckpt).glob("model*.safetensors")), label
    rows = {"pivot", *(f"source:{m}" for m in cfg["sources"]),
            *(k for k, r in runs.items() if "component_of" not in r)}  # a pairwise arm's own runs are no rows
    assert set(out["evals"]) == rows
    n_benchmarks = len(original["eval"]["benchmarks"])
    for label, d in out["evals"].items():
        scores = json.loads((Path(d) / "scores.json").read_text())["benchmarks"]
        assert len(scores) == n_benchmarks and all(b["n"] > 0 for b in scores.values()), (label, scores)
    assert (run_dir / "report.md").read_text().strip() and json.loads((run_dir / "report.json").read_text())

    # The config's own choices reached the stages: pairs ranked as configured, each PO split non-empty.
    rank_by = (original.get("pair") or {}).get("rank_by", "verifier_first")
    pairs = read_output(out["pairs"]["infifpo"])
    assert {r["split"] for r in pairs} == {"sft", "po"}
    judged = [r for d in out["judged"] for r in read_output(d)]
    if rank_by == "reward":  # the paper's recipe: every sample of every domain has a reward-model score
        domains = {r["domain"] for r in read_output(out["prompts"])}
        assert domains == {"general", "math", "code"} and all(isinstance(r["reward"], float) for r in judged)
        assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    else:  # verifier first: a chosen response is right whenever its rejected one is wrong
        assert all(p["chosen_correct"] is True for p in pairs if p["rejected_correct"] is False)
