"""Recipe helpers that mutation testing (docs/mutation.md) found untested, against llama.cpp's
rules (llama_tensor_get_type, tensor_type_fallback) and the documented --tensor-type syntax."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from nemoq.convert.config import load_config
from nemoq.convert.plan import tensor_specs
from nemoq.quant.choose import check_imatrix, encoding_for
from nemoq.quant.recipes import (
    RECIPES, LayerFacts, file_type_of, override_warnings, parse_override, plan_types, recipe_label, recipes_that_fit,
    summarize, use_more_bits,
)


def test_use_more_bits_is_llama_cpps_for_nano():
    """llama.cpp's use_more_bits(i, 52) for Nemotron 3 Nano's 52 layers, written out: the first
    six (52 / 8), the last seven (from 7 * 52 / 8 = 45) and every third between, from 8."""
    chosen = [i for i in range(52) if use_more_bits(i, 52)]
    assert chosen == [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 44, 45, 46, 47, 48, 49, 50, 51]


def test_tensor_type_override_syntax():
    assert parse_override("ffn_up_exps=Q8_0") == ("ffn_up_exps", "q8_0")
    assert parse_override("a=b=F16") == ("a=b", "f16")   # the type follows the last '='
    for bad in ("ffn_up_exps", "=q8_0", "ffn_up_exps=q3_k", "ffn_up_exps="):
        with pytest.raises(ValueError, match="expected REGEX=TYPE"):
            parse_override(bad)


# Nemotron 3 Nano's config.json (tests/data/nemotron-3-nano): 52 layers, 128 routed experts.
NANO = Path(__file__).resolve().parent / "data" / "nemotron-3-nano"


@pytest.fixture(scope="module")
def nano():
    config = load_config(NANO)
    return config, tensor_specs(config)


def bytes_of(type_name: str, n: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return n // block * size


def test_layer_facts_of_nano_are_the_model_cards(nano):
    config, specs = nano
    facts = LayerFacts.from_specs(specs, config.layer_kinds)
    attention = [i for i, k in enumerate(config.layer_kinds) if k == "attention"]
    assert facts.n_experts == 128 and len(attention) == 6
    # llama.cpp's Q4_K_S: attn_v of the first four attention layers, ffn_down of layers < 52 / 8
    assert [i for i in range(52) if facts.first_four_attention(i)] == attention[:4]
    assert [i for i in range(52) if facts.first_eighth(i)] == list(range(6))
    # use_more_bits over the attention layers alone (llama.cpp counts attn_v tensors): 6 / 8 = 0,
    # so the last 7 * 6 / 8 = 5 onward and every third between: ordinals 2 and 5
    assert [i for i in range(52) if facts.more_bits_attention(i)] == [attention[2], attention[5]]
    assert not any(f(None) for f in (facts.first_four_attention, facts.first_eighth, facts.more_bits,
                                     facts.more_bits_attention, facts.next_to_attention))


def test_q8_0_plan_of_nano_prices_every_tensor_with_gguf_pys_sizes(nano):
    config, specs = nano
    summary = summarize(plan_types(specs, RECIPES["Q8_0"], config.layer_kinds))
    f32 = [s for s in specs if s.keep_f32 or len(s.shape) < 2]
    expected = sum(4 * s.n_elements if s in f32 else bytes_of("q8_0", s.n_elements) for s in specs)
    n = sum(s.n_elements for s in specs)
    assert summary.total_bytes == expected == summary.wanted_bytes
    assert summary.n_elements == n and summary.fallback_tensors == 0 and not summary.warn_fallbacks
    assert summary.bits_per_weight == pytest.approx(8 * expected / n, rel=1e-12)
    assert summary.quantizable_elements == n - sum(s.n_elements for s in f32)


def test_q4_k_m_on_nano_falls_back_as_llama_cpp_and_says_what_it_costs(nano):
    """2688, 1856 and 3712 are not multiples of 256: llama.cpp's tensor_type_fallback gives Q5_0
    for Q4_K and Q8_0 for Q6_K; every other tensor keeps the wanted k-quant."""
    config, specs = nano
    typed = plan_types(specs, RECIPES["Q4_K_M"], config.layer_kinds)
    for t in typed:
        if t.wanted in ("q4_k", "q6_k") and t.spec.row_width % 256:
            assert t.type == {"q4_k": "q5_0", "q6_k": "q8_0"}[t.wanted] and t.fell_back
            assert f"row width {t.spec.row_width} is not a multiple of 256" in t.fallback_why
        else:
            assert t.type == t.wanted and not t.fell_back and t.fallback_why == ""
    summary = summarize(typed)
    fell = [t for t in typed if t.fell_back]
    quantizable = sum(t.spec.n_elements for t in typed if t.wanted != "f32")
    assert summary.fallback_tensors == len(fell)
    assert summary.fallback_share == sum(t.spec.n_elements for t in fell) / quantizable > 0.5
    assert summary.warn_fallbacks
    assert summary.wanted_bytes == sum(
        4 * t.spec.n_elements if t.wanted == "f32" else bytes_of(t.wanted, t.spec.n_elements) for t in typed)
    assert summary.wanted_bits_per_weight < summary.bits_per_weight


def test_the_recipes_that_fit_nano_are_the_readmes(nano):
    """README: when most weights fall back, the recipes that fit (NQ4: 4.69 bits per weight)."""
    config, specs = nano
    fits = recipes_that_fit(specs, config.layer_kinds)
    names = [name for name, _ in fits]
    assert [bpw for _, bpw in fits] == sorted(bpw for _, bpw in fits)
    assert "NQ4" in names and "Q8_0" in names and "Q4_K_M" not in names
    assert not {"F32", "F16", "BF16"} & set(names)
    assert dict(fits)["NQ4"] == pytest.approx(4.69, abs=0.005)


def test_file_type_is_the_recipes_or_guessed_from_the_main_type(nano):
    config, specs = nano
    plan = plan_types(specs, RECIPES["Q4_K_M"], config.layer_kinds)
    assert file_type_of(RECIPES["Q4_K_M"], plan, config.layer_kinds) == 15   # LLAMA_FTYPE_MOSTLY_Q4_K_M
    changed = plan_types(specs, RECIPES["Q4_K_M"], config.layer_kinds, [("exps", "q8_0")])
    assert file_type_of(RECIPES["Q4_K_M"], changed, config.layer_kinds) == 7 | 1024   # Q8_0, GUESSED
    assert recipe_label(RECIPES["NQ4"], [("exps", "q8_0"), ("ssm", "f16")]) == \
        "NQ4 --tensor-type exps=q8_0 --tensor-type ssm=f16"


def test_an_unwritable_type_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="writing q3_k tensors is not implemented"):
        encoding_for("q3_k")
    assert encoding_for("f16") is not encoding_for("q8_0")


def test_tensor_type_accepts_float_types_and_lists_every_type_it_takes():
    for name in ("f32", "F16", "bf16", "BF16"):
        assert parse_override(f"exps={name}") == ("exps", name.lower())
    with pytest.raises(ValueError) as error:
        parse_override("exps=q3_k")
    assert str(error.value).endswith("with TYPE one of bf16, f16, f32, iq4_nl, mxfp4, nvfp4, q4_0, q4_k, "
                                     "q5_0, q5_1, q5_k, q6_k, q8_0")


def test_warnings_name_three_tensors_and_count_the_rest(nano):
    config, specs = nano
    norms = [s.name for s in specs if s.name.endswith("attn_norm.weight")]
    (three,) = override_warnings(specs, [(r"blk\.[0-2]\.attn_norm", "q8_0")])
    assert f"matches 3 tensor(s) that stay F32 ({', '.join(norms[:3])}): " in three
    (all_,) = override_warnings(specs, [(r"attn_norm", "q8_0")])
    assert f"({', '.join(norms[:3])} and {len(norms) - 3} more)" in all_


def test_the_mtp_block_is_no_trunk_layer_for_the_layer_rules():
    """The MTP block (index = trunk layer count) is not one of the trunk's attention or Mamba
    layers that llama.cpp's attn_v and nemoq's next-to-attention rules count."""
    facts = LayerFacts(("mamba", "attention", "moe", "attention"))
    for rule in (facts.first_four_attention, facts.more_bits_attention, facts.next_to_attention):
        assert rule(4) is False
    assert facts.mtp(4) and not facts.mtp(3) and not facts.mtp(None)


class Imatrix:
    def __init__(self, sums):
        self.sums = sums


def test_an_imatrix_of_another_model_is_refused_naming_the_tensor(nano):
    import numpy as np

    from nemoq.errors import NemoqError

    config, specs = nano
    typed = plan_types(specs, RECIPES["Q4_K_M"], config.layer_kinds)
    experts = next(t.spec for t in typed if t.spec.name.endswith("ffn_up_exps.weight"))
    n, width = experts.n_matrices, experts.row_width
    with pytest.raises(NemoqError, match=r"^im\.gguf: imatrix does not match the model: it has blk\.99\.x, the model"):
        check_imatrix(typed, Imatrix({"blk.99.x": np.ones((1, 8))}), "im.gguf")
    with pytest.raises(NemoqError, match=rf"^im\.gguf: .*{experts.name} has 3 x {width} statistics, the model's tensor needs "
                                         rf"{n} x {width}"):
        check_imatrix(typed, Imatrix({experts.name: np.ones((3, width))}), "im.gguf")
    with pytest.raises(NemoqError, match=rf"^im\.gguf: .* has 1 x {width + 1} statistics"):
        check_imatrix(typed, Imatrix({experts.name: np.ones((1, width + 1))}), "im.gguf")
    # one row for all experts or one per expert both fit; the quantized tensors it lacks are listed
    for rows in (1, n):
        missing = check_imatrix(typed, Imatrix({experts.name: np.ones((rows, width))}), "im.gguf")
        quantized = [t.spec.name for t in typed if t.type not in ("f32", "f16", "bf16")]
        assert missing == [name for name in quantized if name != experts.name]
    # float recipes quantize nothing, so an imatrix covers all they need
    for recipe in ("F32", "F16", "BF16"):
        assert check_imatrix(plan_types(specs, RECIPES[recipe], config.layer_kinds), Imatrix({}), "im.gguf") == []


def test_use_more_bits_covers_the_first_eighth_of_a_deep_model():
    """llama.cpp's rule for 144 layers: the first 18 (144 / 8) and the last 18, every third between."""
    chosen = [i for i in range(144) if use_more_bits(i, 144)]
    assert chosen[:18] == list(range(18)) and chosen[-18:] == list(range(126, 144))
    assert chosen[18:-18] == list(range(20, 126, 3))


def test_a_mamba_layer_right_after_attention_is_next_to_it():
    facts = LayerFacts(("attention", "mamba", "moe", "mamba", "moe", "attention"))
    assert [i for i in range(6) if facts.next_to_attention(i)] == [1, 3]


def test_guessed_file_type_counts_every_tensor_of_a_type(nano):
    """llama.cpp's guessed file type: the type holding the most weights summed over all its
    tensors, not its last tensor's and not the type with the largest name."""
    from dataclasses import replace
    config, specs = nano
    plan = plan_types(specs, RECIPES["Q4_K_M"], config.layer_kinds)
    # experts plus the (tiny, late) output norm in Q4_0, every other matrix in Q8_0
    typed = [replace(t, type="q4_0" if "exps" in t.spec.name or t.spec.name == "output_norm.weight"
                     else t.type if t.type == "f32" else "q8_0") for t in plan]
    assert file_type_of(RECIPES["Q4_K_M"], typed, config.layer_kinds) == 2 | 1024   # MOSTLY_Q4_0, GUESSED


def test_fp4_plans_give_scale_companions_unless_asked_not_to(nano):
    config, specs = nano
    fp4 = [t for t in plan_types(specs, RECIPES["NVFP4"], config.layer_kinds) if t.type == "nvfp4"]
    assert fp4 and all(t.scaled for t in fp4)
    off = plan_types(specs, RECIPES["NVFP4"], config.layer_kinds, tensor_scales=False)
    assert not any(t.scaled for t in off if t.type == "nvfp4")


def test_plan_reasons_are_the_rules_words(nano):
    """--dry-run's reason column: a rule's own explanation where it has one, and F32 tensors say why."""
    config, specs = nano
    plan = {t.spec.name: t for t in plan_types(specs, RECIPES["NQ4"], config.layer_kinds)}
    ssm_out = [t for name, t in plan.items() if name.endswith("ssm_out.weight") and t.wanted == "q6_k"]
    assert ssm_out and {t.reason for t in ssm_out} == {"ssm_out is the most sensitive Mamba tensor"}
    assert plan["output_norm.weight"].reason == "kept F32 (norm, SSM parameter or router)"


def test_layer_facts_of_a_model_without_routed_experts(nano):
    config, specs = nano
    dense = [s for s in specs if "exps" not in s.name]
    assert LayerFacts.from_specs(dense, config.layer_kinds).n_experts == 0
