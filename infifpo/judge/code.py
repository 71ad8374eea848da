"""Code answer checking: extract the program from a chat answer and run it against HumanEval-style tests, sandboxed.

Owns: program extraction from fenced / unfenced chat answers (users.md J7), assembling program + tests +
``check(entry_point)``, and the pass/fail verdict (a crash, timeout, non-zero exit or missing pass marker is a
fail, J9). Does not own: isolation and limits (`sandbox`), or where tests come from (`prompts`).

Known limit: tests run in the same interpreter as the model's code (as in HumanEval), so code written to subvert
the harness itself (reading its own file for the pass marker, patching builtins) is out of scope; the sandbox
keeps such code from harming anything outside its run.
"""

from __future__ import annotations

import keyword
import re
import secrets
from dataclasses import dataclass

from infifpo.judge.sandbox import SandboxResult, run_sandboxed

_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([^\n`]*)\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = {"python", "py", "python3", "py3", "pycon", "ipython"}
_TAG_RE = re.compile(r"[A-Za-z][\w+#.-]{0,19}")
_CODE_START_RE = re.compile(r"^(?:def |class |import |from |@|async def )", re.MULTILINE)


@dataclass(frozen=True)
class CodeVerdict:
    """The outcome of one code check: passed, a reason ("passed", "no code found", "exit code 1: AssertionError",
    "timeout after 10 s (wall clock)", ...), the program that ran (None if none), and the raw sandbox result."""

    passed: bool
    reason: str
    program: str | None = None
    result: SandboxResult | None = None


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag or "", code) for every fenced block; an unterminated last fence runs to the end of the text."""
    blocks = []
    for m in _FENCE_RE.finditer(text):
        info, body = m.group(1).strip(), m.group(2)
        if info and not (_TAG_RE.fullmatch(info) and not keyword.iskeyword(info)):
            body = info + "\n" + body  # "```def f():" : code on the fence line, not a language tag
            info = ""
        blocks.append((info.lower(), body))
    return blocks


def extract_program(completion: str, entry_point: str | None = None) -> str | None:
    """The Python program in a chat answer, or None if there is none.

    Fenced blocks tagged python (or untagged) are candidates; blocks tagged with another language (bash, text,
    output, ...) are skipped. With ``entry_point``, the last candidate defining it wins, else all candidates are
    joined; without, the longest candidate. With no fence, the answer from its first code-looking line on.
    """
    text = completion.replace("\r\n", "\n").replace("\r", "\n")
    blocks = _fenced_blocks(text)
    if blocks:
        candidates = [body for tag, body in blocks if tag in _PYTHON_TAGS or tag == ""]
        if not candidates:
            return None
        if entry_point:
            defining = [b for b in candidates if re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(",
                                                               b, re.MULTILINE)]
            program = defining[-1] if defining else "\n\n".join(candidates)
        else:
            program = max(candidates, key=len)
        return program.strip("\n") or None
    start = _CODE_START_RE.search(text)
    program = text[start.start() :] if start else text
    return program.strip("\n") or None


def build_test_program(program: str, test_code: str, entry_point: str | None, marker: str) -> str:
    """program + tests (+ ``check(entry_point)`` for HumanEval-style tests) + a final pass marker print."""
    parts = [program, test_code]
    if entry_point:
        parts.append(f"check({entry_point})")
    parts.append(f"print({marker!r}, flush=True)")
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def judge_code(
    completion: str, test_code: str, entry_point: str | None = None, timeout: float = 10.0, *, prefix: str = ""
) -> CodeVerdict:
    """Run the program in ``completion`` with ``test_code`` in the sandbox; passed only on a clean, complete run.

    ``prefix`` (e.g. the HumanEval prompt's imports) is prepended to the extracted program. ``timeout`` is wall
    seconds. Raises SandboxUnavailableError if the sandbox cannot isolate the run.
    """
    program = extract_program(completion, entry_point)
    if program is None:
        return CodeVerdict(False, "no code found")
    # A random marker printed after the tests: a program that calls exit(0) early must not count as passing.
    marker = f"INFIFPO-TESTS-PASSED-{secrets.token_hex(8)}"
    full = build_test_program(prefix + program, test_code, entry_point, marker)
    result = run_sandboxed(full, timeout=timeout)
    if result.ok and marker in result.stdout:
        return CodeVerdict(True, "passed", full, result)
    reason = result.reason if not result.ok else "exited before the tests finished"
    return CodeVerdict(False, reason, full, result)


def check_code(completion: str, test_code: str, entry_point: str | None = None, timeout: float = 10.0) -> bool:
    """Whether the program in ``completion`` passes ``test_code`` in the sandbox (see ``judge_code`` for why not)."""
    return judge_code(completion, test_code, entry_point, timeout).passed
