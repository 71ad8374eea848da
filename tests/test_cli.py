"""The `infifpo` entry point: dispatch, unknown commands, env report."""

import subprocess
import sys

from infifpo import cli
from infifpo.env import check_stack


def test_every_command_points_at_an_importable_module_with_main():
    import importlib

    for name, (module, _) in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "main", None)), f"{name}: {module}.main missing"


def test_unknown_command_suggests_the_closest(capsys):
    assert cli.main(["scroe"]) == 2
    assert "Did you mean 'score'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "score" in out and "train" in out


def test_console_script_runs_env():
    out = subprocess.run([sys.executable, "-m", "infifpo.cli", "env"], capture_output=True, text=True, check=True)
    assert "trl" in out.stdout and "torch" in out.stdout


def test_installed_stack_is_the_pinned_one():
    assert check_stack() == []


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"infifpo {version('infifpo')}"


def test_train_help_without_a_method_lists_the_methods_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "infifpo.cli", "train", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--method {sft,dpo,infifpo,wrpo,opd}" in proc.stdout and "packaged YAML" in proc.stdout
