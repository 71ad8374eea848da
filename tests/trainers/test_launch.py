"""`trainers.launch`: the scale-out flags become an `accelerate launch` command that accelerate itself accepts, and
the launch is waited for: a hung rank is killed and named, an interrupt or a SIGKILL of `infifpo train` ends it all."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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

    launch, rest = launcher.split_launch_args(["--accelerate_config", "ddp", "--method", "infifpo",
                                               "--num_processes", "3"])
    cmd = launcher.accelerate_launch_command(launch, rest, mixed_precision="bf16")
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    assert Path(args.config_file).parts[-2:] == ("accelerate_configs", "multi_gpu.yaml") and "--multi_gpu" not in cmd
    assert (args.multi_gpu and args.num_processes == 3
            and args.mixed_precision == "bf16")  # the train config's, not 'no'


@pytest.mark.parametrize(("argv", "match"), [
    (["--accelerate_config", "zero4"], r"neither a file nor one of TRL's shipped configs \['ddp', 'fsdp1', 'fsdp2', "
                                       r"'multi_gpu', 'single', 'single_gpu', 'zero1', 'zero2', 'zero3'\]"),
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
                                            ("fsdp2", "FSDP"), ("zero1", "DEEPSPEED"), ("fsdp1", "FSDP")])
def test_trls_accelerate_configs_load_in_accelerate_and_the_train_precision_wins(name, kind):
    """Names resolve to TRL's shipped configs (as `trl dpo --accelerate_config NAME` does); their mixed_precision
    (bf16) is overridden on the command line by the train config's, so an fp32 run is never autocast."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = load_config_from_file(str(launcher.resolve_accelerate_config(name)))  # unknown keys would raise here
    assert config.distributed_type == kind
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model writes a full model
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3
    launch = {"accelerate_config": name} | ({} if kind == "NO" else {"num_processes": "2"})
    cmd = launcher.accelerate_launch_command(launch, ["--method", "dpo"], mixed_precision="no")
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    assert args.mixed_precision == "no" and args.num_processes == (1 if kind == "NO" else 2)


# A stand-in for `accelerate launch`: starts one process per argument with RANK set (the code it runs), waits for
# all and fails if any failed, as torchrun does.
FAKE_LAUNCHER = (
    "import os, subprocess, sys\n"
    "procs = [subprocess.Popen([sys.executable, '-c', code], env={**os.environ, 'RANK': str(rank)})\n"
    "         for rank, code in enumerate(sys.argv[1:])]\n"
    "sys.exit(0 if all(p.wait() == 0 for p in procs) else 1)\n"
)
SLEEP = "import time; time.sleep(600)"


def _fake_launch(*ranks: str) -> list[str]:
    return [sys.executable, "-c", FAKE_LAUNCHER, *ranks]


def _gone(procs) -> bool:
    return not [p for p in procs if launcher._running(p)]


def _new_descendants(before) -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p not in before and launcher._running(p)]


def test_a_rank_still_running_after_another_exited_is_killed_and_named(capsys):
    """The `make test` hang: rank 1 saved everything and sat in a futex at exit while torchrun waited for it."""
    import psutil

    before = set(psutil.Process().children(recursive=True))
    rc = launcher.run_launcher(_fake_launch("import time; time.sleep(2)", SLEEP), dict(os.environ),
                               rank_exit_timeout_s=1, poll_s=0.2)
    assert rc == 1
    err = capsys.readouterr().err
    assert "rank(s) [1] did not exit within 1 s of rank(s) [0]" in err and "INFIFPO_RANK_EXIT_TIMEOUT_S" in err
    assert not _new_descendants(before)


def test_ranks_that_exit_together_are_left_alone():
    assert launcher.run_launcher(_fake_launch("pass", "import time; time.sleep(0.5)"), dict(os.environ),
                                 rank_exit_timeout_s=30, poll_s=0.2) == 0
    assert launcher.run_launcher(_fake_launch("pass", "raise SystemExit(3)"), dict(os.environ), poll_s=0.2) == 1


def test_an_interrupted_launch_takes_the_launcher_and_every_rank_down():
    """infifpo.cli turns SIGTERM / SIGINT into an exception in the main thread; here, KeyboardInterrupt."""
    import _thread
    import threading

    import psutil

    before = set(psutil.Process().children(recursive=True))
    tree = []
    threading.Timer(2.0, lambda: tree.extend(_new_descendants(before))).start()
    threading.Timer(3.0, _thread.interrupt_main).start()
    with pytest.raises(KeyboardInterrupt):
        launcher.run_launcher(_fake_launch(SLEEP, SLEEP), dict(os.environ), poll_s=0.2)
    assert len(tree) == 3 and _gone(tree)  # the launcher and its two ranks
    assert not _new_descendants(before)


def test_the_launcher_dies_with_infifpo_train_even_when_that_is_sigkilled(tmp_path):
    """Nothing runs in a SIGKILLed process; the launcher gets SIGTERM from the kernel (PR_SET_PDEATHSIG)."""
    import psutil

    pid_file = tmp_path / "launcher.pid"
    fake = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    code = ("import os, sys\nfrom infifpo.trainers import launch\n"
            f"launch.run_launcher([sys.executable, '-c', {fake!r}], dict(os.environ))")
    train = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()):
        assert train.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    child = psutil.Process(int(pid_file.read_text()))
    train.kill()
    train.wait()
    assert not launcher._wait_gone([child], 10), "the launcher outlived the infifpo train that started it"
