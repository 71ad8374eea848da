"""`infifpo.precision`: "auto" on CPU takes the precision that measured faster, once per machine, cached."""

from __future__ import annotations

import json

import pytest
import torch

from infifpo import precision
from infifpo.backends.hf_engine import resolve_dtype
from infifpo.schema import ConfigError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INFIFPO_CACHE", str(tmp_path))
    monkeypatch.delenv(precision.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    return tmp_path / precision.CACHE_FILE


def _fake_rates(monkeypatch, rates):
    calls = []

    def fake(shape, rounds=precision.ROUNDS):
        calls.append(shape)
        return dict(rates)

    monkeypatch.setattr(precision, "matmul_rates", fake)
    return calls


@pytest.mark.parametrize("rates, expected", [({"bfloat16": 94.0, "float32": 293.0}, "float32"),
                                             ({"bfloat16": 600.0, "float32": 290.0}, "bfloat16")])
def test_auto_takes_the_faster_precision_and_measures_once(cache, monkeypatch, rates, expected):
    calls = _fake_rates(monkeypatch, rates)
    assert precision.auto_cpu_dtype((8, 16, 32)) == expected
    assert precision.auto_cpu_dtype((8, 16, 32)) == expected and len(calls) == 1  # second call: the cache
    entry = json.loads(cache.read_text())[precision.cache_key((8, 16, 32), torch.get_num_threads())]
    assert entry["dtype"] == expected and entry["gflops"] == rates
    assert resolve_dtype("auto", "cpu", (8, 16, 32)) == expected and len(calls) == 1
    precision.auto_cpu_dtype((8, 16, 64))  # another shape is another measurement
    assert calls == [(8, 16, 32), (8, 16, 64)]


def test_override_and_emulated_bf16_need_no_measurement(cache, monkeypatch):
    calls = _fake_rates(monkeypatch, {"bfloat16": 1.0, "float32": 2.0})
    monkeypatch.setenv(precision.OVERRIDE_ENV, "bfloat16")
    assert precision.auto_cpu_dtype() == "bfloat16"
    monkeypatch.setenv(precision.OVERRIDE_ENV, "fp16")
    with pytest.raises(ConfigError, match=precision.OVERRIDE_ENV):
        precision.auto_cpu_dtype()
    monkeypatch.delenv(precision.OVERRIDE_ENV)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert precision.auto_cpu_dtype() == "float32" and calls == [] and not cache.exists()


def test_explicit_dtypes_are_kept_and_a_real_measurement_gives_positive_rates(cache):
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"
    rates = precision.matmul_rates((16, 64, 64), rounds=1)
    assert set(rates) == set(precision.DTYPES) and all(r > 0 for r in rates.values())


def test_model_shape_from_a_checkpoint_config(tiny_llama, tmp_path):
    assert precision.model_dir_shape(tiny_llama) == (precision.DEFAULT_SHAPE[0], 64, 128)
    assert precision.model_dir_shape(tmp_path / "missing") == precision.DEFAULT_SHAPE
