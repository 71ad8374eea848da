"""Every module imports (torchtune shipped a NameError without this), and fusion.py needs torch only."""

import importlib
import pkgutil
import subprocess
import sys

import infifpo


def _modules():
    return sorted(m.name for m in pkgutil.walk_packages(infifpo.__path__, "infifpo."))


def test_every_module_imports():
    mods = _modules()
    assert "infifpo.fusion" in mods and "infifpo.store" in mods
    for name in mods:
        importlib.import_module(name)


def test_fusion_imports_without_transformers_trl_or_vllm():
    code = (
        "import sys, infifpo.fusion\n"
        "bad = [m for m in ('transformers', 'trl', 'vllm', 'datasets') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_infifpo_is_lazy():
    code = "import sys, infifpo\nassert 'trl' not in sys.modules and 'vllm' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)
