"""`infifpo train --method sft|dpo|infifpo|wrpo|opd --config FILE [--key value ...]`: parse, build, train, save.

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
Every run writes ``output_dir/infifpo_train_log.json`` (CONTRACTS.md §1) from the main process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

from infifpo.schema import ConfigError
from infifpo.trainers.launch import in_launched_process, relaunch, split_launch_args

logger = logging.getLogger(__name__)
METHODS = ("sft", "dpo", "infifpo", "wrpo", "opd")
RESOLVED_CONFIG = "infifpo_train_config.yaml"
TRAIN_LOG = "infifpo_train_log.json"
_KEPT: list[Any] = []  # what a rank must not free before it exits (the trainer, a failure): ``exit_rank``


@dataclass
class TrainScriptArguments:
    """Where the training rows come from."""

    dataset_name: str | None = field(default=None, metadata={
        "help": "Scored-pairs stage output directory, a .jsonl file, or a hub dataset name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a hub dataset to load."})
    pipeline_split: str | None = field(default=None, metadata={
        "help": "Rows kept by the pipeline's `split` column; default 'sft' for --method sft, else 'po'."})


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
    """Whether this CPU runs bf16 matmuls natively (oneDNN AVX512-BF16 / AMX); emulated bf16 is slower than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _split_method(argv: list[str]) -> tuple[str, list[str]]:
    argv = list(argv)
    if "--method" not in argv:
        raise ConfigError(f"`infifpo train` needs --method, one of {list(METHODS)}.")
    i = argv.index("--method")
    method = argv[i + 1] if i + 1 < len(argv) else ""
    if method not in METHODS:
        close = difflib.get_close_matches(method, METHODS, n=1)
        raise ConfigError(f"--method {method!r} is not one of {list(METHODS)}."
                          + (f" Did you mean {close[0]!r}?" if close else ""))
    return method, argv[:i] + argv[i + 2:]


def check_yaml_keys(argv: list[str], dataclass_types: tuple[type, ...]) -> None:
    """Raise ConfigError with a did-you-mean for every YAML key that is not a field of the config dataclasses."""
    if "--config" not in argv:
        return
    with open(argv[argv.index("--config") + 1]) as f:
        config = yaml.safe_load(f) or {}
    known = {fl.name for t in dataclass_types for fl in dataclasses.fields(t)} | {"env"}
    unknown = sorted(set(config) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown key(s) in {argv[argv.index('--config') + 1]}: {', '.join(hints)}. Keys must be "
                          f"fields of {', '.join(t.__name__ for t in dataclass_types)}.")


def parse(argv: list[str]) -> tuple[str, Any, Any, Any]:
    """(method, script args, trainer config, ModelConfig) from argv; CPU precision defaults applied before YAML/CLI."""
    from trl import ModelConfig, TrlParser

    method, rest = _split_method(argv)
    types = (TrainScriptArguments, _config_class(method), ModelConfig)
    check_yaml_keys(rest, types)
    parser = TrlParser(types)
    if not torch.cuda.is_available():  # defaults only: YAML and CLI values still win
        parser.set_defaults(use_cpu=True, bf16=cpu_supports_bf16())
    script, train_args, model_args = parser.parse_args_and_config(rest)
    if script.dataset_name is None:
        raise ConfigError("no dataset: set `dataset_name` (a scored-pairs directory, a .jsonl file or a hub name).")
    if model_args.model_name_or_path is None:
        raise ConfigError("no model: set `model_name_or_path` (a local directory, a packaged name or a hub id).")
    return method, script, train_args, model_args


def resolve_model_path(name: str, *, revision: str | None, trust_remote_code: bool) -> str:
    """A local path for ``name`` via ``infifpo.models.resolve_model`` when that module exists, else ``name``."""
    try:
        from infifpo.models import resolve_model
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


def build_trainer(method: str, script: Any, train_args: Any, model_args: Any) -> Any:
    """The TRL (or infifpo) trainer for ``method``, with the model passed as a path so TRL applies quantization."""
    from transformers import AutoTokenizer
    from trl import get_peft_config

    from infifpo.trainers.data import load_preference_dataset

    path = resolve_model_path(model_args.model_name_or_path, revision=model_args.model_revision,
                              trust_remote_code=train_args.trust_remote_code)
    train_args.model_init_kwargs = {
        "revision": model_args.model_revision, "dtype": model_args.dtype or "float32",
        "attn_implementation": model_args.attn_implementation, "trust_remote_code": train_args.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                              trust_remote_code=train_args.trust_remote_code)
    split = script.pipeline_split or ("sft" if method == "sft" else "po")
    dataset = prepare_rows(method, load_preference_dataset(script.dataset_name, split=split,
                                                           hub_split=script.dataset_train_split))
    kw = dict(args=train_args, train_dataset=dataset, processing_class=tokenizer,
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
    return Trainer(path, **kw)


def save_resolved_config(method: str, script: Any, train_args: Any, model_args: Any) -> Path:
    """Write every resolved field (defaults < YAML < CLI) to ``output_dir/infifpo_train_config.yaml``."""
    resolved = {"method": method, **dataclasses.asdict(script), **train_args.to_dict(),
                **dataclasses.asdict(model_args)}
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
    """Write ``output_dir/infifpo_train_log.json`` (CONTRACTS.md §1); call on the main process only."""
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
    trainer.train()
    train_runtime = time.perf_counter() - train_start
    trainer.save_model(train_args.output_dir)  # every rank: ZeRO-3 / FSDP gather the shards collectively
    if trainer.is_world_process_zero():
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `infifpo train`; returns a process exit code."""
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        launch, argv = split_launch_args(list(sys.argv[1:] if argv is None else argv))
        if launch and in_launched_process():
            logger.warning("already inside a launched process: ignoring %s", launch)
            launch = {}
        method, script, train_args, model_args = parse(argv)
        if launch:
            return relaunch(launch, argv, train_args)
    except ConfigError as e:
        print(f"infifpo train: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:  # a rank of several (torchrun sets WORLD_SIZE in each) leaves
        exit_rank(run_rank(method, script, train_args, model_args, started=started))  # without the teardown
    run(method, script, train_args, model_args, started=started)
    return 0
