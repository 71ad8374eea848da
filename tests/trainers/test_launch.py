"""`trainers.launch`: the scale-out flags become an `accelerate launch` command that accelerate itself accepts."""

from __future__ import annotations

import sys

import pytest

from infifpo.schema import ConfigError
from infifpo.trainers import launch as launcher


def test_launch_flags_become_an_accelerate_launch_command_accelerate_accepts():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    launch, rest = launcher.split_launch_args(["--method", "wrpo", "--num_processes=2", "--config", "c.yaml"])
    assert launch == {"num_processes": "2"} and rest == ["--method", "wrpo", "--config", "c.yaml"]
    cmd = launcher.accelerate_launch_command(launch, rest, mixed_precision="no")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    # No config: torchrun (--multi_gpu), which on a CPU-only machine gives MULTI_CPU ranks with gloo.
    assert args.multi_gpu and args.num_processes == 2 and args.main_process_port == 0 and args.mixed_precision == "no"
    assert args.module and args.training_script == "infifpo.cli" and args.training_script_args == ["train", *rest]

    launch, rest = launcher.split_launch_args(["--accelerate_config", "ddp", "--method", "infifpo", "--num_processes", "3"])
    cmd = launcher.accelerate_launch_command(launch, rest, mixed_precision="bf16")
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    assert args.config_file == str(launcher.ACCELERATE_CONFIG_DIR / "ddp.yaml") and "--multi_gpu" not in cmd
    assert args.multi_gpu and args.num_processes == 3 and args.mixed_precision == "bf16"  # the train config's, not 'no'


@pytest.mark.parametrize(("argv", "match"), [
    (["--accelerate_config", "zero4"], r"neither a file nor one of \['ddp', 'fsdp2', 'single', 'zero3'\]"),
    (["--accelerate_config", "single", "--num_processes", "2"], "distributed_type NO"),
    (["--num_processes", "two"], "not an integer"),
    (["--num_processes", "0"], "at least 1"),
])
def test_bad_launch_flags_are_config_errors(argv, match):
    launch, rest = launcher.split_launch_args(["--method", "infifpo", *argv])
    with pytest.raises(ConfigError, match=match):
        launcher.accelerate_launch_command(launch, rest, mixed_precision="no")
    with pytest.raises(ConfigError, match="needs a value"):
        launcher.split_launch_args(["--method", "infifpo", "--num_processes"])


@pytest.mark.parametrize(("name", "kind"), [("single", "NO"), ("ddp", "MULTI_GPU"), ("zero3", "DEEPSPEED"),
                                            ("fsdp2", "FSDP")])
def test_shipped_accelerate_configs_load_in_accelerate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(launcher.resolve_accelerate_config(name)))  # unknown keys would raise here
    assert config.distributed_type == kind
    assert config.mixed_precision == "no"  # precision comes from the train config (see the files' comments)
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model writes a full model
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3
