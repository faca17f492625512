"""Recipes: per-tensor types, honest fallbacks and bits, planned from config.json alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemoq.convert.config import load_config
from nemoq.convert.plan import tensor_specs
from nemoq.quant.recipes import RECIPES, LayerFacts, plan_types, summarize
from tests.conftest import ROOT, run_cli

REAL = ROOT / "tests" / "data" / "nemotron-3-nano"


@pytest.fixture(scope="module")
def real_config():
    return load_config(REAL)


def typed_for(config, recipe, overrides=()):
    return plan_types(tensor_specs(config), RECIPES[recipe], config.layer_kinds, overrides)


def test_real_model_has_the_published_size(real_config):
    n = summarize(typed_for(real_config, "BF16")).n_elements
    assert 31.5e9 < n < 31.7e9


def test_nemoq_4bit_recipe_stays_under_4_8_bits_on_the_real_model(real_config):
    summary = summarize(typed_for(real_config, "NQ4"))
    assert summary.bits_per_weight <= 4.8
    assert summary.fallback_tensors == 0


def test_k_quant_recipe_falls_back_visibly_on_the_real_widths(real_config):
    typed = typed_for(real_config, "Q4_K_M")
    summary = summarize(typed)
    assert summary.fallback_share > 0.9
    down = next(t for t in typed if t.spec.name == "blk.1.ffn_down_exps.weight")
    assert down.fell_back and "1856" in down.fallback_why
    ssm_out = next(t for t in typed if t.spec.name == "blk.0.ssm_out.weight")
    assert ssm_out.type in ("q4_k", "q6_k") and not ssm_out.fell_back   # 4096-wide rows fit


def test_small_tensors_stay_f32_in_every_recipe(real_config):
    for name in RECIPES:
        for t in typed_for(real_config, name):
            if t.spec.keep_f32 or len(t.spec.shape) == 1:
                assert t.type == "f32", (name, t.spec.name)


def test_tensor_type_override_wins(real_config):
    typed = typed_for(real_config, "NQ4", [(r"ffn_up_exps", "q8_0")])
    assert all(t.type == "q8_0" for t in typed if "ffn_up_exps" in t.spec.name)


def test_mamba_layers_next_to_attention():
    facts = LayerFacts(tuple({"M": "mamba", "E": "moe", "*": "attention"}[c] for c in "MEMEM*EMEM"))
    assert [i for i in range(10) if facts.next_to_attention(i)] == [4, 7]


def test_dry_run_prints_plan_without_weights_or_output(tmp_path):
    result = run_cli("quantize", REAL, "--recipe", "Q4_K_M", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "bits per weight" in result.output and "fell back" in result.output
    assert "blk.1.ffn_down_exps.weight" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_that_mostly_falls_back_says_what_it_costs_and_what_fits():
    output = " ".join(run_cli("quantize", REAL, "--recipe", "Q4_K_M", "--dry-run").output.split())
    summary = summarize(typed_for(load_config(REAL), "Q4_K_M"))
    assert summary.wanted_bits_per_weight < 5.1 and summary.bits_per_weight > 6.1   # llama.cpp's 24.5 GB file
    assert f"would make {summary.wanted_bits_per_weight:.2f} bits per weight" in output
    assert f"this file has {summary.bits_per_weight:.2f}" in output
    assert "NQ4 (4.69 bpw)" in output and "Q4_K_S" not in output.split("fit this model's widths")[1]
    output = run_cli("quantize", REAL, "--recipe", "NQ4", "--dry-run").output
    assert "fell back" not in output and "fit this model" not in output


def test_unknown_recipe_and_bad_override_are_clear_errors():
    result = run_cli("quantize", REAL, "--recipe", "Q3_XYZ", "--dry-run")
    assert result.exit_code == 1 and "unknown recipe" in result.output and "NQ4" in result.output
    result = run_cli("quantize", REAL, "--tensor-type", "ffn=q9_9", "--dry-run")
    assert result.exit_code == 1 and "REGEX=TYPE" in result.output


@pytest.mark.parametrize("recipe", ["NQ4", "Q4_K_M", "MXFP4_MOE", "NVFP4"])
def test_quantized_tiny_model_runs_in_llama_cpp(recipe, tiny_model, tiny_gguf_f32, tmp_path):
    import numpy as np

    from nemoq.gguf_file import read_gguf
    from nemoq.quant.tensor_scale import scale_name, takes_scale
    from tests.oracles import llama_logits
    out = tmp_path / f"{recipe}.gguf"
    result = run_cli("quantize", tiny_model, "-o", out, "--recipe", recipe)
    assert result.exit_code == 0, result.output
    contents = read_gguf(out)
    typed = plan_types(tensor_specs(load_config(tiny_model)), RECIPES[recipe], load_config(tiny_model).layer_kinds)
    expected = {t.spec.name: t.type.upper() for t in typed}
    expected.update({scale_name(t.spec.name): "F32" for t in typed if takes_scale(t.spec, t.type)})
    assert {t.name: t.type_name for t in contents.tensors} == expected
    ids = [1] + list(range(20, 84))
    base, ours = llama_logits(tiny_gguf_f32, ids), llama_logits(out, ids)
    assert (base.argmax(-1) == ours.argmax(-1)).mean() >= 0.8


def test_quantize_from_an_f16_gguf_keeps_metadata_and_applies_the_recipe(tiny_model, tmp_path):
    import numpy as np

    from nemoq.gguf_file import read_gguf
    from tests.conftest import convert
    f16 = convert(tiny_model, tmp_path / "f16.gguf", "--outtype", "f16")
    assert run_cli("quantize", f16, "-o", tmp_path / "a.gguf", "--recipe", "NQ4").exit_code == 0
    ours, source = read_gguf(tmp_path / "a.gguf"), read_gguf(f16)
    assert {k: v for k, v in ours.metadata.items() if k != "general.file_type"} == \
        {k: v for k, v in source.metadata.items() if k != "general.file_type"}
    assert [(t.name, t.shape) for t in ours.tensors] == [(t.name, t.shape) for t in source.tensors]
    # transforms are not applied twice: ssm_a is copied, not exp()'d again
    np.testing.assert_array_equal(np.asarray(ours.tensor_data("blk.0.ssm_a").data),
                                  np.asarray(source.tensor_data("blk.0.ssm_a").data))
    config = load_config(tiny_model)
    expected = {t.spec.name: t.type.upper() for t in plan_types(tensor_specs(config), RECIPES["NQ4"],
                                                                   config.layer_kinds)}
    assert {t.name: t.type_name for t in ours.tensors} == expected


def test_quantize_refuses_an_already_quantized_gguf(tiny_model, tmp_path):
    q = tmp_path / "q.gguf"
    assert run_cli("quantize", tiny_model, "-o", q, "--recipe", "Q8_0").exit_code == 0
    result = run_cli("quantize", q, "-o", tmp_path / "again.gguf", "--recipe", "NQ4")
    assert result.exit_code == 1 and "already quantized" in result.output
    assert not (tmp_path / "again.gguf").exists()


# llama.cpp's recipes (the ones llama_model_quantize writes): nemoq types every tensor as
# llama.cpp does, on the trained model (8 experts: llama.cpp's 8-expert attention rules) and on
# a random one with 16 experts, five attention layers (its use_more_bits counts attention
# layers for attn_v) and 256-wide rows where the k-quants fit.
LLAMA_RECIPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_NL", "MXFP4_MOE")
# nemoq has no Q5_1, llama.cpp's fallback for Q5_K rows that are not a multiple of 256
NO_Q5_1 = {"Q5_1": "Q5_0"}


@pytest.fixture(scope="module")
def wide_attention_gguf(tmp_path_factory):
    from tests.conftest import convert
    from tests.fixtures.checkpoints import write_checkpoint
    root = tmp_path_factory.mktemp("wide-attention")
    model = write_checkpoint(root / "model", dtype="float32", config_overrides=dict(
        hybrid_override_pattern="M*E*M*E*M*E", hidden_size=256, n_routed_experts=16,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, moe_intermediate_size=96,
        moe_shared_expert_intermediate_size=128))
    return model, convert(model, root / "f32.gguf", "--outtype", "f32")


def llama_types(src, out, ftype: int) -> dict[str, str]:
    import ctypes

    import llama_cpp

    from nemoq.gguf_file import read_gguf
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = 2, ftype
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return {t.name: NO_Q5_1.get(t.type_name, t.type_name) for t in read_gguf(out).tensors}


@pytest.mark.parametrize("recipe", LLAMA_RECIPES)
def test_llama_cpp_recipes_type_every_tensor_as_llama_cpp(recipe, tiny_model, tiny_gguf_f32,
                                                          wide_attention_gguf, tmp_path):
    for model, f32 in ((tiny_model, tiny_gguf_f32), wide_attention_gguf):
        config = load_config(model)
        ours = {t.spec.name: t.type.upper()
                for t in plan_types(tensor_specs(config), RECIPES[recipe], config.layer_kinds)}
        theirs = llama_types(f32, tmp_path / f"{recipe}.gguf", RECIPES[recipe].file_type.value)
        assert ours == theirs, {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) != v}
