"""`infifpo train --method sft|dpo|infifpo|wrpo|opd [--config FILE] [--key value ...]`: parse, build, train, save.

Owns: the command line of the train stage (TrlParser: YAML keys are config-dataclass fields, CLI flags override
them, an unknown YAML key is a ConfigError with a did-you-mean), the precision default on CPU (bf16 autocast where
the CPU has native bf16 matmuls, fp32 otherwise), model / LoRA / 4-bit QLoRA set-up from TRL's ModelConfig, and
writing the resolved configuration into ``output_dir``. Does not own: the trainers, data validation or the math.
Data: ``dataset_name`` is a scored-pairs stage output directory, a ``.jsonl`` file or a hub dataset name; ``sft``
trains on (prompt, chosen) rows with split == "sft", the preference methods on split == "po" (when a split column
exists); ``opd`` samples from the ``prompt`` column (a prompts stage output directory, or any rows with
conversational prompts).
Scale-out: ``--num_processes N`` and/or ``--accelerate_config FILE|NAME`` relaunch the same command under
``accelerate launch`` (``trainers.launch``); inside a launched process they are ignored. A rank of a multi-process run
(WORLD_SIZE > 1) ends through ``exit_rank``, without the interpreter teardown that can deadlock in gloo.
Every run writes ``output_dir/infifpo_train_log.json`` (docs/formats.md "Train log") from the main process.
Resume: ``--resume_from_checkpoint PATH|true`` continues from a ``checkpoint-N`` directory (``true``: the latest
complete one in ``output_dir``) with its weights, optimizer, schedule, RNG and data position (``resume_checkpoint``).
Errors: a user mistake (unknown flag or key, bad value, missing file, no chat template) is a ConfigError /
ChatTemplateError raised before any model loads; ``infifpo.cli`` prints it as one line (exit 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

from infifpo.config import check_yaml_keys, config_path, raise_config_error, suggest, unknown_flags_error, yaml_mapping
from infifpo.schema import ChatTemplateError, ConfigError, InfiFPOError
from infifpo.trainers import packaged_config
from infifpo.trainers.launch import in_launched_process, relaunch, split_launch_args

logger = logging.getLogger(__name__)
METHODS = ("sft", "dpo", "infifpo", "wrpo", "opd")
RESOLVED_CONFIG = "infifpo_train_config.yaml"
TRAIN_LOG = "infifpo_train_log.json"
_KEPT: list[Any] = []  # what a rank must not free before it exits (the trainer, a failure): ``exit_rank``
DEBUG_ENV = "INFIFPO_DEBUG"  # = infifpo.cli.DEBUG_ENV: "1" prints a named error's traceback too
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# (logger, message start) of log records that say nothing actionable on every run; dropped by ``silence_noise``.
# bitsandbytes' CPU backend tries to fetch a kernel from the hub at import (needs the `kernels` package + network);
# without it, it falls back to its own CPU kernels, which is what runs here anyway.
NOISE = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),)


@dataclass
class TrainScriptArguments:
    """Where the training rows come from."""

    dataset_name: str | None = field(default=None, metadata={
        "help": "Scored-pairs stage output directory, a .jsonl file, or a hub dataset name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a hub dataset to load."})
    dataset_test_split: str = field(default="test", metadata={
        "help": "Split of a hub dataset evaluated during training (eval_strategy), when neither eval_dataset_name "
                "nor eval_fraction is given."})
    eval_dataset_name: str | None = field(default=None, metadata={
        "help": "Held-out rows evaluated during training (eval_strategy steps|epoch): a stage output directory or "
                ".jsonl file in dataset_name's format (the same `split` filter applies)."})
    eval_fraction: float = field(default=0.0, metadata={
        "help": "Hold out this fraction (0-1) of the training rows, chosen by a seeded shuffle (seed), and evaluate "
                "on them during training; they are not trained on."})
    pipeline_split: str | None = field(default=None, metadata={
        "help": "Rows kept by the pipeline's `split` column; default 'sft' for --method sft, else 'po'."})


@dataclass
class ChatTemplateArguments:
    """The chat template of the trained model, for the methods whose TRL config has no such key (SFTConfig has)."""

    chat_template_path: str | None = field(default=None, metadata={
        "help": "A Jinja chat-template file (or a tokenizer directory whose template to use) for a model whose "
                "tokenizer has none; same key as TRL's SFTConfig."})


def _config_class(method: str) -> type:
    if method == "sft":
        from trl import SFTConfig

        return SFTConfig
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig
    if method == "infifpo":
        from infifpo.trainers.infifpo import InfiFPOConfig

        return InfiFPOConfig
    if method == "opd":
        from infifpo.trainers.opd import FusedDistillationConfig

        return FusedDistillationConfig
    from infifpo.trainers.wrpo import WRPOConfig

    return WRPOConfig


def cpu_supports_bf16() -> bool:
    """Whether bf16 autocast is the faster precision on this CPU (``infifpo.precision``: measured once per machine;
    emulated bf16, and AVX512-BF16 without AMX, are slower than fp32)."""
    from infifpo.precision import auto_cpu_dtype

    return auto_cpu_dtype() == "bfloat16"


def _split_method(argv: list[str]) -> tuple[str, list[str]]:
    """(method, the other arguments); the method comes from ``--method`` or the ``method:`` key of the ``--config``
    YAML (both: they must agree). Without ``--config`` the method's packaged YAML is added (``packaged_config``)."""
    argv = list(argv)
    path = config_path(argv, "a train YAML file (see infifpo/trainers/configs/)")
    in_yaml = yaml_mapping(path).get("method") if path else None
    if "--method" in argv:
        i = argv.index("--method")
        method, argv = (argv[i + 1] if i + 1 < len(argv) else ""), argv[:i] + argv[i + 2:]
        if in_yaml is not None and in_yaml != method:
            raise ConfigError(f"--method {method!r} but {path} says method: {in_yaml!r}; drop one of them.")
    elif in_yaml is not None:
        method = str(in_yaml)
    elif "-h" in argv or "--help" in argv:
        print(f"usage: infifpo train --method {{{','.join(METHODS)}}} [--config FILE] [--key value ...]\n\n"
              "Trains with TRL (TrlParser: YAML keys and --flags are fields of the method's config classes; flags "
              "win).\nWithout --config the method's packaged YAML (infifpo/trainers/configs/<method>.yaml) is used.\n"
              "`infifpo train --method M --help` lists every option of method M with its help.")
        raise SystemExit(0)
    else:
        raise ConfigError(f"`infifpo train` needs --method, one of {list(METHODS)} (or a `method:` key in its "
                          "--config YAML).")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {list(METHODS)}.{suggest(method, METHODS)}")
    if path is None:
        argv += ["--config", str(packaged_config(method))]
    return method, argv


def check_dataset_name(name: str) -> None:
    """ConfigError unless ``name`` is an existing path or looks like a hub dataset id (org/name)."""
    path = Path(os.path.expanduser(name))
    if path.exists() or (_HUB_ID.match(name) and not name.startswith((".", "~")) and path.suffix != ".jsonl"):
        return
    raise ConfigError(f"dataset_name {name!r} does not exist (as {str(path.absolute())!r}); give a scored-pairs "
                      "(opd: prompts) stage output directory, a .jsonl file or a hub dataset id (org/name).")


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-N`` directory of ``output_dir`` with the highest N that is complete (its trainer_state.json,
    which the Trainer writes last, exists); None when there is none. Incomplete ones (killed mid-save) are logged."""
    root = Path(output_dir)
    found = sorted(((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ())
                    if p.is_dir() and (m := _CHECKPOINT.match(p.name))), reverse=True)
    for _, path in found:
        if (path / "trainer_state.json").is_file():
            return path
        logger.warning("%s is incomplete (no trainer_state.json: the run stopped while saving it); skipped", path)
    return None


def resume_checkpoint(value: Any, output_dir: str) -> str | None:
    """The checkpoint directory ``--resume_from_checkpoint`` names: ``true`` (or ``latest``) is the latest complete
    ``checkpoint-N`` in ``output_dir``; a path must be a Trainer checkpoint; None / false / empty: no resume.
    Raises ConfigError naming what is missing."""
    if value is None or value is False:
        return None
    text = str(value).strip()
    if text.lower() in ("", "false", "no", "none"):
        return None
    if value is True or text.lower() in ("true", "yes", "latest"):
        last = latest_checkpoint(output_dir)
        if last is None:
            raise ConfigError(f"--resume_from_checkpoint {text}: no complete checkpoint-N directory in output_dir "
                              f"{output_dir!r} to resume from. Set save_strategy/save_steps so runs save "
                              "checkpoints, pass a checkpoint path, or drop the flag to start from step 0.")
        return str(last)
    path = Path(os.path.expanduser(text))
    if not path.is_dir():
        raise ConfigError(f"--resume_from_checkpoint {text!r} does not exist; pass a checkpoint-N directory "
                          f"(or `true` for the latest one in output_dir {output_dir!r}).")
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"--resume_from_checkpoint {text!r} is not a complete Trainer checkpoint (no "
                          "trainer_state.json); pass a checkpoint-N directory or `true` for the latest one.")
    return str(path)


def parse(argv: list[str]) -> tuple[str, Any, Any, Any]:
    """(method, script args, trainer config, ModelConfig) from argv; CPU precision defaults applied before YAML/CLI.

    ``script`` also carries ``chat_template_path`` (from ``ChatTemplateArguments``, or the SFT config's own key);
    ``train_args.resume_from_checkpoint`` comes back resolved to a checkpoint directory (or None)."""
    from trl import ModelConfig, TrlParser

    method, rest = _split_method(argv)
    config_class = _config_class(method)
    has_template_key = any(f.name == "chat_template_path" for f in dataclasses.fields(config_class))
    types = (TrainScriptArguments, config_class, ModelConfig, *(() if has_template_key else (ChatTemplateArguments,)))
    check_yaml_keys(rest, types, extra=("env", "method"))
    parser = TrlParser(types)
    parser.error = raise_config_error  # argparse's usage-and-exit becomes one ConfigError line
    if not torch.cuda.is_available():  # defaults only: YAML and CLI values still win
        parser.set_defaults(use_cpu=True, bf16=cpu_supports_bf16())
    try:
        *parsed, _, unknown = parser.parse_args_and_config(rest, return_remaining_strings=True,
                                                           separate_remaining_strings=True)
    except ValueError as e:  # TRL's own checks of the YAML (`env` not a mapping, ...) and of config values
        if isinstance(e, InfiFPOError):
            raise
        raise ConfigError(" ".join(str(e).split())) from None
    if unknown:
        raise unknown_flags_error(parser, unknown, "infifpo train --method M --help")
    script, train_args, model_args = parsed[:3]
    script.chat_template_path = (parsed[3] if len(parsed) > 3 else train_args).chat_template_path
    if script.dataset_name is None:
        raise ConfigError("no dataset: set `dataset_name` (a scored-pairs directory, a .jsonl file or a hub name).")
    check_dataset_name(script.dataset_name)
    if model_args.model_name_or_path is None:
        raise ConfigError("no model: set `model_name_or_path` (a local directory, a packaged name or a hub id).")
    if script.chat_template_path and not Path(os.path.expanduser(script.chat_template_path)).exists():
        raise ConfigError(f"chat_template_path {script.chat_template_path!r} does not exist; give a Jinja file or a "
                          "tokenizer directory.")
    train_args.resume_from_checkpoint = resume_checkpoint(train_args.resume_from_checkpoint, train_args.output_dir)
    return method, script, train_args, model_args


def resolve_model_path(name: str, *, revision: str | None, trust_remote_code: bool) -> str:
    """A local path for ``name`` via ``infifpo.models.resolve_model`` when that module exists, else ``name``."""
    try:
        from infifpo.models.resolve import resolve_model
    except ImportError:
        return name
    return resolve_model(name, revision=revision, trust_remote_code=trust_remote_code)


def quantization_config(model_args: Any) -> Any:
    """bitsandbytes config from ModelConfig; 4-bit is NF4 with float32 compute on CPU (bf16 drops LoRA grads there)."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = model_args.dtype if torch.cuda.is_available() and model_args.dtype not in (None, "auto") else "float32"
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                              bnb_4bit_compute_dtype=getattr(torch, compute),
                              bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant)


def prepare_rows(method: str, dataset: Any) -> Any:
    """The columns each method trains on: SFT prompt/completion from (prompt, chosen); stock DPO drops score columns.

    Rows are first checked by the validator every method uses (``data.validate_preference_rows``): an empty or
    whitespace-only SFT target or DPO response, or chosen == rejected, is a DataFormatError naming the row (TRL's
    SFTConfig / DPOConfig have no skip_invalid_rows). InfiFPO / WRPO validate in their own ``_prepare_dataset``.
    """
    from infifpo.trainers.data import validate_preference_rows

    sft_target = next((c for c in ("chosen", "completion", "messages") if c in dataset.column_names), None)
    responses = {"dpo": ("chosen", "rejected"), "sft": (sft_target,) if sft_target else ()}.get(method, ())
    if responses:
        validate_preference_rows(dataset, responses=responses, length_normalize=False, sources=False, ref=False)
    if method == "sft" and "chosen" in dataset.column_names:
        keep = [c for c in ("prompt", "chosen") if c in dataset.column_names]
        dataset = dataset.select_columns(keep)
        return dataset.rename_column("chosen", "completion") if "prompt" in keep else dataset.rename_column(
            "chosen", "messages")
    if method == "dpo":
        return dataset.select_columns([c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names])
    if method == "opd" and "prompt" in dataset.column_names:
        return dataset.select_columns(["prompt"])
    return dataset


def is_conversational(dataset: Any) -> bool:
    """Whether the first row holds chat messages (lists of {role, content}) that need a chat template."""
    if len(dataset) == 0:
        return False
    row = dataset[0]
    return any(isinstance(row.get(c), list) for c in ("prompt", "chosen", "completion", "messages"))


def apply_chat_template_path(tokenizer: Any, path: str | None, *, method: str) -> None:
    """Give ``tokenizer`` the chat template of ``path`` (a Jinja file, or a tokenizer directory); for SFT, TRL's
    SFTTrainer applies its own ``chat_template_path`` and nothing is done here."""
    if not path or method == "sft":
        return
    src = Path(os.path.expanduser(path))
    if src.is_file():
        tokenizer.chat_template = src.read_text()
        return
    from transformers import AutoTokenizer

    template = getattr(AutoTokenizer.from_pretrained(str(src)), "chat_template", None)
    if not template:
        raise ChatTemplateError(f"chat_template_path {path!r}: that tokenizer has no chat template either; give a "
                                "Jinja file.")
    tokenizer.chat_template = template


def require_chat_template(tokenizer: Any, dataset: Any, *, model: str, script: Any) -> None:
    """ChatTemplateError, before any model loads, when conversational rows meet a tokenizer without a template."""
    if getattr(tokenizer, "chat_template", None) or script.chat_template_path or not is_conversational(dataset):
        return
    raise ChatTemplateError(
        f"model {model!r} has no chat template, so its conversational rows cannot be rendered. Pass one: "
        "--chat_template_path FILE.jinja (config key chat_template_path; a tokenizer directory works too), or save "
        "it as chat_template.jinja in the model directory. Packaged base models ship one (infifpo/models/templates).")


def warn_quantised_reference(model_args: Any, dataset: Any, method: str) -> None:
    """One warning line when a 4/8-bit policy trains against reference log-probs scored at full precision."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit) or "ref_chosen_logps" not in dataset.column_names:
        return
    bits = 4 if model_args.load_in_4bit else 8
    logger.warning(
        "%s with load_in_%dbit: the %d-bit policy no longer matches the reference log-probs in the data (ref_*_logps, "
        "scored at full precision by `infifpo score`), so rewards and margins are offset from step 0. To match, "
        "score a dequantised copy of the %d-bit pivot (load it with this quantization, model.dequantize(), "
        "save_pretrained) with `infifpo score --pivot COPY` and train from COPY; or train LoRA without "
        "load_in_%dbit.", method, bits, bits, bits, bits)


def base_model_of(ref: str, _depth: int = 0) -> str | None:
    """The hub id model ``ref`` comes from, for a model card's ``base_model``: a packaged name's original model, a
    hub id itself, and for a directory: the packaged model it materialises, the base of the model an `infifpo
    train` output was trained from (its resolved config), or the ``base_model`` of its model card. None if unknown."""
    from infifpo.models.packaged import PACKAGED
    from infifpo.models.resolve import MARKER

    if ref in PACKAGED:
        return PACKAGED[ref].get("base_model")
    path = Path(os.path.expanduser(str(ref)))
    if path.is_dir():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            if (path / MARKER).is_file():
                return PACKAGED[json.loads((path / MARKER).read_text())["name"]].get("base_model")
            if (path / RESOLVED_CONFIG).is_file() and _depth < 8:
                parent = yaml.safe_load((path / RESOLVED_CONFIG).read_text())["model_name_or_path"]
                if parent and Path(os.path.expanduser(str(parent))).resolve() != path.resolve():
                    return base_model_of(str(parent), _depth + 1)
            if (path / "README.md").is_file():
                head = (path / "README.md").read_text().split("---")
                found = (yaml.safe_load(head[1]) or {}).get("base_model") if len(head) > 2 else None
                return found[0] if isinstance(found, list) and found else found or None
        return None
    return ref if _HUB_ID.match(str(ref)) and not str(ref).startswith((".", "~")) else None


def install_model_card(trainer: Any, *, method: str, model: str, data: str, pool: list[str]) -> None:
    """Make the card TRL writes (``create_model_card``, at every checkpoint save and at the end of `infifpo train`)
    name the real base model (``base_model_of``: TRL's own is None for a local directory) and end with what
    infifpo trained: method, model, source pool and data."""
    original = trainer.create_model_card
    base = base_model_of(model)

    def create_model_card(model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        if not trainer.is_world_process_zero():
            return
        config = trainer.model.config
        saved = getattr(config, "_name_or_path", "")
        config._name_or_path = base or ""  # TRL reads the base model from here, and drops a local directory
        try:
            original(model_name=model_name, dataset_name=dataset_name, tags=tags)
        finally:
            config._name_or_path = saved
        card = Path(trainer.args.output_dir) / "README.md"
        if not card.is_file():
            return
        text = card.read_text().replace('model="None"', f'model="{trainer.args.output_dir}"')  # no hub_model_id
        if base is None:
            text = text.replace("a fine-tuned version of [None](https://huggingface.co/None)",
                                f"a fine-tuned version of the local model `{model}`")
        lines = ["", "## infifpo", "", f"- method: `{method}` (`infifpo train --method {method}`)",
                 f"- trained from: `{model}`" + (f" (base model [{base}](https://huggingface.co/{base}))" if base
                                                   else ""),
                 f"- data: `{data}`"]
        if pool:
            lines.append(f"- source models fused: {', '.join(f'`{m}`' for m in pool)}")
        from infifpo.models.packaged import PACKAGED

        packaged = [m for m in (model, *pool) if m in PACKAGED]
        if packaged:
            lines.append(f"- packaged models ({', '.join(packaged)}) are 4-bit GGUF quantisations dequantised to "
                         "float32 (`infifpo models list`), not the original weights")
        card.write_text(text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")

    trainer.create_model_card = create_model_card


def source_pool(dataset: Any, train_args: Any) -> list[str]:
    """The source models fused: the rows' ``source_models`` (scored pairs) or the OPD teachers, in first-seen order."""
    names: list[str] = []
    if "source_models" in dataset.column_names:
        for row in dataset["source_models"]:
            names += [m for m in row or () if m not in names]
    for teacher in getattr(train_args, "teacher_models", None) or ():
        if isinstance(teacher, str) and teacher not in names:
            names.append(teacher)
    return names


def load_dataset_checked(script: Any, split: str) -> Any:
    """``load_preference_dataset``, with a hub-loading failure of a name that is no local path as a ConfigError."""
    from infifpo.trainers.data import load_preference_dataset

    try:
        return load_preference_dataset(script.dataset_name, split=split, hub_split=script.dataset_train_split)
    except InfiFPOError:
        raise
    except Exception as e:
        if Path(os.path.expanduser(script.dataset_name)).exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
        why = "HF_HUB_OFFLINE is set and it is not in the local datasets cache" if offline else (
            f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
        raise ConfigError(f"dataset_name {script.dataset_name!r} is not a local path and could not be loaded as a hub "
                          f"dataset ({why}); give a stage output directory or a .jsonl file.") from e


def held_out_rows(script: Any, train_args: Any, raw: Any, split: str) -> tuple[Any, Any]:
    """(training rows, held-out rows or None): ``eval_dataset_name``, else ``eval_fraction`` of the training rows
    (removed from them), else a hub dataset's ``dataset_test_split`` when ``eval_strategy`` is set. ConfigError when
    evaluation is asked for and none of these gives rows."""
    evaluating = str(getattr(train_args.eval_strategy, "value", train_args.eval_strategy)) != "no"
    if not 0.0 <= script.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {script.eval_fraction}.")
    if script.eval_dataset_name:
        if script.eval_fraction:
            raise ConfigError("give eval_dataset_name or eval_fraction, not both.")
        check_dataset_name(script.eval_dataset_name)
        held = dataclasses.replace(script, dataset_name=script.eval_dataset_name,
                                   dataset_train_split=script.dataset_test_split)
        return raw, load_dataset_checked(held, split)
    if script.eval_fraction:
        n_eval = max(1, round(len(raw) * script.eval_fraction))
        if n_eval >= len(raw):
            raise ConfigError(f"eval_fraction {script.eval_fraction} of {len(raw)} training rows leaves none to train "
                              "on; lower it or give eval_dataset_name.")
        parts = raw.train_test_split(test_size=n_eval, shuffle=True, seed=train_args.seed)
        return parts["train"], parts["test"]
    if not evaluating:
        return raw, None
    if not Path(os.path.expanduser(script.dataset_name)).exists():
        held = dataclasses.replace(script, dataset_train_split=script.dataset_test_split)
        return raw, load_dataset_checked(held, split)
    raise ConfigError(f"eval_strategy {train_args.eval_strategy.value!r} needs held-out rows: give --eval_fraction "
                      "0.1 (held out from the training rows) or --eval_dataset_name FILE (same format as "
                      "dataset_name).")


def build_trainer(method: str, script: Any, train_args: Any, model_args: Any) -> Any:
    """The TRL (or infifpo) trainer for ``method``, with the model passed as a path so TRL applies quantization.

    Order: the data, then the tokenizer and its chat template, then the model: a user mistake in the first two is
    reported before a model is resolved or loaded."""
    from transformers import AutoTokenizer
    from trl import get_peft_config

    split = script.pipeline_split or ("sft" if method == "sft" else "po")
    raw = load_dataset_checked(script, split)
    raw, eval_raw = held_out_rows(script, train_args, raw, split)
    dataset = prepare_rows(method, raw)
    eval_dataset = prepare_rows(method, eval_raw) if eval_raw is not None else None
    revision = None if model_args.model_revision in (None, "main") else model_args.model_revision
    path = resolve_model_path(model_args.model_name_or_path, revision=revision,
                              trust_remote_code=train_args.trust_remote_code)
    train_args.model_init_kwargs = {
        "revision": model_args.model_revision, "dtype": model_args.dtype or "float32",
        "attn_implementation": model_args.attn_implementation, "trust_remote_code": train_args.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                              trust_remote_code=train_args.trust_remote_code)
    apply_chat_template_path(tokenizer, script.chat_template_path, method=method)
    require_chat_template(tokenizer, dataset, model=model_args.model_name_or_path, script=script)
    warn_quantised_reference(model_args, dataset, method)
    kw = dict(args=train_args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
              peft_config=get_peft_config(model_args), quantization_config=quantization_config(model_args))
    if method == "sft":
        from trl import SFTTrainer as Trainer
    elif method == "dpo":
        from trl import DPOTrainer as Trainer
    elif method == "infifpo":
        from infifpo.trainers.infifpo import InfiFPOTrainer as Trainer
    elif method == "opd":
        from infifpo.trainers.opd import FusedDistillationTrainer as Trainer
    else:
        from infifpo.trainers.wrpo import WRPOTrainer as Trainer
    trainer = Trainer(path, **kw)
    install_model_card(trainer, method=method, model=model_args.model_name_or_path, data=script.dataset_name,
                       pool=source_pool(raw, train_args))
    return trainer


def save_resolved_config(method: str, script: Any, train_args: Any, model_args: Any) -> Path:
    """Write every resolved field (defaults < YAML < CLI) to ``output_dir/infifpo_train_config.yaml``."""
    resolved = {"method": method, **dataclasses.asdict(script), **train_args.to_dict(),
                **dataclasses.asdict(model_args), "chat_template_path": getattr(script, "chat_template_path", None)}
    out = Path(train_args.output_dir) / RESOLVED_CONFIG
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(json.loads(json.dumps(resolved, default=str)), sort_keys=True))
    return out


def precision_name(train_args: Any) -> str:
    """"bf16" | "fp16" | "fp32": what the trainer computed in (TrainingArguments.mixed_precision, else the flags)."""
    mixed = getattr(train_args, "mixed_precision", None)
    if mixed in ("bf16", "fp16"):
        return mixed
    return "bf16" if train_args.bf16 else "fp16" if train_args.fp16 else "fp32"


def write_train_log(trainer: Any, method: str, *, setup_s: float, train_runtime_s: float) -> Path:
    """Write ``output_dir/infifpo_train_log.json`` (docs/formats.md "Train log"); call on the main process only."""
    args = trainer.args
    world = int(trainer.accelerator.num_processes)
    log = {"method": method, "log_history": trainer.state.log_history, "train_runtime_s": float(train_runtime_s),
           "setup_s": float(setup_s), "world_size": world, "num_train_rows": len(trainer.train_dataset),
           "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
           "max_steps": int(trainer.state.max_steps), "precision": precision_name(args)}
    out = Path(args.output_dir) / TRAIN_LOG
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(log, indent=1, default=float))
    return out


def train_and_save(trainer: Any, method: str, script: Any, train_args: Any, model_args: Any, *,
                   started: float) -> None:
    """Train and save ``trainer``; the main process writes the resolved config and the train log.

    ``started`` is the ``time.perf_counter()`` at the start of the command: ``setup_s`` counts from there.
    """
    if trainer.is_world_process_zero():
        logger.info("resolved config written to %s", save_resolved_config(method, script, train_args, model_args))
    train_start = time.perf_counter()
    resume = train_args.resume_from_checkpoint  # a checkpoint directory, resolved by ``parse``, or None
    if resume:
        logger.info("resuming from %s (weights, optimizer, scheduler, RNG and data position)", resume)
    trainer.train(resume_from_checkpoint=resume or None)
    train_runtime = time.perf_counter() - train_start
    trainer.save_model(train_args.output_dir)  # every rank: ZeRO-3 / FSDP gather the shards collectively
    if trainer.is_world_process_zero():
        trainer.create_model_card(model_name=Path(train_args.output_dir).name)
        path = write_train_log(trainer, method, setup_s=train_start - started, train_runtime_s=train_runtime)
        logger.info("train log written to %s", path)
    close_process_group()


def close_process_group() -> None:
    """Tear the process group down once every rank has saved: a barrier (no rank leaves while another still writes),
    then destroy. A gloo group left to interpreter shutdown can abort a rank ("terminate called without an active
    exception", SIGABRT) after all work is saved. Only on success: a failed rank must not wait in a barrier for
    ranks that are blocked in a collective; it leaves through ``exit_rank`` and torchrun stops the others."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a rank of a multi-process run now with ``code``, without the interpreter's teardown: run the atexit
    callbacks (logging, trackers, temporary files), flush stdout / stderr, ``os._exit``.

    Why: PyTorch's gloo ProcessGroup destructor joins its work thread while holding the GIL, and that thread needs
    the GIL to free the tensors of the last collectives it still holds (the metrics allgather before the final
    barrier). The destructor runs when the DDP model (whose Reducer owns the group) is freed, e.g. when the trainer
    is dropped after ``run`` returns; on 2 CPU cores it deadlocked about 1 run in 10 (rank 1 had saved the model and
    the log and sat in ``~ProcessGroupGloo`` -> ``std::thread::join``, its gloo thread in ``take_gil``, while
    torchrun waited for it). ``run_rank`` keeps the trainer (or the failure, whose traceback holds it) in ``_KEPT``
    and nothing is freed here, so nothing can deadlock."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def run_rank(method: str, script: Any, train_args: Any, model_args: Any, *, started: float) -> int:
    """``run`` in a rank of a multi-process run; returns its exit code, printing a failure's traceback as the
    interpreter would. SIGUSR1 prints every thread's stack (the launcher sends it to a rank that does not exit:
    ``launch.run_launcher``)."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        _KEPT.append(run(method, script, train_args, model_args, started=started))
    except SystemExit as e:
        _KEPT.append(e)
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt as e:  # infifpo.cli's Stopped (SIGTERM / SIGINT from torchrun or the launcher)
        _KEPT.append(e)
        print(f"infifpo train, rank {os.environ.get('RANK', '?')}: {e}", file=sys.stderr)
        return 128 + int(getattr(e, "signum", signal.SIGINT))
    except BaseException as e:
        _KEPT.append(e)
        traceback.print_exc()
        return 1
    return 0


def run(method: str, script: Any, train_args: Any, model_args: Any, *, started: float | None = None) -> Any:
    """Build the trainer, train, save, write the logs (``train_and_save``); returns the trainer."""
    started = time.perf_counter() if started is None else started
    trainer = build_trainer(method, script, train_args, model_args)
    train_and_save(trainer, method, script, train_args, model_args, started=started)
    return trainer


class _DropRecords(logging.Filter):
    """Drops log records whose message (format string) starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def silence_noise() -> None:
    """Filter the ``NOISE`` records (those messages only, on those loggers); idempotent. Call before TRL imports."""
    for name, start in NOISE:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and start in f.starts for f in log.filters):
            log.addFilter(_DropRecords((start,)))


def report_error(error: InfiFPOError) -> int:
    """Print a named error as one stderr line (its traceback first when ``INFIFPO_DEBUG=1``); exit code 2."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(error)
    print(f"infifpo train: {type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of `infifpo train`; returns a process exit code (2: a named error, printed as one line)."""
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    silence_noise()
    try:
        launch, argv = split_launch_args(list(sys.argv[1:] if argv is None else argv))
        if launch and in_launched_process():
            logger.warning("already inside a launched process: ignoring %s", launch)
            launch = {}
        method, script, train_args, model_args = parse(argv)
        if launch:
            return relaunch(launch, argv, train_args)
    except InfiFPOError as e:
        return report_error(e)
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:  # a rank of several (torchrun sets WORLD_SIZE in each) leaves
        exit_rank(run_rank(method, script, train_args, model_args, started=started))  # without the teardown
    try:
        run(method, script, train_args, model_args, started=started)
    except InfiFPOError as e:
        return report_error(e)
    return 0
