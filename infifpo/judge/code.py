"""Code answer checking: extract the program from a chat answer and run it against HumanEval-style tests, sandboxed.

Owns: program extraction from fenced / unfenced chat answers (docs/bad-inputs.md J7), the test harness, and the
pass/fail verdict (a crash, timeout, non-zero exit, early exit or a return value that is not plain data is a fail, J9).
Does not own: isolation and limits (`sandbox`), or where tests come from (`prompts`).

Design: the program and the tests run in two processes inside one sandbox, and the verdict comes from the one the
program cannot touch. The test process (``_HARNESS``, the sandbox's main program) first makes itself undumpable
(``PR_SET_DUMPABLE`` 0: a process of the same uid can then neither ptrace it nor open its /proc memory, fds or
environment), then reads the tests, the entry point and the prompt's imports from a descriptor that no file, no
argument and no other process holds (``run_sandboxed(private_input=...)``), and only then starts the program
process (``_SERVER`` running ``candidate.py`` = prompt imports + extracted program as ``__main__``, stdin
/dev/null). The tests run in the test process, in a namespace holding the prompt's imports and, for each name the
tests use that the program defines (builtins and dunder names excepted), a stand-in: a function proxy, a
standard-library module imported again by name in the test process, or a plain value. Each call crosses a pipe:
arguments and results travel as tagged JSON of plain data (None, bool, int, float, complex, str, bytes,
bytearray, list, tuple, dict, set, frozenset; subclasses of these are sent as their base type) and the test
process rebuilds them with its own strict decoder, so every comparison in the tests is between genuine built-in
values: an object whose ``__eq__`` always says yes is refused ("returned an object of type ..."), an ``int``
subclass arrives as its plain value. An exception in the program arrives as the same built-in exception type
(others as ``CandidateError``), so ``try/except`` in tests works. The pass verdict is the line "passed" that the
test process writes, after ``check(entry_point)`` returned, to its report descriptor (``run_sandboxed(
report=True)``), which the program process never holds; nothing the program prints, exits with or reads (its own
file holds no marker, the tests are in no file) can produce it.

Not caught (also docs/judges.md): helpers and constants the tests use that the program defines are the program's
own (e.g. HumanEval/32 ``poly``, 38 ``encode_cyclic``, 50 ``encode_shift``: a program may redefine them);
arguments are copies, so a test that checks in-place mutation of an argument sees none; results that are not
plain data (a generator, a class instance, a Fraction) fail even where the tests would accept them; tests that
pass non-plain arguments (functions, objects) fail; a program that special-cases the visible examples or the test
inputs it receives (hard-coding) passes what it hard-codes; weak tests (e.g. float tolerance, few cases) pass weak
code; the proxies' timing and call order are visible to the program. Resource limits and isolation are the
sandbox's.
"""

from __future__ import annotations

import json
import keyword
import re
from dataclasses import dataclass

from infifpo.judge.sandbox import SandboxResult, run_sandboxed
from infifpo.schema import SandboxUnavailableError

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


# Shared by both processes: plain data <-> tagged JSON. ``decode`` accepts nothing else (no JSON floats, no unknown
# tags), so whatever the program process sends, the test process gets built-in values or an error.
_CODEC = r"""
import json, sys
sys.set_int_max_str_digits(0)


def encode(x, depth=0):
    if depth > 200:
        raise TypeError("a value nested more than 200 deep")
    if x is None or x is True or x is False:
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return {"f": float(x).hex()}
    if isinstance(x, complex):
        return {"c": [float(x.real).hex(), float(x.imag).hex()]}
    if isinstance(x, str):
        return str.__str__(x)
    if isinstance(x, (bytes, bytearray)):
        return {"ba" if isinstance(x, bytearray) else "b": bytes(x).hex()}
    if isinstance(x, dict):
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(x)]}
    for tag, kind in (("l", list), ("t", tuple), ("s", set), ("fs", frozenset)):
        if isinstance(x, kind):
            return {tag: [encode(v, depth + 1) for v in kind.__iter__(x)]}
    raise TypeError(f"a {type(x).__name__} object")


def decode(v, depth=0):
    if depth > 200:
        raise ValueError("nested too deeply")
    if v is None or v is True or v is False or type(v) is int or type(v) is str:
        return v
    if type(v) is dict and len(v) == 1:
        ((tag, body),) = v.items()
        if tag == "f" and type(body) is str:
            return float.fromhex(body)
        if tag == "c" and type(body) is list and len(body) == 2 and all(type(p) is str for p in body):
            return complex(float.fromhex(body[0]), float.fromhex(body[1]))
        if tag in ("b", "ba") and type(body) is str:
            return bytes.fromhex(body) if tag == "b" else bytearray.fromhex(body)
        if tag == "d" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
            return {decode(k, depth + 1): decode(x, depth + 1) for k, x in body}
        kinds = {"l": list, "t": tuple, "s": set, "fs": frozenset}
        if tag in kinds and type(body) is list:
            return kinds[tag](decode(x, depth + 1) for x in body)
    raise ValueError("not a plain value")


def _no_float(text):
    raise ValueError(f"untagged number {text}")


def loads(line):
    return json.loads(line, parse_float=_no_float, parse_constant=_no_float)
"""

# The program process: runs candidate.py as __main__, then answers the test process's requests over two pipes.
_SERVER = _CODEC + r"""
import os, traceback, types


def main():
    requests, replies = os.fdopen(int(sys.argv[1]), "rb"), os.fdopen(int(sys.argv[2]), "wb")

    def send(message):
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    names = loads(requests.readline())["names"]
    sys.stdout.reconfigure(line_buffering=True)  # the test process may end this one as soon as the tests do
    path = "/sandbox/candidate.py"
    sys.argv = [path]
    module = types.ModuleType("__main__")
    module.__file__ = path
    sys.modules["__main__"] = module
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    exec(code, module.__dict__)
    found = {}
    for name in names:
        if name in module.__dict__:
            value = module.__dict__[name]
            if isinstance(value, types.ModuleType):
                found[name] = ["module", str(value.__name__)]
            elif callable(value):
                found[name] = ["call"]
            else:
                try:
                    found[name] = ["value", encode(value)]
                except (TypeError, ValueError, RecursionError):
                    pass
    send({"globals": found})
    for line in requests:
        request = loads(line)
        try:
            function = module.__dict__[request["call"]]
            args = decode(request["args"])
            kwargs = {k: decode(v) for k, v in request["kwargs"]}
            result = function(*args, **kwargs)
        except Exception as e:
            traceback.print_exc()
            try:
                text = str(e)[:2000]
            except Exception:
                text = "?"
            send({"raise": [type(e).__name__, text]})
            continue
        try:
            send({"ok": encode(result)})
        except (TypeError, ValueError, RecursionError):
            send({"bad": type(result).__name__[:100]})
    sys.stdout.flush()


main()
"""

# The test process (the sandbox's main program): see the module docstring.
_HARNESS = _CODEC + r"""
import builtins, ctypes, importlib, os, subprocess, types

libc = ctypes.CDLL(None, use_errno=True)
REPORT = int(os.environ["INFIFPO_REPORT_FD"])
if libc.prctl(4, 0, 0, 0, 0) != 0 or libc.prctl(3, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0, then PR_GET_DUMPABLE
    os.write(REPORT, b"harness-error: cannot make the test process undumpable\n")
    os._exit(3)
with open(int(os.environ["INFIFPO_INPUT_FD"]), "rb") as f:
    CONFIG = json.loads(f.read())
PLAIN = "plain values (None, bool, int, float, complex, str, bytes, list, tuple, dict, set)"


class CandidateError(Exception):
    "An exception of a type that is not built in, raised by the program."


class Gone(BaseException):
    "The program process ended or answered with something that is not a reply."


def names_in(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= names_in(const)
    return names


def start():
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFIFPO_")}
    child = subprocess.Popen([sys.executable, "-I", "/sandbox/serve.py", str(req_r), str(rep_w)],
                             stdin=subprocess.DEVNULL, env=env, pass_fds=(req_r, rep_w), cwd="/sandbox")
    os.close(req_r)
    os.close(rep_w)
    return child, os.fdopen(req_w, "wb"), os.fdopen(rep_r, "rb")


def ask(message):
    try:
        TO.write(json.dumps(message).encode() + b"\n")
        TO.flush()
        line = FROM.readline()
        if not line:
            raise Gone("the program process ended")
        reply = loads(line)
    except (OSError, ValueError, RecursionError) as e:
        raise Gone(f"no valid reply from the program process ({type(e).__name__})") from None
    if type(reply) is not dict or len(reply) != 1:
        raise Gone("a malformed reply from the program process")
    return reply


def proxy(name):
    def call(*args, **kwargs):
        try:
            message = {"call": name, "args": encode(list(args)), "kwargs": [[k, encode(v)] for k, v in kwargs.items()]}
        except (TypeError, RecursionError) as e:
            raise TypeError(f"the judge passes only {PLAIN} to the program, not {e}") from None
        reply = ask(message)
        if "ok" in reply:
            try:
                return decode(reply["ok"])
            except (TypeError, ValueError, RecursionError):
                raise Gone("the program process sent a value that is not plain data") from None
        if "bad" in reply:
            kind = str(reply["bad"])[:100]
            raise TypeError(f"{name}() returned an object of type {kind}; the judge compares only {PLAIN}")
        raised = reply.get("raise")
        kind, text = (raised[0], raised[1]) if type(raised) is list and len(raised) == 2 else ("?", "?")
        cls = getattr(builtins, kind, None) if type(kind) is str else None
        try:
            error = cls(str(text)) if isinstance(cls, type) and issubclass(cls, Exception) else None
        except Exception:
            error = None
        raise error or CandidateError(f"{str(kind)[:100]}: {str(text)[:2000]}")

    call.__name__ = call.__qualname__ = name
    return call


def ended(child, why):
    TO.close()
    try:
        status = child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        status = child.wait()
    sys.stdout.flush()
    sys.stderr.write(f"infifpo-judge: {why}; the program ended with status {status} before the tests finished\n")
    sys.stderr.flush()
    os._exit(0 if status == 0 else status if status > 0 else 128 - status)


tests = compile(CONFIG["tests"], "<tests>", "exec")
entry = CONFIG["entry_point"]
wanted = {n for n in names_in(tests) if not hasattr(builtins, n) and not n.startswith("__")}
wanted |= {entry} if entry else set()
CHILD, TO, FROM = start()
namespace = {"__name__": "__main__", "__builtins__": builtins}
try:
    found = ask({"names": sorted(wanted)})["globals"]
    if type(found) is not dict:
        raise Gone("a malformed reply from the program process")
    exec(compile(CONFIG["prefix"], "<prompt imports>", "exec"), namespace)
    for name, kind in found.items():
        if name not in wanted or (name in namespace and name != entry) or type(kind) is not list or not kind:
            continue
        if kind == ["call"]:
            namespace[name] = proxy(name)
        elif kind[0] == "module" and len(kind) == 2 and str(kind[1]).split(".")[0] in sys.stdlib_module_names:
            try:
                namespace[name] = importlib.import_module(kind[1])
            except Exception:
                pass
        elif kind[0] == "value" and len(kind) == 2:
            try:
                namespace[name] = decode(kind[1])
            except (TypeError, ValueError, RecursionError):
                pass
    exec(tests, namespace)
    if entry:
        exec(compile(f"check({entry})", "<judge>", "exec"), namespace)
except Gone as e:
    ended(CHILD, str(e))
os.write(REPORT, b"passed\n")
TO.close()
try:
    CHILD.wait(timeout=2)
except subprocess.TimeoutExpired:
    pass
sys.stdout.flush()
os._exit(0)
"""


def judge_code(
    completion: str, test_code: str, entry_point: str | None = None, timeout: float = 10.0, *, prefix: str = ""
) -> CodeVerdict:
    """Run the program in ``completion`` against ``test_code`` in the sandbox; passed only on a clean, complete run.

    ``prefix`` (e.g. the HumanEval prompt's imports) is prepended to the extracted program and also run in the test
    process. ``timeout`` is wall seconds. Raises SandboxUnavailableError if the sandbox cannot isolate the run or
    the test process cannot be protected from the program.
    """
    program = extract_program(completion, entry_point)
    if program is None:
        return CodeVerdict(False, "no code found")
    candidate = prefix + program.strip("\n") + "\n"
    config = json.dumps({"tests": test_code, "entry_point": entry_point, "prefix": prefix})
    result = run_sandboxed(_HARNESS, timeout=timeout, files={"candidate.py": candidate, "serve.py": _SERVER},
                           private_input=config, report=True)
    report = (result.report or "").strip()
    if report.startswith("harness-error:"):
        raise SandboxUnavailableError(f"the code judge's test process: {report}; refusing to judge unprotected.")
    if result.ok and report == "passed":
        return CodeVerdict(True, "passed", candidate, result)
    reason = result.reason if not result.ok else "exited before the tests finished"
    return CodeVerdict(False, reason, candidate, result)


def check_code(completion: str, test_code: str, entry_point: str | None = None, timeout: float = 10.0) -> bool:
    """Whether the program in ``completion`` passes ``test_code`` in the sandbox (see ``judge_code`` for why not)."""
    return judge_code(completion, test_code, entry_point, timeout).passed
