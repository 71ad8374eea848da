"""`infifpo prompts`: named sources, stable ids, seeded subsets, arithmetic splits, user files (D1/D2/D10)."""

from __future__ import annotations

import json
import re

import pytest

from data_prep import prompts
from data_prep.prompts import PromptsOptions, build_prompts, gsm8k_answer, load_arithmetic, parse_spec
from infifpo.config import parse_config
from infifpo.schema import PROMPT_COLUMNS, ConfigError, DataFormatError
from infifpo.store import read_output
from tests.config_convention import help_lists_every_option, imports_light, misspelt_key_is_named, parse_with_yaml


def _content(row):
    return row["prompt"][-1]["content"]


def test_ids_come_from_the_source_index_not_the_subset():
    small = build_prompts(["gsm8k:train:8"], seed=0)
    big = build_prompts(["gsm8k:train:32"], seed=0)
    other_seed = build_prompts(["gsm8k:train:32"], seed=1)
    assert [r["id"] for r in small] == [r["id"] for r in big[:8]]  # a smaller subset is a prefix of a larger one
    by_id = {r["id"]: _content(r) for r in big}
    shared = [r for r in other_seed if r["id"] in by_id]
    assert shared, "seeds 0 and 1 should overlap in 32 of 7,473"
    assert all(by_id[r["id"]] == _content(r) for r in shared)
    assert all(re.fullmatch(r"gsm8k-train-\d{5}", r["id"]) for r in big)
    first = next(r for r in build_prompts(["gsm8k:train"]) if r["id"] == "gsm8k-train-00000")
    assert _content(first).startswith("Natalia sold clips to 48 of her friends") and first["answer"] == "72"


def test_offset_takes_the_rows_after_a_subset_of_the_same_seed():
    """A dev split held out from a run's prompts: {n: 6, offset: 10} is rows 10..15 of the order n: 16 takes."""
    big = build_prompts(["arithmetic:train:16"], seed=2)
    dev = build_prompts([{"source": "arithmetic", "split": "train", "n": 6, "offset": 10}], seed=2)
    assert [r["id"] for r in dev] == [r["id"] for r in big[10:]]
    rest = build_prompts([{"source": "humaneval", "offset": 160}])  # no n: every row after the offset
    assert len(rest) == 4 and not {r["id"] for r in rest} & {r["id"] for r in build_prompts(["humaneval::160"])}
    with pytest.raises(ConfigError, match="asked for 5 rows after 162, the source has 164"):
        build_prompts([{"source": "humaneval", "n": 5, "offset": 162}])
    with pytest.raises(ConfigError, match="offset must be a non-negative integer"):
        parse_spec({"source": "gsm8k", "offset": -1})
    assert "offset" not in parse_spec("gsm8k:train:8")  # specs without one keep their prompts key


def test_same_seed_same_rows_different_seed_different_subset():
    specs = ["gsm8k:train:16", "arithmetic:train:10", "humaneval::4"]
    a, b, c = build_prompts(specs, seed=3), build_prompts(specs, seed=3), build_prompts(specs, seed=4)
    assert a == b
    assert [r["id"] for r in a] != [r["id"] for r in c]
    ids = [r["id"] for r in a]
    assert len(ids) == len(set(ids)) == 30
    assert all(tuple(r) == PROMPT_COLUMNS for r in a)
    assert {r["domain"] for r in a} == {"math", "code"}


def test_a_source_listed_twice_is_a_named_duplicate_id_error():
    with pytest.raises(DataFormatError, match=r"gsm8k-train-\d{5}.*comes from both"):
        build_prompts(["gsm8k:train:20", "gsm8k:train:20"])


def test_gsm8k_answers_drop_thousands_commas():
    assert gsm8k_answer("She earns 1,000 + 80.\n#### 1,080") == "1080"
    assert gsm8k_answer("...\n#### -3") == "-3"
    with pytest.raises(DataFormatError, match="####"):
        gsm8k_answer("no final answer line")
    rows = build_prompts(["gsm8k:train", "gsm8k:test"])
    assert len(rows) == 7473 + 1319
    assert all(re.fullmatch(r"-?\d+", r["answer"]) for r in rows)
    # the id's index is the vendored file's line: a known answer with commas keeps its digits only
    raw = (prompts.resources.files("data_prep") / "gsm8k/train.jsonl").read_text().splitlines()
    i = next(i for i, line in enumerate(raw) if json.loads(line)["answer"].endswith("#### 109,200,000"))
    assert next(r for r in rows if r["id"] == f"gsm8k-train-{i:05d}")["answer"] == "109200000"


def test_humaneval_rows_carry_tests_and_entry_point():
    rows = build_prompts(["humaneval"])
    assert len(rows) == 164 and rows[0]["id"] == "humaneval-test-00000"
    for r in rows:
        assert r["domain"] == "code" and r["answer"] is None and r["source"] == "humaneval"
        assert "def check(candidate)" in r["tests"]
        assert f"def {r['entry_point']}(" in _content(r) and "```python\n" in _content(r)
    assert rows[0]["entry_point"] == "has_close_elements"
    with pytest.raises(ConfigError, match="only the 'test' split"):
        build_prompts(["humaneval:train:3"])


def _operands(row):
    level = row["id"].split("-")[1]
    a, b = (int(x) for x in re.findall(r"\d+", _content(row).split("\n\n")[0])[:2])
    return level, a, b


@pytest.mark.parametrize("split", ["train", "test"])
def test_arithmetic_answers_are_exact(split):
    rows = [r for s in load_arithmetic(split) for r in s]
    assert len(rows) == 5 * prompts.ARITHMETIC_POOL[split]
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for r in rows:
        level, a, b = _operands(r)
        op, (a_lo, a_hi), (b_lo, b_hi) = prompts.ARITHMETIC_LEVELS[level]
        assert r["answer"] == str(ops[op](a, b)), r
        assert int(r["answer"]) >= 0
        if op != "-":
            assert a_lo <= a <= a_hi and b_lo <= b <= b_hi, r


def test_arithmetic_train_and_test_never_share_a_problem():
    def cores(split):
        out = set()
        for r in (r for s in load_arithmetic(split) for r in s):
            level, a, b = _operands(r)
            out.add((level, *sorted((a, b))) if prompts.ARITHMETIC_LEVELS[level][0] in "+*" else (level, a, b))
        return out

    train, test = cores("train"), cores("test")
    assert train and test and not train & test
    texts = {split: {_content(r) for s in load_arithmetic(split) for r in s} for split in ("train", "test")}
    assert not texts["train"] & texts["test"]
    # a subset takes from every level in turn
    levels = [r["id"].split("-")[1] for r in build_prompts(["arithmetic:test:10"], seed=7)]
    assert sorted(levels) == sorted(list(prompts.ARITHMETIC_LEVELS) * 2)


def test_arithmetic_levels_can_be_chosen_with_a_dict_spec():
    rows = build_prompts([{"source": "arithmetic", "split": "train", "n": 6, "levels": ["mul_1d"]}])
    assert [r["id"].split("-")[1] for r in rows] == ["mul_1d"] * 6
    with pytest.raises(ConfigError, match="unknown level"):
        build_prompts([{"source": "arithmetic", "levels": ["div_9d"]}])


def test_spec_parsing():
    assert parse_spec("humaneval::32") == {"source": "humaneval", "split": "test", "n": 32}
    assert parse_spec("gsm8k") == {"source": "gsm8k", "split": "train", "n": None}
    assert parse_spec("hf:openai/gsm8k:main:train:64") == {
        "source": "hf", "name": "openai/gsm8k", "config": "main", "split": "train", "n": 64}
    assert parse_spec("hf:openai/gsm8k:test")["config"] is None
    assert parse_spec("jsonl:/tmp/a.jsonl:5") == {"source": "jsonl", "path": "/tmp/a.jsonl", "split": None, "n": 5}
    for bad, msg in [("mmlu:train:3", "unknown prompt source"), ("gsm8k:train:x", "not an integer"),
                     ("gsm8k:train:0", "positive"), ("gsm8k:train:5:9", "expected NAME")]:
        with pytest.raises(ConfigError, match=msg):
            parse_spec(bad)
    with pytest.raises(ConfigError, match="asked for 200 rows, the source has 164"):
        build_prompts(["humaneval::200"])


def test_hub_dataset_offline_says_it_needs_a_connection(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="need a connection"):
        build_prompts(["hf:infifpo-test/definitely-not-cached:train:4"])


def test_hf_source_reads_a_local_copy_offline(tmp_path, monkeypatch):
    """A directory in the hub's layout (README.md declaring configs) or one data file loads through the hf loader
    offline; ids come from the directory name / file stem; editing the data changes the prompts output's key."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i), "solution": "..."} for i in range(5)]
    local = tmp_path / "AI-MO__NuminaMath-1.5"
    (local / "main").mkdir(parents=True)
    (local / "main" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (local / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
                                     "    path: main/train.jsonl\n---\n")
    spec = {"source": "hf", "name": str(local), "config": "main", "split": "train", "n": 3,
            "question_field": "problem", "answer_field": "answer", "domain": "math"}
    got = build_prompts([spec])
    assert len(got) == 3 and all(r["id"].startswith("hf-ai-mo-numinamath-1-5-main-train-") for r in got)
    assert {(r["answer"], _content(r).split("\n")[0]) for r in got} <= {(str(2 * i), f"What is {i} + {i}?")
                                                                        for i in range(5)}
    one = tmp_path / "numina.jsonl"
    one.write_text((local / "main" / "train.jsonl").read_text())
    by_file = {r["id"]: r for r in build_prompts([{**spec, "name": str(one), "config": None, "n": None}])}
    assert sorted(by_file) == [f"hf-numina-train-{i:05d}" for i in range(5)]
    assert all(by_file[f"hf-numina-train-{i:05d}"]["answer"] == str(2 * i) for i in range(5))
    with pytest.raises(ConfigError, match="no config"):
        build_prompts([{**spec, "name": str(one)}])
    with pytest.raises(ConfigError, match="BuilderConfig 'nope' not found"):
        build_prompts([{**spec, "config": "nope"}])
    key = prompts.prompts_key([spec], 0)
    (local / "main" / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert prompts.prompts_key([spec], 0) != key and prompts.prompts_key([{**spec, "name": "a/b"}], 0)["specs"][0].get(
        "sha256") is None


def test_hub_rows_are_mapped_by_their_columns():
    gsm = prompts._hub_row({"question": "Q?", "answer": "x\n#### 1,234"}, 0, "hf-x-00000", "hf:x", {})
    assert gsm["domain"] == "math" and gsm["answer"] == "1234" and gsm["prompt"][0]["content"].startswith("Q?\n\n")
    he_row = {"prompt": "def f():\n", "test": "def check(c): pass", "entry_point": "f"}
    code = prompts._hub_row(he_row, 0, "i", "s", {})
    assert code["domain"] == "code" and code["entry_point"] == "f" and "```python\ndef f():\n```" in _content(code)
    chosen = prompts._hub_row({"q": "Hello", "a": 7}, 3, "i", "s", {"question_field": "q", "answer_field": "a"})
    assert chosen["answer"] == "7" and chosen["domain"] == "math"
    with pytest.raises(ConfigError, match=r"cannot tell which column is the prompt \(columns \['text'\]\)"):
        prompts._hub_row({"text": "hi"}, 0, "i", "s", {})
    with pytest.raises(ConfigError, match="question_field 'q' not among columns"):
        prompts._hub_row({"text": "hi"}, 5, "i", "s", {"question_field": "q"})


def test_conversation_columns_give_their_first_user_turn():
    spec = {"question_field": "conversations", "domain": "general"}
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."},
                                  {"from": "human", "value": "Name a prime."},
                                  {"from": "gpt", "value": "7"}]}
    assert _content(prompts._hub_row(sharegpt, 0, "i", "s", spec)) == "Name a prime."
    chat = {"conversations": [{"role": "user", "content": "Hi?"}]}
    assert _content(prompts._hub_row(chat, 0, "i", "s", spec)) == "Hi?"
    with pytest.raises(ConfigError, match="no human/user turn"):
        prompts._hub_row({"conversations": [{"from": "gpt", "value": "x"}]}, 0, "i", "s", spec)


def _write_lines(path, lines):
    path.write_bytes(("\n".join(lines) + "\n").encode() if isinstance(lines[0], str) else b"\n".join(lines))
    return f"jsonl:{path}"


def test_user_jsonl_prompts_load(tmp_path):
    spec = _write_lines(tmp_path / "my prompts.jsonl", [
        json.dumps({"prompt": "What is 2+2?", "domain": "math", "answer": 4}),
        "",
        json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                    "domain": "general", "answer": None}),
    ])
    rows = build_prompts([spec])
    # Ids from content (file stem + a hash of the messages), not from the line: tests/test_identity.py
    assert [r["id"] for r in rows] == [prompts.content_id("my-prompts", r["prompt"]) for r in rows]
    assert all(re.fullmatch(r"my-prompts-[0-9a-f]{12}", r["id"]) for r in rows)
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}] and rows[0]["answer"] == "4"
    assert rows[1]["prompt"][0]["role"] == "system" and rows[1]["source"] == "my prompts.jsonl"


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"prompt": "a"}', '{"prompt": "b",}'], r"line 2: malformed JSON"),  # D10 trailing comma
        (['{"prompt": "a"}', '{"prompt": "b"}', '{"prompt": "c", "domain": "math"}'], r"line 3: keys .* differ"),
        (['{"question": "a"}'], r"line 1: found keys \['question'\]; need 'prompt' \(rename"),  # D1
        (['{"prompt": "a", "chosen": "b"}'], r"line 1: .*unknown: \['chosen'\]"),
        (['{"prompt": [{"role": "user", "content": {"answer": "x", "score": 1}}]}'], r"line 1: .*'prompt'.*content"),
        (['{"prompt": "a", "domain": "poetry"}'], r"line 1, field 'domain'"),
        (['{"prompt": "a", "id": "x|y"}'], r"line 1, field 'id'"),
        (['{"prompt": "a"}', '{"prompt": "b"}', '{"prompt": [{"role": "user", "content": "a"}]}'],
         r"line 3: the same prompt as line 1 \(id 'bad-[0-9a-f]{12}'\); remove the duplicate, or give each line"),
        (['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'], r"line 2: the same id as line 1 \(id 'x'\)"),
        (['{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}'], "last message"),
        ([b'{"prompt": "caf\xe9"}'], "not valid UTF-8"),
    ],
)
def test_bad_user_jsonl_names_the_line_and_field(tmp_path, lines, match):
    spec = _write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataFormatError, match=match):
        build_prompts([spec])


def test_main_writes_a_resumable_stage_output(tmp_path, capsys):
    argv = ["--source", "gsm8k:test:5", "--source", "arithmetic:test:4", "--source", "humaneval::3",
            "--seed", "2", "--out", str(tmp_path)]
    assert prompts.main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()  # the path only (P=$(infifpo prompts ...)); the summary goes to stderr
    rows = read_output(out[0])
    assert len(out) == 1 and captured.err.splitlines()[-1] == "code=3  math=9  total=12"
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in build_prompts(argv[1:6:2], seed=2))
    assert prompts.main(argv) == 0  # second run reuses the finished output
    assert capsys.readouterr().out.splitlines()[0] == out[0]
    prompts.main(argv[:-3] + ["3", "--out", str(tmp_path)])  # another seed is another output
    assert capsys.readouterr().out.splitlines()[0] != out[0]
    config = tmp_path / "prompts.yaml"  # the same options from --config, the seed overridden by its flag
    config.write_text(json.dumps({"source": argv[1:6:2], "seed": 7, "out": str(tmp_path)}))
    assert prompts.main(["--config", str(config), "--seed", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == out[0]


def test_options_follow_the_config_convention(tmp_path, capsys):
    help_lists_every_option(prompts.main, PromptsOptions, capsys)
    misspelt_key_is_named(prompts.main, tmp_path, "sed", "seed")
    mapping = {"source": "arithmetic", "split": "test", "n": 2, "levels": ["add_1d"]}
    opts = parse_with_yaml(PromptsOptions, tmp_path, {"source": ["gsm8k:test:5", mapping], "seed": 1}, ["--seed", "2"])
    assert opts == PromptsOptions(source=["gsm8k:test:5", mapping], seed=2)
    imports_light("data_prep.prompts", "PromptsOptions")


def test_source_flag_repeats_and_takes_json_mappings():
    mapping = {"source": "arithmetic", "split": "test", "n": 2}
    argv = ["--source", "gsm8k:test:5", "--seed", "1", f"--source={json.dumps(mapping)}", "--source", "humaneval::1",
            "arithmetic:test:3"]
    opts = parse_config(PromptsOptions, argv, prog="infifpo prompts")
    assert opts == PromptsOptions(source=["gsm8k:test:5", mapping, "humaneval::1", "arithmetic:test:3"], seed=1)
    with pytest.raises(ConfigError, match=r"--source: not a JSON object .*\{\"source\""):
        prompts.main(["--source", '{"source": "gsm8k",'])
    with pytest.raises(ConfigError, match="unknown prompt source 'bogus'"):
        prompts.main(["--source", "gsm8k:test:2", "--source", "bogus:train:3"])
    with pytest.raises(ConfigError, match="missing required option.* source"):
        prompts.main(["--seed", "1"])
