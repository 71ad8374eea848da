"""RSAF (docs/methods.md, RSAF) against hand computations on small tensors, and `infifpo merge` on tiny checkpoints.

The expected numbers are worked out in each test's docstring. A two-valued sample (a fraction p at one value, the
rest at another, the first larger) has skewness S = (1 − 2p) / √(p(1 − p)) whatever the two values, which gives exact
skewness values without running the code's own helpers. θ_p = 1 everywhere makes r = |δ| / (1 + 1e-8), a uniform
rescaling of |δ| that leaves the skewness and the ranking unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from infifpo.merge.rsaf import keep_count, rsaf_merge_state_dicts, rsaf_merge_tensor, skewness
from infifpo.schema import ConfigError, MergeInputError
from tests.config_convention import help_lists_every_option, misspelt_key_is_named
from tests.conftest import make_tiny_model

# -- the math --------------------------------------------------------------------------------------------------------


def test_right_skewed_rate_keeps_fewer_elements_ties_to_the_lower_index():
    """One source, n = 20, τ = 0.5. |δ| = 3 at indices 2 and 9 (δ_9 = −3), 1 elsewhere: p = 2/20 = 0.1 at the high
    value, S = 0.8 / √0.09 = 8/3. K = 0.5 / (1 + 8/3) = 1.5/11 = 0.13636; K·n = 2.73 → keep 3: indices 2 and 9, and
    of the 18 tied at r = 1 the lowest index, 0. One source: η = 1 and every kept element agrees with its own sign.
    Φ = 1 + δ̂: index 0 → 2, index 2 → 4, index 9 → −2, the rest 1."""
    base = torch.ones(4, 5)
    delta = torch.ones(20)
    delta[2], delta[9] = 3.0, -3.0
    out = rsaf_merge_tensor(base, [base + delta.view(4, 5)], tau=0.5)
    expected = torch.ones(20)
    expected[0], expected[2], expected[9] = 2.0, 4.0, -2.0
    assert_close(out.merged, expected.view(4, 5))
    assert out.skewness[0] == pytest.approx(8 / 3, rel=1e-9)
    assert out.keep_ratios[0] == pytest.approx(1.5 / 11, rel=1e-9)
    assert out.keep_counts == [3] and out.coefficients == [1.0]


def test_left_skewed_rate_keeps_more_elements():
    """One source, n = 20, τ = 0.1. |δ| = 1 at indices 0-3, 2 at 4-19: p = 0.8 at the high value,
    S = (1 − 1.6) / √0.16 = −1.5. K = 0.1 · (1 + 1.5) = 0.25 (more than τ); K·n = 5 → keep 5 of the 16 tied at
    r = 2, the lowest indices 4-8. Φ = 1 + 2 = 3 there, 1 elsewhere."""
    base = torch.ones(20)
    delta = torch.full((20,), 2.0)
    delta[:4] = 1.0
    out = rsaf_merge_tensor(base, [base + delta], tau=0.1)
    expected = torch.ones(20)
    expected[4:9] = 3.0
    assert_close(out.merged, expected)
    assert out.skewness[0] == pytest.approx(-1.5, rel=1e-9)
    assert out.keep_ratios[0] == pytest.approx(0.25, rel=1e-9)
    assert out.keep_counts == [5]


def test_left_skew_past_one_is_clipped_and_keeps_everything():
    """The same δ with τ = 0.5: K = 0.5 · 2.5 = 1.25, clipped to 1: all 20 kept, Φ = θ_p + δ = φ."""
    base = torch.ones(20)
    delta = torch.full((20,), 2.0)
    delta[:4] = 1.0
    out = rsaf_merge_tensor(base, [base + delta], tau=0.5)
    assert out.keep_ratios == [1.0] and out.keep_counts == [20]
    assert_close(out.merged, base + delta)


def test_constant_rate_has_no_skewness_and_keeps_tau():
    """|δ| = 0.5 everywhere (signs alternate), θ_p = 1: r constant, S undefined, K = τ = 0.1; n = 20 → keep 2, all
    tied: indices 0 and 1 (δ = +0.5, −0.5). Φ = [1.5, 0.5, 1, ...]. An unchanged tensor (δ = 0) is constant too:
    S undefined, 2 zeros kept, Φ = θ_p. A one-element tensor: S undefined, round(0.1) = 0 → at least 1: Φ = φ."""
    base = torch.ones(20)
    delta = torch.tensor([0.5, -0.5] * 10)
    out = rsaf_merge_tensor(base, [base + delta])
    expected = torch.ones(20)
    expected[0], expected[1] = 1.5, 0.5
    assert_close(out.merged, expected)
    assert out.skewness == [None] and out.keep_ratios == [0.1] and out.keep_counts == [2]

    same = rsaf_merge_tensor(base, [base.clone()])
    assert same.skewness == [None] and torch.equal(same.merged, base) and same.coefficients == [0.0]

    one = rsaf_merge_tensor(torch.tensor([2.0]), [torch.tensor([2.5])])
    assert one.skewness == [None] and one.keep_counts == [1]
    assert_close(one.merged, torch.tensor([2.5]))


def test_sign_election_zeroes_disagreeing_elements_and_eta_weighs_by_trimmed_energy():
    """Two sources, θ_p = 1 (2×2), τ = 1, flat order.
    δ_1 = [+1, −1, +1, +1]: |δ_1| constant → K = τ = 1, all kept.
    δ_2 = [−2, −2, +2, 0]: |δ_2| = [2, 2, 2, 0], p = 0.75 → S = −0.5/√0.1875 = −1.155 → K = 2.155, clipped to 1.
    Σ_j δ̂ = [−1, −3, +3, +1] → elected signs [−, −, +, +]; δ'_1 = [0, −1, +1, +1] (its +1 at index 0 disagrees),
    δ'_2 = δ_2. η from the trimmed energies before the election: 4 and 4 + 4 + 4 = 12 → η = [0.25, 0.75].
    Φ = 1 + 0.25·δ'_1 + 0.75·δ'_2 = [1 − 1.5, 1 − 0.25 − 1.5, 1 + 0.25 + 1.5, 1 + 0.25] = [−0.5, −0.75, 2.75, 1.25]."""
    base = torch.ones(2, 2)
    d1 = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    d2 = torch.tensor([[-2.0, -2.0], [2.0, 0.0]])
    out = rsaf_merge_tensor(base, [base + d1, base + d2], tau=1.0)
    assert out.keep_counts == [4, 4] and out.keep_ratios == [1.0, 1.0]
    assert out.skewness[0] is None and out.skewness[1] == pytest.approx(-0.5 / math.sqrt(0.1875), rel=1e-9)
    assert out.coefficients == pytest.approx([0.25, 0.75])
    assert_close(out.merged, torch.tensor([[-0.5, -0.75], [2.75, 1.25]]))


def test_an_element_whose_trimmed_deltas_cancel_keeps_the_pivot_value():
    """δ_1 = [+1, +1], δ_2 = [−1, +1] (each |δ| constant → K = τ = 1, all kept). Index 0 sums to 0: elected sign 0,
    both zeroed, Φ_0 = θ_0 = 1. Index 1 agrees; η = [2/4, 2/4]; Φ_1 = 1 + 0.5 + 0.5 = 2."""
    base = torch.ones(2)
    out = rsaf_merge_tensor(base, [base + torch.tensor([1.0, 1.0]), base + torch.tensor([-1.0, 1.0])], tau=1.0)
    assert out.coefficients == pytest.approx([0.5, 0.5])
    assert_close(out.merged, torch.tensor([1.0, 2.0]))


def test_rank_by_magnitude_keeps_the_largest_delta_not_the_largest_rate():
    """θ_p = [10, 0.5, 1, 1], δ = [2, 0.5, 0.1, 0.1]: r = [0.2, 1, 0.1, 0.1], mean 0.35, central moments
    m₂ = 0.57/4 = 0.1425, m₃ = 0.24/4 = 0.06, S = 0.06 / 0.1425^1.5 = 1.1154. τ = 0.5: K = 0.5/2.1154 = 0.2364,
    K·n = 0.95 → keep 1. By rate: index 1 (r = 1) → Φ = [10, 1, 1, 1]. By magnitude: index 0 (|δ| = 2) →
    Φ = [12, 0.5, 1, 1]. The keep-ratio comes from the rate's skewness either way."""
    base = torch.tensor([10.0, 0.5, 1.0, 1.0])
    phi = base + torch.tensor([2.0, 0.5, 0.1, 0.1])
    by_rate = rsaf_merge_tensor(base, [phi], tau=0.5)
    by_magnitude = rsaf_merge_tensor(base, [phi], tau=0.5, rank_by="magnitude")
    assert by_rate.skewness[0] == pytest.approx(0.06 / 0.1425**1.5, rel=1e-6)
    assert by_rate.keep_counts == by_magnitude.keep_counts == [1]
    assert_close(by_rate.merged, torch.tensor([10.0, 1.0, 1.0, 1.0]))
    assert_close(by_magnitude.merged, torch.tensor([12.0, 0.5, 1.0, 1.0]))


def test_skewness_equals_scipy_biased_skew():
    """The population (biased) skewness, as scipy.stats.skew(bias=True) computes it, on a random matrix."""
    scipy_stats = pytest.importorskip("scipy.stats")
    x = torch.randn(7, 13, generator=torch.Generator().manual_seed(0)).exp()
    assert skewness(x) == pytest.approx(float(scipy_stats.skew(x.flatten().double().numpy(), bias=True)), rel=1e-9)


def test_keep_count_rounds_to_nearest_halves_up_at_least_one():
    """(choice) round(K·n), halves up, clamped to [1, n]."""
    assert keep_count(0.25, 10) == 3  # 2.5 → 3
    assert keep_count(0.24, 10) == 2
    assert keep_count(0.01, 10) == 1  # 0.1 → 0 → at least 1
    assert keep_count(1.0, 7) == 7
    assert keep_count(0.1, 30) == 3  # 0.1·30 = 3.0000000000000004 in floats: still 3


def test_output_keeps_the_base_dtype_and_bad_options_are_refused():
    base = torch.ones(4, dtype=torch.bfloat16)
    out = rsaf_merge_tensor(base, [base + 1])
    assert out.merged.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="tau must be in"):
        rsaf_merge_tensor(base, [base], tau=0.0)
    with pytest.raises(ValueError, match="rank_by must be one of"):
        rsaf_merge_tensor(base, [base], rank_by="size")
    with pytest.raises(ValueError, match="shape"):
        rsaf_merge_tensor(base, [torch.ones(5)])


def test_skip_leaves_listed_parameters_and_integer_buffers_as_the_base():
    """``skip`` entries match by substring; "lm_head" leaves lm_head.weight as θ_p; other tensors are merged."""
    base = {"model.w": torch.ones(20), "lm_head.weight": torch.ones(20), "model.ids": torch.arange(3)}
    delta = torch.tensor([0.5, -0.5] * 10)
    model = {"model.w": base["model.w"] + delta, "lm_head.weight": base["lm_head.weight"] + delta,
             "model.ids": torch.arange(3) + 1}
    merged = rsaf_merge_state_dicts(base, [model], skip=["lm_head"])
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    assert torch.equal(merged["model.ids"], base["model.ids"])
    assert_close(merged["model.w"], torch.tensor([1.5, 0.5] + [1.0] * 18))  # constant r: K = τ, 2 kept
    unskipped = rsaf_merge_state_dicts(base, [model])
    assert_close(unskipped["lm_head.weight"], merged["model.w"])


def test_rsaf_module_imports_with_torch_alone():
    code = ("import sys, infifpo.merge.rsaf\n"
            "bad = [m for m in ('transformers', 'trl', 'vllm', 'datasets', 'mergekit', 'safetensors') "
            "if m in sys.modules]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the command -----------------------------------------------------------------------------------------------------


def _finetuned(base: str, path: Path, seed: int, scale: float = 0.05) -> str:
    """A copy of checkpoint ``base`` (config, tokenizer) whose weights are the base's plus seeded Gaussian noise."""
    shutil.copytree(base, path)
    weights = path / "model.safetensors"
    state = load_file(weights)
    gen = torch.Generator().manual_seed(seed)
    save_file({k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}, weights,
              metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def pair_of_finetuned(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetuned")
    return [_finetuned(tiny_llama, root / "phi1", seed=1), _finetuned(tiny_llama, root / "phi2", seed=2)]


def test_cli_rsaf_writes_a_loadable_checkpoint_equal_to_the_pure_math(tiny_llama, pair_of_finetuned, tmp_path,
                                                                       capsys):
    """`infifpo merge --method rsaf` through mergekit equals ``rsaf_merge_state_dicts`` on the same weights; the
    output loads with transformers, has the base's tokenizer, and the same merge again reuses it."""
    pytest.importorskip("mergekit")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infifpo.merge.stage import main

    out = tmp_path / "merged"
    argv = ["--method", "rsaf", "--base", tiny_llama, "--models", *pair_of_finetuned, "--output", str(out),
            "--skip", "lm_head"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    merged = load_file(out / "model.safetensors")
    base = load_file(Path(tiny_llama) / "model.safetensors")
    expected = rsaf_merge_state_dicts(base, [load_file(Path(m) / "model.safetensors") for m in pair_of_finetuned],
                                      skip=["lm_head"])
    assert sorted(merged) == sorted(expected)
    for name in expected:
        assert_close(merged[name], expected[name], atol=0, rtol=0, msg=name)
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    assert not torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_llama).chat_template
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "rsaf" and record["options"]["skip"] == ["lm_head"]

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0  # the same merge: reused, not redone
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="already exists and holds something else"):
        main([*argv[:-2], "--tau", "0.2"])


def test_mergekit_ties_baseline_matches_a_hand_ties_at_full_density(tiny_llama, pair_of_finetuned, tmp_path):
    """mergekit's TIES with density 1 and weights 1 (normalised): Φ = θ_p + Σ_j [sign δ_j = elected] δ_j / #agreeing,
    the elected sign + where Σ_j δ_j ≥ 0, − otherwise (mergekit's rule), computed here by hand."""
    pytest.importorskip("mergekit")
    from transformers import AutoModelForCausalLM

    from infifpo.merge.stage import merge_models

    out = merge_models("ties", tiny_llama, pair_of_finetuned, tmp_path / "ties", density=1.0)
    AutoModelForCausalLM.from_pretrained(out)
    merged = load_file(out / "model.safetensors")
    base = load_file(Path(tiny_llama) / "model.safetensors")
    deltas = torch.stack([load_file(Path(m) / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
                          - base["model.layers.0.mlp.up_proj.weight"] for m in pair_of_finetuned])
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(deltas) == elected).float()
    expected = base["model.layers.0.mlp.up_proj.weight"] + (deltas * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert_close(merged["model.layers.0.mlp.up_proj.weight"], expected, atol=1e-6, rtol=1e-6)

    sparse = merge_models("ties", tiny_llama, pair_of_finetuned, tmp_path / "ties-0.2")  # the default density 0.2
    AutoModelForCausalLM.from_pretrained(sparse)


def test_architecture_mismatch_is_a_named_one_line_error(tiny_llama, tiny_qwen, tmp_path, capsys):
    """A Qwen2 merged into a Llama base: MergeInputError naming both and saying what to do, before mergekit runs;
    through `infifpo merge` it is one line and exit code 2."""
    from infifpo import cli
    from infifpo.merge.stage import merge_models

    with pytest.raises(MergeInputError, match=r"Qwen2ForCausalLM .*LlamaForCausalLM.*infifpo train --method infifpo"):
        merge_models("rsaf", tiny_llama, [tiny_qwen], tmp_path / "out")
    assert cli.main(["merge", "--method", "rsaf", "--base", tiny_llama, "--models", tiny_qwen,
                     "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("infifpo merge: MergeInputError: ") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_in_the_same_architecture_is_named(tiny_llama, tmp_path):
    """A Llama with another vocabulary size: same architecture, other embedding shapes."""
    from infifpo.merge.stage import merge_models

    other = make_tiny_model(str(tmp_path / "wide"), "llama", seed=5, vocab_size=200)
    with pytest.raises(MergeInputError, match=r"parameters differ .*other shape \['lm_head.weight', "
                                              r"'model.embed_tokens.weight'\]"):
        merge_models("ties", tiny_llama, [other], tmp_path / "out")


def test_bad_options_are_config_errors(tiny_llama, pair_of_finetuned, tmp_path):
    from infifpo.merge.stage import merge_models

    with pytest.raises(ConfigError, match=r"skip is an option of rsaf; ties does not use it \(drop --skip\)"):
        merge_models("ties", tiny_llama, pair_of_finetuned, tmp_path / "o", skip=["lm_head"])
    with pytest.raises(ConfigError, match="density is an option of ties, dare_ties, sce; rsaf does not use it"):
        merge_models("rsaf", tiny_llama, pair_of_finetuned, tmp_path / "o", density=0.3)
    with pytest.raises(ConfigError, match="tau must be in"):
        merge_models("rsaf", tiny_llama, pair_of_finetuned, tmp_path / "o", tau=1.5)
    with pytest.raises(ConfigError, match="unknown merge method"):
        merge_models("slerp", tiny_llama, pair_of_finetuned, tmp_path / "o")


def test_help_lists_every_option_and_a_misspelt_key_is_named(capsys, tmp_path):
    from infifpo.merge.stage import MergeOptions, main

    help_lists_every_option(main, MergeOptions, capsys)
    misspelt_key_is_named(main, tmp_path, "rank_bi", "rank_by")


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties", "sce"])
def test_every_mergekit_baseline_writes_a_loadable_checkpoint(method, tiny_llama, pair_of_finetuned, tmp_path):
    """The other baselines run offline on the tiny checkpoints with their default options. task_arithmetic at
    weight 1 is exact: Φ = θ_p + Σ_j δ_j."""
    pytest.importorskip("mergekit")
    from transformers import AutoModelForCausalLM

    from infifpo.merge.stage import merge_models

    out = merge_models(method, tiny_llama, pair_of_finetuned, tmp_path / method)
    AutoModelForCausalLM.from_pretrained(out)
    merged = load_file(out / "model.safetensors")
    base = load_file(Path(tiny_llama) / "model.safetensors")
    assert sorted(merged) == sorted(base)
    if method == "task_arithmetic":
        phis = [load_file(Path(m) / "model.safetensors") for m in pair_of_finetuned]
        for name, theta in base.items():
            assert_close(merged[name], theta + sum(phi[name] - theta for phi in phis), atol=1e-6, rtol=1e-6)
    else:
        assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
