"""Step time and peak memory: InfiFPOTrainer (K = 2 sources) vs TRL DPOTrainer (live reference / precomputed
reference).

Every configuration runs in its own process (so peak RSS is that configuration's own), on the same random-weight
model, data, batch, sequence lengths and precision, and is reported as a ratio to the live-reference fp32 baseline.
Default model: a SmolLM2-135M-shaped Llama built from its config (no download) with a character tokenizer; batch 4,
~250-token sequences (100-token prompt + ~150-token responses), gradient checkpointing off.

    python bench/bench_trainer.py            # full (minutes on 2 CPU cores)
    python bench/bench_trainer.py --quick    # tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = {  # name -> (trainer, bf16)
    "dpo_live_fp32": ("dpo_live", False),
    "dpo_precomputed_fp32": ("dpo_precomputed", False),
    "infifpo_fp32": ("infifpo", False),
    "dpo_precomputed_bf16": ("dpo_precomputed", True),
    "infifpo_bf16": ("infifpo", True),
}
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, head_dim=64)
QUICK = dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=256, head_dim=32)


def build_model(path: str, quick: bool) -> None:
    """Save a random-weight Llama of the chosen shape and a character tokenizer (with chat template) to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import make_char_tokenizer

    tok = make_char_tokenizer(path)
    cfg = LlamaConfig(**(QUICK if quick else SMOLLM2_135M), max_position_embeddings=2048, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def make_rows(n: int, prompt_len: int, response_len: int, k: int = 2) -> list[dict]:
    """Conversational scored pairs with random (valid) log-probs; lengths in characters = tokens here (+1 for the
    end-of-turn token the trainer's completion includes), so means are sums over those token counts."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "

    def text(m: int) -> str:
        return "".join(rng.choice(letters) for _ in range(m))

    rows = []
    for i in range(n):
        row = {"id": f"b{i}", "prompt": [{"role": "user", "content": text(prompt_len)}],
               "chosen": [{"role": "assistant", "content": text(response_len)}],
               "rejected": [{"role": "assistant", "content": text(response_len - 10)}]}
        for r in ("chosen", "rejected"):
            n_tok = len(row[r][0]["content"]) + 1
            ref = -rng.uniform(1, 3) * n_tok
            src = [-rng.uniform(1, 3) * n_tok for _ in range(k)]
            row.update({f"ref_{r}_logps": ref, f"ref_mean_{r}_logps": ref / n_tok, f"fuse_{r}_logps": src,
                        f"fuse_mean_{r}_logps": [s / n_tok for s in src], f"ref_{r}_num_tokens": n_tok,
                        f"fuse_{r}_num_tokens": [n_tok] * k})
        rows.append(row)
    return rows


def run_one(name: str, model_dir: str, quick: bool, steps: int) -> dict:
    """Train ``steps`` optimizer steps of one configuration; time steps 2.. and report peak RSS of this process."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from infifpo.trainers.infifpo import InfiFPOConfig, InfiFPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    kind, bf16 = CONFIGS[name]
    prompt_len, response_len = (30, 40) if quick else (100, 150)
    rows = make_rows(4 * steps, prompt_len, response_len)
    common = dict(output_dir=tempfile.mkdtemp(), use_cpu=not torch.cuda.is_available(), bf16=bf16,
                  per_device_train_batch_size=4, max_steps=steps, logging_steps=1, save_strategy="no",
                  report_to="none", max_length=512, gradient_checkpointing=False, disable_tqdm=True, seed=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if kind == "infifpo":
        trainer = InfiFPOTrainer(model_dir, args=InfiFPOConfig(length_normalize=True, **common),
                                 train_dataset=Dataset.from_list(rows), processing_class=tok)
    else:
        plain = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        ref = AutoModelForCausalLM.from_pretrained(model_dir) if kind == "dpo_live" else None
        trainer = DPOTrainer(model_dir, ref_model=ref, args=DPOConfig(
            precompute_ref_log_probs=kind == "dpo_precomputed", **common), train_dataset=plain, processing_class=tok)

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Timer())
    trainer.train()
    timed = times[1:] or times  # step 1 pays one-off costs (allocator warm-up, lazy init)
    return {"name": name, "step_s": sum(timed) / len(timed), "peak_rss_gb": _peak_rss_gb(), "steps": len(times)}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and sequences (seconds, for CI)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration (default 4; quick 3)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    p.add_argument("--run", help=argparse.SUPPRESS)  # child mode: one configuration
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    steps = a.steps or (3 if a.quick else 4)
    if a.run:
        print("RESULT " + json.dumps(run_one(a.run, a.model_dir, a.quick, steps)), flush=True)
        return 0
    model_dir = tempfile.mkdtemp(prefix="bench-model-")
    try:
        build_model(model_dir, a.quick)
        results = measure_all(a, model_dir, steps)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    if results is None:
        return 1
    report(results)
    return 0


def measure_all(a: argparse.Namespace, model_dir: str, steps: int) -> dict | None:
    """Run each configuration in a fresh subprocess; None if one failed (its stderr is printed)."""
    results = {}
    for name in a.configs.split(","):
        cmd = [sys.executable, __file__, "--run", name, "--model-dir", model_dir, "--steps", str(steps)]
        out = subprocess.run(cmd + (["--quick"] if a.quick else []), capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            return None
        results[name] = json.loads(line[len("RESULT "):])
        print(f"  done {name}: {results[name]['step_s']:.3f} s/step, {results[name]['peak_rss_gb']:.2f} GB",
              flush=True)
    return results


def report(results: dict) -> None:
    """Print the table of step time and peak RSS, with ratios to the live-reference fp32 baseline."""
    base = results.get("dpo_live_fp32")
    print(f"\n{'configuration':<24}{'s/step':>10}{'peak GB':>10}{'time x':>9}{'mem x':>8}")
    for name, r in results.items():
        tx = r["step_s"] / base["step_s"] if base else float("nan")
        mx = r["peak_rss_gb"] / base["peak_rss_gb"] if base else float("nan")
        print(f"{name:<24}{r['step_s']:>10.3f}{r['peak_rss_gb']:>10.2f}{tx:>9.2f}{mx:>8.2f}")


if __name__ == "__main__":
    sys.exit(main())
