"""Stage `merge`: several checkpoints fine-tuned from one base -> one merged checkpoint, by RSAF or a baseline.

Owns: ``merge_models`` (what `infifpo merge` and the pipeline's pairwise-fusion mode call), the checks that every
model can be merged with the base element by element (same architecture, parameter names and shapes, safetensors
weights; ``MergeInputError`` otherwise), the output directory (written under a temporary name and renamed, with a
``merge.json`` record; the same merge again reuses it), and running the merge with mergekit (an optional dependency,
``pip install 'infifpo[merge]'``): its own task_arithmetic, ties, dare_ties and sce, and RSAF as a mergekit merge
method (``infifpo_rsaf``) whose kernel is ``infifpo.merge.rsaf.rsaf_merge_tensor``. Does not own: the RSAF math
(``infifpo.merge.rsaf``), training the pairwise models (`infifpo train --method infifpo`, one run per source), or
mergekit's checkpoint reading and writing (it copies the config, tokenizer and chat template from the base and
writes safetensors shards).

docs/methods.md ("Fusion strategies from the seed papers", RSAF) gives the math and the baselines' defaults.
"""

import importlib
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from safetensors import safe_open

from infifpo.config import parse_config
from infifpo.merge.rsaf import DEFAULT_TAU, check_rank_by, check_tau, rsaf_merge_tensor
from infifpo.models.resolve import resolve_model
from infifpo.schema import ConfigError, MergeInputError

logger = logging.getLogger(__name__)

Method = Literal["rsaf", "ties", "task_arithmetic", "dare_ties", "sce"]
METHODS: tuple[str, ...] = ("rsaf", "ties", "task_arithmetic", "dare_ties", "sce")
RSAF_MERGEKIT_NAME = "infifpo_rsaf"  # RSAF's name in mergekit's method registry
# (choice, docs/methods.md RSAF) The baselines' keep fraction when --density is unset: TIES's top-20 % (Yadav et al.,
# 2023); DARE and SCE keep RSAF's τ = 0.1, so they differ from RSAF in which elements they keep, not how many.
DEFAULT_DENSITY = {"ties": 0.2, "dare_ties": 0.1, "sce": 0.1}
# The methods each option applies to, and its default: an option set away from its default for another method is a
# ConfigError, not silently ignored.
OPTION_METHODS: dict[str, tuple[tuple[str, ...], Any]] = {
    "tau": (("rsaf",), DEFAULT_TAU), "rank_by": (("rsaf",), "rate"), "skip": (("rsaf",), []),
    "density": (("ties", "dare_ties", "sce"), None), "weight": (("task_arithmetic", "ties", "dare_ties"), 1.0)}
RECORD_FILE = "merge.json"  # in the output: method, options, base and models (what a re-run compares)
MERGE_VERSION = 1


def require_mergekit() -> Any:
    """The imported ``mergekit`` package, or ConfigError telling the user how to install it."""
    try:
        return importlib.import_module("mergekit")
    except ImportError as e:
        raise ConfigError(f"`infifpo merge` runs on mergekit, which is not importable here ({e}). Install it with "
                          "`pip install 'infifpo[merge]'` (or `pip install mergekit`).") from None


def _rsaf_method() -> Any:
    """RSAF as a mergekit merge method (registered once, under ``RSAF_MERGEKIT_NAME``): per tensor, the base and
    the models' tensors go to ``rsaf_merge_tensor``; ``skip`` is a per-tensor boolean that mergekit's parameter
    filters set (``_parameters``). (This module has no ``from __future__ import annotations``: mergekit reads the
    kernel's annotations with ``get_type_hints``, which cannot resolve the names imported here as strings.)"""
    import torch
    from mergekit import merge_methods
    from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup, merge_method

    if RSAF_MERGEKIT_NAME in {m.spec.name for m in merge_methods.registered_methods()}:
        return merge_methods.get(RSAF_MERGEKIT_NAME)

    @merge_method(name=RSAF_MERGEKIT_NAME, pretty_name="RSAF (InfiFusion)",
                  reference_url="https://arxiv.org/abs/2501.02795", contract=InputContract(base=BasePolicy.REQUIRED))
    def rsaf_kernel(group: TensorGroup, tau: float = DEFAULT_TAU, rank_by: str = "rate",
                    skip: bool = False) -> torch.Tensor:
        base = group.base.tensor
        if skip or not group.non_base or not base.is_floating_point():
            return base
        return rsaf_merge_tensor(base, [e.tensor for e in group.non_base], tau=tau, rank_by=rank_by).merged

    merge_methods.register(rsaf_kernel)
    return rsaf_kernel


# -- checks ----------------------------------------------------------------------------------------------------------
def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def _architecture(config: dict[str, Any]) -> str:
    return ",".join(config.get("architectures") or [config.get("model_type", "?")])


def parameter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} from the safetensors headers of checkpoint ``path`` (no tensor is read);
    MergeInputError when it has no safetensors weights."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MergeInputError(f"{path} has no *.safetensors weights; save it with "
                              "`model.save_pretrained(dir, safe_serialization=True)` and pass that directory.")
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key] = tuple(st.get_slice(key).get_shape())
    return shapes


def check_mergeable(base: Path, models: list[Path]) -> None:
    """MergeInputError unless every model has the base's architecture and exactly its parameter names and shapes
    (an element-by-element merge is defined only for models fine-tuned from the same base)."""
    fix = ("merge only checkpoints fine-tuned from --base (e.g. the pairwise InfiFPO runs of this pivot); models of "
           "other architectures or sizes are fused by `infifpo train --method infifpo`, not merged")
    base_config, base_shapes = _config(base), parameter_shapes(base)
    for path in models:
        config = _config(path)
        if (_architecture(config), config.get("model_type")) != (_architecture(base_config),
                                                                base_config.get("model_type")):
            raise MergeInputError(f"{path} is a {_architecture(config)} ({config.get('model_type')}), the base {base} "
                                  f"a {_architecture(base_config)} ({base_config.get('model_type')}): {fix}.")
        shapes = parameter_shapes(path)
        if shapes != base_shapes:
            missing, extra = sorted(set(base_shapes) - set(shapes)), sorted(set(shapes) - set(base_shapes))
            reshaped = sorted(k for k in set(shapes) & set(base_shapes) if shapes[k] != base_shapes[k])
            detail = "; ".join(f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}"
                               for what, names in (("missing", missing), ("not in the base", extra),
                                                   ("other shape", reshaped)) if names)
            raise MergeInputError(f"{path}: parameters differ from the base {base}'s ({detail}): {fix}.")


# -- the merge -------------------------------------------------------------------------------------------------------
def _parameters(method: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared parameters, per-model parameters) of the mergekit configuration of ``method``."""
    if method == "rsaf":
        skip = [{"filter": s, "value": True} for s in options["skip"]] + [{"value": False}]
        return {"tau": options["tau"], "rank_by": options["rank_by"], "skip": skip}, {}
    density = options["density"] if options["density"] is not None else DEFAULT_DENSITY.get(method)
    if method == "sce":
        return {"select_topk": density}, {}
    per_model = {"weight": options["weight"]}
    if method != "task_arithmetic":
        per_model["density"] = density
    return {}, per_model


def merge_config(method: str, base: Path, models: list[Path], options: dict[str, Any]) -> dict[str, Any]:
    """The mergekit configuration (what `mergekit-yaml` reads) of one merge: arithmetic in float32, the output in
    the base's dtype; mergekit copies the base's tokenizer files (no tokenizer_source: no vocabulary remapping)."""
    shared, per_model = _parameters(method, options)
    base_config = _config(base)
    out_dtype = base_config.get("dtype") or base_config.get("torch_dtype")
    return {"merge_method": RSAF_MERGEKIT_NAME if method == "rsaf" else method, "base_model": str(base),
            "models": [{"model": str(m), "parameters": dict(per_model)} for m in models],
            "parameters": shared, "dtype": "float32", "out_dtype": out_dtype}


def _check_output(out: Path, record: dict[str, Any]) -> bool:
    """True when ``out`` already holds this merge (its record equals ``record``); ConfigError when it holds
    anything else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    previous = out / RECORD_FILE
    if previous.is_file() and json.loads(previous.read_text()) == record:
        return True
    raise ConfigError(f"--output {out} already exists and holds something else than this merge; choose another "
                      "--output or delete it.")


def check_options(method: str, models: list[Any], options: dict[str, Any]) -> None:
    """ConfigError for an unknown method, no model, a value out of range, or an option set away from its default
    for a method that does not take it (``OPTION_METHODS``: it would be ignored)."""
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; one of {list(METHODS)}.")
    if not models:
        raise ConfigError("nothing to merge: give at least one model besides the base.")
    try:
        check_tau(options["tau"])
        check_rank_by(options["rank_by"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, (methods, default) in OPTION_METHODS.items():
        if method not in methods and options[name] != default:
            raise ConfigError(f"{name} is an option of {', '.join(methods)}; {method} does not use it "
                              f"(drop --{name}).")
    if options["density"] is not None and not 0.0 < options["density"] <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {options['density']}.")


def merge_models(method: str, base: str | os.PathLike, models: list[str | os.PathLike], output: str | os.PathLike,
                 *, tau: float = DEFAULT_TAU, rank_by: str = "rate", skip: list[str] | tuple[str, ...] = (),
                 density: float | None = None, weight: float = 1.0, seed: int = 0) -> Path:
    """Merge ``models`` (checkpoints fine-tuned from ``base``: directories or packaged names) into one HF checkpoint
    at ``output`` by ``method`` (``METHODS``) and return its path.

    ``rsaf`` (docs/methods.md RSAF) uses ``tau``, ``rank_by`` and ``skip`` (substrings of parameter names left as the
    base's); the baselines use mergekit's own methods with ``weight`` per model and ``density`` (the kept fraction
    of each delta; ``DEFAULT_DENSITY`` when None; sce's select_topk); ``OPTION_METHODS`` says which method takes
    which. ``seed`` seeds DARE's random drop. Raises MergeInputError when a model cannot be merged with the base,
    ConfigError for bad options (``check_options``), a missing mergekit, or an ``output`` that holds another merge.
    The same merge into the same ``output`` again returns it at once."""
    options = {"tau": tau, "rank_by": rank_by, "skip": list(skip), "density": density, "weight": weight, "seed": seed}
    check_options(method, models, options)
    base_dir = Path(resolve_model(str(base)))
    model_dirs = [Path(resolve_model(str(m))) for m in models]
    check_mergeable(base_dir, model_dirs)
    mergekit = require_mergekit()
    out = Path(output)
    record = {"version": MERGE_VERSION, "method": method, "base": str(base_dir),
              "models": [str(m) for m in model_dirs], "options": options,
              "mergekit": getattr(mergekit, "__version__", None) or _version("mergekit")}
    if _check_output(out, record):
        logger.info("%s already holds this merge; reusing it", out)
        return out
    _run_mergekit(merge_config(method, base_dir, model_dirs, options), out, seed=seed, record=record)
    return out


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _run_mergekit(config: dict[str, Any], out: Path, *, seed: int, record: dict[str, Any]) -> None:
    """Run mergekit's ``run_merge`` on ``config`` into a temporary sibling of ``out``, add the record, rename."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions as MergekitOptions

    if config["merge_method"] == RSAF_MERGEKIT_NAME:
        _rsaf_method()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        run_merge(MergeConfiguration.model_validate(config), str(tmp),
                  MergekitOptions(copy_tokenizer=True, random_seed=seed, quiet=True, device="cpu"))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
        if out.exists():
            out.rmdir()  # empty (``_check_output``)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the command -----------------------------------------------------------------------------------------------------
@dataclass
class MergeOptions:
    """The options of `infifpo merge` (``--config FILE`` and flags, ``infifpo.config``)."""

    method: Method = field(metadata={"help": "rsaf (docs/methods.md, RSAF) or a mergekit baseline"})
    base: str = field(metadata={"help": "the pivot θ_p every model was fine-tuned from (directory or packaged name)"})
    models: list[str] = field(metadata={"help": "checkpoints to merge, e.g. one pairwise InfiFPO model per source"})
    output: str = field(metadata={"help": "directory of the merged HF checkpoint"})
    tau: float = field(default=DEFAULT_TAU, metadata={"help": "rsaf: τ, the keep-ratio at zero skewness"})
    rank_by: Literal["rate", "magnitude"] = field(default="rate", metadata={
        "help": "rsaf: keep the elements with the largest rate of change r (the paper) or |δ| (as TIES/SCE)"})
    skip: list[str] = field(default_factory=list, metadata={
        "help": "rsaf: parameters left as the base's, by substring of their names (e.g. lm_head embed_tokens)"})
    density: float | None = field(default=None, metadata={
        "help": "ties/dare_ties/sce: fraction of each delta kept; unset: ties 0.2, dare_ties 0.1, sce 0.1"})
    weight: float = field(default=1.0, metadata={"help": "task_arithmetic/ties/dare_ties: weight of every model"})
    seed: int = field(default=0, metadata={"help": "seed of dare_ties' random drop"})

    def merge_options(self) -> dict[str, Any]:
        """The keyword options of ``merge_models``."""
        return {k: v for k, v in asdict(self).items() if k not in ("method", "base", "models", "output")}


def main(argv: list[str] | None = None) -> int:
    """`infifpo merge --method M --base DIR --models DIR [DIR...] --output DIR [...]`, or the same options in
    ``--config FILE``."""
    opts = parse_config(MergeOptions, argv, prog="infifpo merge",
                        description="Merge checkpoints fine-tuned from one base into one (RSAF or a baseline).")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = merge_models(opts.method, opts.base, opts.models, opts.output, **opts.merge_options())
    # A checkpoint, not a store output (no _SUCCESS): printed as `infifpo train` leaves its own, not recorded in the
    # pipeline's result file, which lists store outputs only (the pipeline names the merge's --output itself).
    print(out, flush=True)
    print(f"merged {len(opts.models)} model(s) into {opts.base} by {opts.method}", file=sys.stderr, flush=True)
    return 0
