"""`infifpo plan --config FILE`: memory and time estimates per stage of a pipeline config, from model sizes, token
counts and a stated throughput assumption, before any GPU is rented. Nothing is loaded or downloaded.

How (every number is an estimate; docs/scaling.md works the paper's setup through):
- Parameters: a local checkpoint's (or a materialised packaged model's, or a hub model's in the local HF cache)
  config.json, counted by building the model on the meta device (no weights read); else ``KNOWN_SIZES`` for the
  paper's hub models; ``--params MODEL=14.7e9`` overrides. A packaged model that is not materialised uses the size
  recorded in ``infifpo.models.PACKAGED`` and says so.
- Tokens: P prompt tokens (``--prompt-tokens``, default 128) and A response tokens per response (``--response-tokens``,
  default the config's ``max_tokens``: an upper bound, every response runs to the limit). Every prompt is assumed
  to yield a pair (an upper bound); ``pair.sft_fraction`` of them go to SFT, the rest to preference training.
- FLOPs: forward 2 * params * tokens (sampling, judging, scoring, evaluation, a live reference); training
  6 * params * tokens (forward + backward). Prompt tokens of n samples are computed once (vLLM's n > 1).
- Time: device-seconds = FLOPs / (peak TFLOP/s * MFU), with separate MFU for training, prefill (scoring, prompts)
  and decode (generation, memory-bound); wall = device-hours / devices (shards and ZeRO-3 data parallelism scale
  linearly here; real runs lose some of that).
- Memory per device, inference: bf16 weights 2 B/param / TP + KV cache 2 (K, V) * layers * kv_heads * head_dim *
  2 B per token for ``--concurrent-seqs`` sequences of P + A tokens / TP; TP is the smallest power of two that fits
  90 % of device memory (vLLM's gpu_memory_utilization).
- Memory per device, training (full fine-tuning, bf16 mixed precision AdamW): 16 B/param (bf16 weights and grads,
  fp32 master weights and two moments) / W under ZeRO-3 over all W devices, + 2 B/param / W for a live reference
  (DPO, WRPO), + activations of one micro-batch: tokens * hidden * (2 * layers + 34) B with gradient checkpointing
  (a saved hidden state per layer, one layer recomputed) or 34 * layers * hidden B per token without.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from infifpo.schema import ConfigError, ModelLoadError
from infifpo.trainers import packaged_config

logger = logging.getLogger(__name__)

GB = 1e9
# Hub models of configs/paper_phi4.yaml (not available offline): sizes and shapes from their config.json / model cards.
KNOWN_SIZES: dict[str, dict[str, float]] = {
    "microsoft/phi-4": dict(params=14.66e9, layers=40, hidden=5120, kv_heads=10, head_dim=128, vocab=100352),
    "qwen/qwen2.5-14b-instruct": dict(params=14.77e9, layers=48, hidden=5120, kv_heads=8, head_dim=128, vocab=152064),
    "qwen/qwen2.5-coder-14b-instruct": dict(params=14.77e9, layers=48, hidden=5120, kv_heads=8, head_dim=128,
                                            vocab=152064),
    "mistralai/mistral-small-24b-instruct-2501": dict(params=23.57e9, layers=40, hidden=5120, kv_heads=8,
                                                      head_dim=128, vocab=131072),
    "google/gemma-3-12b-it": dict(params=12.19e9, layers=48, hidden=3840, kv_heads=8, head_dim=256, vocab=262208),
    "qwen/qwen2.5-math-7b-instruct": dict(params=7.62e9, layers=28, hidden=3584, kv_heads=4, head_dim=128,
                                          vocab=152064),
    "skywork/skywork-reward-llama-3.1-8b-v0.2": dict(params=7.50e9, layers=32, hidden=4096, kv_heads=8,
                                                     head_dim=128, vocab=128256),
    "skywork/skywork-reward-gemma-2-27b-v0.2": dict(params=27.23e9, layers=46, hidden=4608, kv_heads=16,
                                                    head_dim=128, vocab=256000),
}
# Full test-split sizes for eval benchmarks given without a count.
BENCHMARK_SIZES = {("gsm8k", "test"): 1319, ("humaneval", "test"): 164}
# Preference methods: (responses per row, live reference forward?). InfiFPO's reference and sources are scored
# offline by `infifpo score`; the pipeline trains DPO and WRPO with a live frozen reference.
METHODS = {"dpo": (2, True), "infifpo": (2, False), "wrpo": (3, True)}


@dataclass
class Hardware:
    """Devices and the throughput assumption: peak dense TFLOP/s per device and the fraction of it (MFU) reached."""

    name: str
    devices: int
    tflops: float
    mem_gb: float
    mfu_train: float
    mfu_prefill: float
    mfu_decode: float


PRESETS = {
    "gpu": Hardware("A100-80GB (bf16 dense 312 TFLOP/s)", 8, 312.0, 80.0, 0.35, 0.5, 0.1),
    # The 2-core CPU this project is tested on (measured): matmul peak 165 GFLOP/s fp32; SmolLM2-135M generated 28-40
    # tok/s, i.e. 2 * 135e6 * 34 / 165e9 = 5.6 % of peak (decode MFU 0.05). Prefill and training MFU are not measured
    # there.
    "cpu": Hardware("2-core CPU (165 GFLOP/s fp32 matmul peak)", 1, 0.165, 24.0, 0.2, 0.3, 0.05),
}


@dataclass
class ModelSize:
    """A model's parameter count and the shapes the memory terms need (None when unknown), and where they came from."""

    ref: str
    params: float
    source: str
    layers: int | None = None
    hidden: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab: int | None = None

    def kv_bytes_per_token(self) -> float | None:
        """bf16 K and V of every layer for one token (bytes)."""
        if None in (self.layers, self.kv_heads, self.head_dim):
            return None
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


# ---------------------------------------------------------------- model sizes


def _from_config_dir(ref: str, path: str, source: str) -> ModelSize:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    return ModelSize(ref, float(params), source, text.num_hidden_layers, text.hidden_size,
                     getattr(text, "num_key_value_heads", None) or heads, head_dim, text.vocab_size)


def model_size(ref: str, overrides: dict[str, float] | None = None) -> ModelSize:
    """The size of ``ref`` without loading weights or downloading (module docstring: where each number comes from)."""
    from infifpo.models import resolve as models

    known = KNOWN_SIZES.get(ref.lower())
    if overrides and ref in overrides:
        shapes = {k: int(v) for k, v in (known or {}).items() if k != "params"}
        return ModelSize(ref, float(overrides[ref]), "--params", **shapes)
    if Path(ref).expanduser().is_dir():
        return _from_config_dir(ref, models.resolve_model(ref), "config.json")
    if ref in models.PACKAGED:
        try:
            models.check_cache_entry(ref, models.cache_dir() / ref)
        except ModelLoadError:
            return ModelSize(ref, float(models.PACKAGED[ref]["params"]),
                             f"packaged table (not materialised: `infifpo models fetch {ref}`)")
        return _from_config_dir(ref, models.resolve_model(ref), "config.json (materialised)")
    cached = _hub_cache_config(ref)
    if cached:
        return _from_config_dir(ref, str(Path(cached).parent), "config.json (HF cache)")
    if known:
        return ModelSize(ref, known["params"], "known sizes table (not in the local cache)",
                         **{k: int(v) for k, v in known.items() if k != "params"})
    raise ConfigError(f"model {ref!r}: no local config.json, not a materialised packaged model and not in the known "
                      f"sizes table; give its size with --params {ref}=7.6e9")


def _hub_cache_config(ref: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref, "config.json")
    except Exception:  # not a valid repo id
        return None
    return found if isinstance(found, str) else None


# ---------------------------------------------------------------- workload and estimates


def _train_options(cfg: dict[str, Any], method: str, config_dir: Path) -> dict[str, Any]:
    """The packaged train YAML of ``method`` (or ``train.<method>.config``) under ``train.common`` and
    ``train.<method>``."""
    tcfg = cfg.get("train") or {}
    opts = {**(tcfg.get("common") or {}), **(tcfg.get(method) or {})}
    path = Path(opts.get("config") or packaged_config(method))
    for candidate in (path, config_dir / path):
        if candidate.is_file():
            return {**(yaml.safe_load(candidate.read_text()) or {}), **opts}
    return opts


def num_prompts(cfg: dict[str, Any]) -> tuple[int, float]:
    """(Sum of the prompt sources' sizes, the fraction of them in the general domain, which has no verifier:
    hub and JSONL sources unless their ``domain`` says otherwise). A source without a size is a ConfigError."""
    from data_prep.prompts import parse_spec

    total = general = 0
    for raw in (cfg.get("prompts") or {}).get("sources", []):
        spec = parse_spec(raw)
        if spec.get("n") is None:
            raise ConfigError(f"prompt source {raw!r} has no size; give the total with --num-prompts N")
        total += int(spec["n"])
        general += int(spec["n"]) if spec.get("domain", "general" if spec["source"] in ("hf", "jsonl") else "") \
            == "general" else 0
    return total, (general / total if total else 0.0)


def _inference_row(stage: str, size: ModelSize, hw: Hardware, *, prefill: float, decode: float, seq_len: int,
                   concurrent: int, note: str = "") -> dict[str, Any]:
    """One inference stage of one model: FLOPs 2 * params * tokens; memory bf16 weights / TP + KV cache / TP."""
    rate = hw.tflops * 1e12
    seconds = 2 * size.params * prefill / (rate * hw.mfu_prefill) + 2 * size.params * decode / (rate * hw.mfu_decode)
    kv_token = size.kv_bytes_per_token()
    kv = kv_token * concurrent * seq_len if kv_token else 0.0
    tp = 1
    while (2 * size.params + kv) / tp > 0.9 * hw.mem_gb * GB and tp < hw.devices:
        tp *= 2
    mem = (2 * size.params + kv) / tp / GB
    note = "; ".join(x for x in (note, "" if kv_token else "KV cache unknown (no shapes)") if x)
    return {"stage": stage, "model": size.ref, "params": size.params, "tokens": prefill + decode,
            "flops": 2 * size.params * (prefill + decode), "device_hours": seconds / 3600,
            "wall_hours": seconds / 3600 / hw.devices, "mem_gb": mem, "fits": mem <= 0.9 * hw.mem_gb,
            "parallel": f"TP={tp}", "note": note}


def _train_row(stage: str, size: ModelSize, hw: Hardware, *, tokens: float, live_ref: bool, micro_tokens: int,
               checkpointing: bool) -> dict[str, Any]:
    """One training run: FLOPs 6 * params * tokens (+ 2 * params * tokens for a live reference); memory 16 B/param
    (+ 2 B/param reference) / W under ZeRO-3, + one micro-batch of activations."""
    flops = (6 + (2 if live_ref else 0)) * size.params * tokens
    seconds = flops / (hw.tflops * 1e12 * hw.mfu_train)
    w = hw.devices
    states = (16 + (2 if live_ref else 0)) * size.params / w
    act = 0.0
    if size.hidden and size.layers:
        act = micro_tokens * size.hidden * ((2 * size.layers + 34) if checkpointing else 34 * size.layers)
    mem = (states + act) / GB
    note = ("live reference; " if live_ref else "") + ("grad. checkpointing" if checkpointing else "no checkpointing")
    return {"stage": stage, "model": size.ref, "params": size.params, "tokens": tokens, "flops": flops,
            "device_hours": seconds / 3600, "wall_hours": seconds / 3600 / w, "mem_gb": mem,
            "fits": mem <= hw.mem_gb, "parallel": f"ZeRO-3 W={w}", "note": note}


def estimate(cfg: dict[str, Any], sizes: dict[str, ModelSize], hw: Hardware, *, prompts: int, prompt_tokens: int = 128,
             response_tokens: int | None = None, concurrent: int = 64, config_dir: Path = Path("configs"),
             general_fraction: float = 1.0) -> list[dict[str, Any]]:
    """One row per stage and model (stage, model, params, tokens, flops, device_hours, wall_hours, mem_gb, fits,
    parallel, note). ``sizes`` maps every model ref of ``cfg`` (pivot, sources, judge.reward_model) to its size;
    ``general_fraction``: the share of general-domain samples (reported in the judge row's note; the reward model
    scores every sample, math and code ones too)."""
    from infifpo.pair import DEFAULT_SFT_FRACTION

    s = cfg.get("sample") or {}
    p, a = prompt_tokens, response_tokens or int(s.get("max_tokens", 256))
    pivot, sources = cfg["pivot"], list(cfg["sources"])
    rows, responses_sampled = [], 0
    for m in [pivot, *sources]:
        n = int({**s, **(s.get("pivot" if m == pivot else "sources") or {})}.get("n") or (8 if m == pivot else 4))
        responses_sampled += prompts * n
        rows.append(_inference_row("sample", sizes[m], hw, prefill=prompts * p, decode=prompts * n * a,
                                   seq_len=p + a, concurrent=concurrent, note=f"n={n}"))
    reward_model = (cfg.get("judge") or {}).get("reward_model")
    if reward_model:  # `infifpo judge` scores every sample of every domain with it (verifiers add verdicts)
        rows.append(_inference_row("judge", sizes[reward_model], hw, prefill=responses_sampled * (p + a), decode=0,
                                   seq_len=p + a, concurrent=concurrent,
                                   note=f"reward model on every sample ({general_fraction:.0%} general-domain)"))
    pair = cfg.get("pair") or {}
    fraction = float(pair.get("sft_fraction", DEFAULT_SFT_FRACTION[pair.get("recipe", "infifpo")]))
    sft_rows, po_rows = prompts * fraction, prompts * (1 - fraction)
    for m in [pivot, *sources]:
        rows.append(_inference_row("score", sizes[m], hw, prefill=po_rows * 2 * (p + a), decode=0, seq_len=p + a,
                                   concurrent=concurrent, note="SFT checkpoint" if m == pivot else ""))
    methods = list((cfg.get("train") or {}).get("methods", ["dpo", "infifpo"]))
    for method in ["sft", *methods]:
        opts = _train_options(cfg, method, config_dir)
        responses, live_ref = (1, False) if method == "sft" else METHODS.get(method, (2, False))
        seq = min(p + a, int(opts.get("max_length", 1024)))
        tokens = (sft_rows if method == "sft" else po_rows) * responses * seq * float(opts.get("num_train_epochs", 1))
        micro = int(opts.get("per_device_train_batch_size", 8)) * responses * seq
        rows.append(_train_row(f"train/{method}", sizes[pivot], hw, tokens=tokens, live_ref=live_ref,
                               micro_tokens=micro, checkpointing=bool(opts.get("gradient_checkpointing", False))))
    rows += _eval_rows(cfg, sizes, hw, methods, p, concurrent)
    return rows


def _eval_rows(cfg: dict[str, Any], sizes: dict[str, ModelSize], hw: Hardware, methods: list[str], p: int,
               concurrent: int) -> list[dict[str, Any]]:
    from data_prep.prompts import parse_spec

    ecfg = cfg.get("eval") or {}
    if not ecfg.get("benchmarks"):
        return []
    items, unknown = 0, []
    for raw in ecfg["benchmarks"]:
        spec = parse_spec(raw)
        n = spec.get("n") or BENCHMARK_SIZES.get((spec["source"], spec.get("split")))
        items += int(n or 0)
        unknown += [] if n else [str(raw)]
    a = int(ecfg.get("max_tokens", 256))
    note = ", ".join(f"{x}: size unknown, not counted" for x in unknown)
    if ecfg.get("lm_eval"):
        note = "; ".join(x for x in (note, "lm-eval tasks not estimated") if x)
    labels = [("pivot", cfg["pivot"]), *(("source", m) for m in cfg["sources"]),
              *((k, cfg["pivot"]) for k in ["sft", *methods])]
    return [_inference_row(f"eval/{label}", sizes[m], hw, prefill=items * p, decode=items * a, seq_len=p + a,
                           concurrent=concurrent, note=note) for label, m in labels]


# ---------------------------------------------------------------- CLI


def _si(x: float) -> str:
    """3 significant digits with a k / M / G / T / P / E suffix: 2.48e9 -> '2.48G'."""
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table (device-hours and wall hours at the stated throughput), with a total line."""
    head = ("stage", "model", "params", "tokens", "FLOPs", "dev-h", "wall-h", "GB/dev", "fits", "parallel", "note")
    lines = [[r["stage"], r["model"], _si(r["params"]).replace("G", "B"), _si(r["tokens"]), _si(r["flops"]),
              f"{r['device_hours']:.3g}", f"{r['wall_hours']:.3g}", f"{r['mem_gb']:.1f}", "yes" if r["fits"] else "NO",
              r["parallel"], r["note"]]
             for r in rows]
    lines.append(["total", "", "", _si(sum(r["tokens"] for r in rows)), _si(sum(r["flops"] for r in rows)),
                  f"{sum(r['device_hours'] for r in rows):.3g}", f"{sum(r['wall_hours'] for r in rows):.3g}", "", "",
                  "", ""])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = lambda row: " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, lines)])


def _parse_params(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        model, sep, value = item.rpartition("=")
        try:
            out[model] = float(value)
        except ValueError:
            sep = ""
        if not sep or not model:
            raise ConfigError(f"--params {item!r}: expected MODEL=COUNT, e.g. microsoft/phi-4=14.7e9")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="infifpo plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="pipeline YAML (configs/tiny.yaml, configs/paper_phi4.yaml)")
    ap.add_argument("--cpu", action="store_true", help="the 2-core CPU preset instead of A100-80GB GPUs")
    ap.add_argument("--gpus", type=int, help="devices (GPUs) in all (default: 8 GPUs, 1 with --cpu)")
    ap.add_argument("--gpu-tflops", type=float, help="peak dense TFLOP/s per device (default 312, A100 bf16)")
    ap.add_argument("--gpu-mem-gb", type=float, help="memory per device in GB (default 80)")
    for stage, what in (("train", "training"), ("prefill", "scoring / prompt"), ("decode", "generation")):
        ap.add_argument(f"--mfu-{stage}", type=float, help=f"fraction of peak reached in {what} FLOPs")
    ap.add_argument("--num-prompts", type=int, help="prompts in all (default: the sum of the prompt sources' sizes)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="mean prompt length in tokens")
    ap.add_argument("--response-tokens", type=int, help="mean response length (default: sample.max_tokens)")
    ap.add_argument("--concurrent-seqs", type=int, default=64, help="sequences whose KV cache an engine holds")
    ap.add_argument("--params", action="append", default=[], metavar="MODEL=COUNT", help="parameter count override")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text()) or {}
    if not isinstance(cfg, dict) or "pivot" not in cfg or "sources" not in cfg:
        raise ConfigError(f"{args.config}: expected a pipeline config with `pivot:` and `sources:`")
    hw = PRESETS["cpu" if args.cpu else "gpu"]
    hw = replace(hw, **{k: v for k, v in (("devices", args.gpus), ("tflops", args.gpu_tflops),
                                           ("mem_gb", args.gpu_mem_gb), ("mfu_train", args.mfu_train),
                                           ("mfu_prefill", args.mfu_prefill), ("mfu_decode", args.mfu_decode))
                        if v is not None})
    overrides = _parse_params(args.params)
    refs = [cfg["pivot"], *cfg["sources"], *([cfg["judge"]["reward_model"]] if (cfg.get("judge") or {}).get(
        "reward_model") else [])]
    sizes = {ref: model_size(ref, overrides) for ref in dict.fromkeys(refs)}
    counted, general = num_prompts(cfg) if not args.num_prompts else (args.num_prompts, None)
    if general is None:  # --num-prompts: the domain mix still comes from the sources' sizes when they have them
        try:
            general = num_prompts(cfg)[1]
        except ConfigError:
            general = 1.0
    prompts = counted
    rows = estimate(cfg, sizes, hw, prompts=prompts, prompt_tokens=args.prompt_tokens,
                    response_tokens=args.response_tokens, concurrent=args.concurrent_seqs,
                    config_dir=Path(args.config).parent, general_fraction=general)
    if args.json:
        print(json.dumps({"hardware": asdict(hw), "models": {k: asdict(v) for k, v in sizes.items()}, "rows": rows},
                         indent=1))
        return 0
    print(f"hardware: {hw.devices} x {hw.name}, {hw.mem_gb:g} GB each; MFU train {hw.mfu_train:g}, prefill "
          f"{hw.mfu_prefill:g}, decode {hw.mfu_decode:g}")
    print(f"workload: {prompts} prompts, {args.prompt_tokens} prompt tokens, "
          f"{args.response_tokens or (cfg.get('sample') or {}).get('max_tokens', 256)} response tokens per response")
    for s in sizes.values():
        print(f"model {s.ref}: {s.params / 1e9:.3f}B params ({s.source})")
    print(format_table(rows))
    if not all(r["fits"] for r in rows):
        print("NO in `fits`: add devices (ZeRO-3 world size), tensor parallelism, or a smaller micro-batch.")
    return 0
