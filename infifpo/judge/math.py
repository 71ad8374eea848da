"""Math answer checking: extract the final answer from a model response, compare it with a gold answer via math-verify.

Owns: final-answer extraction (docs/bad-inputs.md J1-J5) and the strict math-verify comparison, run in helper processes
so that it is safe from any thread and its time limit is always enforced (docs/bad-inputs.md J6). Does not own:
datasets, prompts, or how verdicts are aggregated into preference pairs (`pair`).

Extraction order (the first rule that applies wins; later rules are never consulted):

1. GSM8K ``#### n`` (last occurrence);
2. the last ``\\boxed{...}`` / ``\\fbox{...}``; an unterminated or empty last box is *unparseable*, never a fall-back
   to an earlier box (docs/bad-inputs.md J4);
3. "the answer is X" / "answer: X" (last occurrence);
4. the text after the last "=" (SmolLM2 restates the question: "12 * 7 = 94 ... The answer is 94");
5. the last number in the response.

Numbers are normalised GSM8K-style before comparison: thousands separators (1,000), ``$``, markdown bold
(``**73**``), a trailing period or comma, a sign, a fraction a/b. A clause listing several numbers ("1331 and 1728")
becomes a set, so a prediction giving only one part is wrong (strict set semantics, J3).

Why helper processes: math-verify's own timeout uses SIGALRM, which raises in worker threads and cannot interrupt a
long computation in C. Each check is sent to a small persistent worker (``python -m infifpo.judge.math``); a check
that exceeds its timeout gets its worker killed and is reported as "timeout".
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Reasons of a MathVerdict.
CORRECT, WRONG, UNPARSEABLE, GOLD_UNPARSEABLE, TIMEOUT = (
    "correct", "wrong", "unparseable", "gold_unparseable", "timeout")

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# sign, optional currency, number, optional "/denominator"; not glued to a preceding word or digit.
_NUMBER_RE = re.compile(rf"(?<![\w.])(-)?\s*\\?\$?\s*(-)?({_NUM})(?:\s*/\s*({_NUM}))?(?![\w])")
_LIST_SEP = r"\s*(?:,\s*and|,|and|&|;)\s*"
# LaTeX, or a one-letter variable next to an operator ("2x+1"); a word next to a hyphen ("cookies - 4") is prose.
_LATEX_HINT_RE = re.compile(r"\\[a-zA-Z]+|\^|_|\{|(?<![A-Za-z])[a-zA-Z]\s*[+\-*/=]|[+\-*/]\s*[a-zA-Z](?![A-Za-z])")
# A word that is neither a LaTeX command nor a function name: prose around an answer ("3/4 of the cake").
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])(?!(?:sin|cos|tan|log|ln|exp|sqrt|pi|mod|max|min)\b)[A-Za-z]{2,}")
_INFIX_RE = re.compile(r"[\w)}]\s*[+\-*/^]\s*[\w(\\{]")  # an operator between two operands (not a sign)
_MATHY_RE = re.compile(r"[\w\s.,+\-*/^()\[\]{}\\=|!<>]+")  # no "$" (currency) and no other prose punctuation
_ANSWER_RE = re.compile(r"answers?\s*(?:is|are|:|=)\s*:?", re.IGNORECASE)
_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\\\((.+?)\\\)|\\\[(.+?)\\\]|\$(.+?)\$", re.DOTALL)


@dataclass(frozen=True)
class MathVerdict:
    """The outcome of one math check.

    correct: whether the response's final answer equals the gold answer.
    extracted: the normalised final answer taken from the response (None when none was found).
    reason: "correct" | "wrong" (an answer was found and differs) | "unparseable" (no usable final answer) |
        "gold_unparseable" (the gold answer itself could not be parsed: a data problem) | "timeout".
    method: which extraction rule produced ``extracted`` ("gsm8k", "boxed", "answer_is", "last_eq", "last_number").
    """

    correct: bool
    extracted: str | None
    reason: str
    method: str | None = None


# -- extraction ----------------------------------------------------------------------------------------------------
def _braced(text: str, start: int) -> str | None:
    """The balanced ``{...}`` content starting at ``text[start] == "{"``; None if it is never closed."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _last_box(text: str) -> str | None:
    """Content of the last \\boxed / \\fbox; None if that box is unterminated or empty (J4: no earlier-box
    fallback)."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    rest = text[idx:]
    after = idx + len(re.match(r"\\(?:boxed|fbox)\s*", rest).group(0))
    if after < len(text) and text[after] == "{":
        content = _braced(text, after)
    else:  # "\boxed 5": a single token
        m = re.match(r"[^\s$]+", text[after:])
        content = m.group(0) if m else None
    return content.strip() if content and content.strip() else None


def _number_text(m: re.Match) -> str:
    """A normalised number from a _NUMBER_RE match: no thousands separators or currency, sign kept, a/b kept."""
    sign = "-" if (m.group(1) or m.group(2)) else ""
    num = m.group(3).replace(",", "")
    den = m.group(4)
    return f"{sign}{num}/{den.replace(',', '')}" if den else f"{sign}{num}"


def normalize_answer(clause: str) -> str | None:
    """The final answer in a short clause ("$1,000.", "**73**", "12 * 7 = 84", "1331 and 1728", "\\frac{1}{2}")."""
    text = clause.replace("**", "").replace("\\!", "").strip().split("\n", 1)[0]
    span = _MATH_SPAN_RE.search(text)
    if span:
        text = next(g for g in span.groups() if g is not None)
    text = re.split(r"\.(?:\s|$)", text.strip(), maxsplit=1)[0].strip()  # one sentence
    if "=" in text:
        lhs, rhs = text.split("=", 1)[0].strip(), text.rsplit("=", 1)[1].strip()
        # "x = 2 + 1 = 3" is an equation in x (compared as one); "12 * 7 = 84" or "Total = 84" restates: keep 84.
        is_variable = re.search(r"[A-Za-z]", lhs) and not re.search(r"(?<![\\A-Za-z])[A-Za-z]{2,}", lhs)
        text = f"{lhs} = {rhs}" if is_variable else rhs
    # \sqrt(2) otherwise parses as "4\\" (docs/bad-inputs.md J1)
    text = re.sub(r"\\sqrt\(([^()]*)\)", r"\\sqrt{\1}", text)
    text = text.replace("\u2212", "-").rstrip(".,;: ").strip()
    if not text:
        return None
    prose = _PROSE_RE.search(text)
    if prose and _LATEX_HINT_RE.search(text[: prose.start()]):
        text, prose = text[: prose.start()].strip(), None  # "\frac{3}{4} of the cake"
    numbers = list(_NUMBER_RE.finditer(text))
    between = [text[a.end() : b.start()] for a, b in zip(numbers, numbers[1:], strict=False)]
    if len(numbers) > 1 and all(re.fullmatch(_LIST_SEP, s) for s in between):
        # multi-part answer: a set (docs/bad-inputs.md J3)
        return "\\{" + ", ".join(_number_text(n) for n in numbers) + "\\}"
    if not prose and (_LATEX_HINT_RE.search(text) or _INFIX_RE.search(text)) and _MATHY_RE.fullmatch(text):
        return text  # an expression ("\frac{1}{2}", "2x+1", "12 * 7"): math-verify parses and evaluates it
    if numbers:
        return _number_text(numbers[0])
    return text if re.fullmatch(r"-?\s*[A-Za-z]", text) else None  # a lone symbol is an answer; prose is not


def extract_answer(response: str) -> tuple[str | None, str | None]:
    """(normalised final answer or None, extraction rule name) per the module docstring's order."""
    text = response.replace("\r\n", "\n")
    gsm = list(re.finditer(r"####\s*([^\n]*)", text))
    if gsm:
        return normalize_answer(gsm[-1].group(1)), "gsm8k"
    if "\\boxed" in text or "\\fbox" in text:
        box = _last_box(text)
        return (normalize_answer(box) if box else None), "boxed"
    answer_is = list(_ANSWER_RE.finditer(text))
    if answer_is:
        found = normalize_answer(text[answer_is[-1].end() :])
        if found is not None:
            return found, "answer_is"
    if "=" in text:
        found = normalize_answer(text.rsplit("=", 1)[1])
        if found is not None and _NUMBER_RE.search(found):
            return found, "last_eq"
    numbers = list(_NUMBER_RE.finditer(text))
    return (_number_text(numbers[-1]), "last_number") if numbers else (None, None)


# -- comparison in helper processes --------------------------------------------------------------------------------
class _Worker:
    """One persistent ``python -m infifpo.judge.math`` process answering JSON-line requests."""

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infifpo.judge.math"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env, bufsize=1,
        )

    def ask(self, request: dict, timeout: float) -> dict | None:
        """Send one request; the reply, or None (and the worker killed) if none came within ``timeout`` seconds."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.kill()
            return None
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


_idle: list[_Worker] = []
_idle_lock = threading.Lock()
_STARTUP_S = 120.0  # first request of a fresh worker also pays for Python + sympy import


def _compare(gold: str, pred: str, timeout: float) -> str:
    """Run one strict comparison in an idle worker; returns a reason (CORRECT, WRONG, ..., TIMEOUT)."""
    with _idle_lock:
        worker = _idle.pop() if _idle else None
    fresh = worker is None
    if fresh:
        worker = _Worker()
        if worker.ask({"ping": True}, _STARTUP_S) is None:
            raise RuntimeError("the math-verify helper process did not start (is math-verify installed?)")
    try:
        reply = worker.ask({"gold": gold, "pred": pred}, timeout)
    except (BrokenPipeError, OSError, ValueError):  # the idle worker died (e.g. killed externally): one fresh retry
        worker.kill()
        return _compare(gold, pred, timeout) if not fresh else UNPARSEABLE
    if reply is None:
        return TIMEOUT
    with _idle_lock:
        _idle.append(worker)
    return reply["reason"]


def judge_math(response: str, gold: str, *, timeout: float = 5.0) -> MathVerdict:
    """Extract the final answer of ``response`` and compare it with ``gold`` (strict math-verify).

    ``timeout``: seconds allowed for parsing and comparing (enforced by killing the helper process).
    Safe to call from any thread.
    """
    extracted, method = extract_answer(response)
    if extracted is None:
        return MathVerdict(False, None, UNPARSEABLE, method)
    gold_answer = normalize_answer(str(gold))
    if gold_answer is None:
        return MathVerdict(False, extracted, GOLD_UNPARSEABLE, method)
    reason = _compare(gold_answer, extracted, timeout)
    return MathVerdict(reason == CORRECT, extracted, reason, method)


def check_math(response: str, gold: str) -> bool:
    """Whether the final answer of ``response`` equals ``gold`` (see ``judge_math`` for the reason when not)."""
    return judge_math(response, gold).correct


# -- the helper process --------------------------------------------------------------------------------------------
def _verify_in_process(gold: str, pred: str) -> str:
    """Strict parse + verify of two normalised answers; runs in the helper's main thread (SIGALRM is allowed)."""
    # Imported here: only the helper process needs math-verify (and sympy), not every importer of this module.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # No math-verify timeouts (SIGALRM): the parent enforces ``timeout`` by killing this process.
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=config, parsing_timeout=None)
    if not gold_parsed:
        return GOLD_UNPARSEABLE
    pred_parsed = parse(f"${pred}$", extraction_config=config, parsing_timeout=None)
    if not pred_parsed:
        return UNPARSEABLE
    ok = verify(gold_parsed, pred_parsed, strict=True, allow_set_relation_comp=False, timeout_seconds=None)
    return CORRECT if ok else WRONG


def _serve() -> None:
    logging.basicConfig(level=logging.ERROR)  # math-verify warns on every timeout=None call; stdout is the protocol
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("ping"):
            import math_verify  # noqa: F401  (import once before answering, so startup is not billed to a check)

            reply = {"reason": "pong"}
        else:
            try:
                reply = {"reason": _verify_in_process(req["gold"], req["pred"])}
            except Exception as e:  # noqa: BLE001  (any math-verify failure is an unparseable answer)
                reply = {"reason": UNPARSEABLE, "error": repr(e)[:200]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
