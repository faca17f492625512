"""Recipes: per-tensor types, honest fallbacks and bits, planned from config.json alone."""

from __future__ import annotations

import json
import re
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
    about_the_file = ("general.file_type", "nemoq.recipe")
    assert {k: v for k, v in ours.metadata.items() if k not in about_the_file} == \
        {k: v for k, v in source.metadata.items() if k not in about_the_file}
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


# llama.cpp's recipes (the ones llama_model_quantize writes): nemoq's file is llama.cpp's, tensor
# for tensor (names, shapes, types, fallbacks included), on the trained model (8 experts:
# llama.cpp's 8-expert attention rules) and on a random one with 16 experts, five attention
# layers (its use_more_bits counts attention layers for attn_v) and 256-wide rows where the
# k-quants fit. Both files are made from the same F32 GGUF and read with gguf-py.
LLAMA_RECIPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_NL", "MXFP4_MOE")


@pytest.fixture(scope="module")
def wide_attention_gguf(tmp_path_factory):
    from tests.conftest import convert
    from tests.fixtures.checkpoints import write_checkpoint
    root = tmp_path_factory.mktemp("wide-attention")
    model = write_checkpoint(root / "model", dtype="float32", config_overrides=dict(
        hybrid_override_pattern="M*E*M*E*M*E", hidden_size=256, n_routed_experts=16,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, moe_intermediate_size=96,
        moe_shared_expert_intermediate_size=128))
    return convert(model, root / "f32.gguf", "--outtype", "f32")


@pytest.fixture(scope="module")
def tied_gguf(tmp_path_factory):
    """Tied embeddings, no lm_head: llama.cpp types token_embd as its output projection."""
    from tests.conftest import convert
    from tests.fixtures.checkpoints import write_checkpoint
    root = tmp_path_factory.mktemp("tied")
    model = write_checkpoint(root / "model", dtype="float32", config_overrides=dict(tie_word_embeddings=True))
    return convert(model, root / "f32.gguf", "--outtype", "f32")


def tensor_types(path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, type name) of every tensor of a GGUF file, as gguf-py reads it."""
    import gguf
    return {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in gguf.GGUFReader(path).tensors}


def llama_quantize(src, out, ftype: int):
    import ctypes

    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = 2, ftype
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def differences(ours: dict, theirs: dict) -> dict:
    return {k: (ours.get(k), theirs.get(k)) for k in sorted({*ours, *theirs}) if ours.get(k) != theirs.get(k)}


@pytest.mark.parametrize("recipe", LLAMA_RECIPES)
def test_llama_cpp_recipes_make_llama_cpps_file_tensor_for_tensor(recipe, tiny_gguf_f32, wide_attention_gguf,
                                                                  tied_gguf, tmp_path):
    assert "output.weight" not in tensor_types(tied_gguf)
    for i, f32 in enumerate((tiny_gguf_f32, wide_attention_gguf, tied_gguf)):
        ours, theirs = tmp_path / f"nemoq-{i}.gguf", tmp_path / f"llama-{i}.gguf"
        result = run_cli("quantize", f32, "-o", ours, "--recipe", recipe, "--no-tensor-scales")
        assert result.exit_code == 0, result.output
        llama_quantize(f32, theirs, RECIPES[recipe].file_type.value)
        theirs_types = tensor_types(theirs)
        assert tensor_types(ours) == theirs_types, differences(tensor_types(ours), theirs_types)
        if recipe == "MXFP4_MOE":   # by default nemoq adds a `.scale` companion to each FP4 tensor
            scaled = tmp_path / f"nemoq-scaled-{i}.gguf"
            assert run_cli("quantize", f32, "-o", scaled, "--recipe", recipe).exit_code == 0
            extra = {k: v for k, v in tensor_types(scaled).items() if k not in theirs_types}
            assert {k: v for k, v in tensor_types(scaled).items() if k in theirs_types} == theirs_types
            fp4 = [k for k, (_, t) in theirs_types.items() if t == "MXFP4"]
            assert sorted(extra) == sorted(k.removesuffix(".weight") + ".scale" for k in fp4)
            assert {t for _, t in extra.values()} == {"F32"}


# nemoq's own recipes, typed from the rules docs/quantize.md states for them (written out here,
# independently of recipes.py's tables and plan_types): on the trained model's file, and on the
# plan for Nemotron 3 Nano's config.
KEPT_F32 = re.compile(r"norm|ssm_a$|ssm_d$|ssm_dt|ssm_conv1d|ffn_gate_inp|exp_probs_b")


def mamba_next_to_attention(pattern: str) -> set[int]:
    """Mamba layers whose neighbouring mixer layer (MoE layers are not mixers) is attention."""
    mixers = [i for i, kind in enumerate(pattern) if kind in "M*"]
    found = set()
    for a, b in zip(mixers, mixers[1:]):
        if {pattern[a], pattern[b]} == {"M", "*"}:
            found.add(a if pattern[a] == "M" else b)
    return found


def documented_type(recipe: str, name: str, near_attention: bool) -> str:
    """The type docs/quantize.md gives a tensor in NQ4, NQ5 or NVFP4 (before any fallback)."""
    if KEPT_F32.search(name) or name.endswith(".bias"):
        return "F32"
    attention = re.search(r"attn_(q|k|v|output)\.weight", name) is not None
    mamba = re.search(r"ssm_(in|out)\.weight", name) is not None
    if name == "output.weight" or (name == "token_embd.weight" and recipe != "NQ4"):
        return "Q8_0"   # NQ4's embeddings: Q5_0 (below)
    if attention or (mamba and near_attention):
        return "Q8_0"
    if recipe == "NVFP4":
        return "NVFP4"  # routed and shared experts, the other Mamba projections
    rules = {
        "NQ4": {"ffn_(up|down)_exps": "IQ4_NL", "ssm_out": "Q6_K", "ssm_in": "Q5_0", "token_embd": "Q5_0",
                "ffn_up_shexp": "Q5_0", "ffn_down_shexp": "Q8_0"},
        "NQ5": {"ffn_(up|down)_exps": "Q5_0", "ssm_out": "Q8_0", "ssm_in": "Q5_0", "ffn_up_shexp": "Q5_0",
                "ffn_down_shexp": "Q8_0"},
    }[recipe]
    return next(t for pattern, t in rules.items() if re.search(pattern, name))


def documented_types(recipe: str, names_and_widths, pattern: str) -> dict[str, str]:
    near = mamba_next_to_attention(pattern)
    out = {}
    for name, width in names_and_widths:
        layer = re.match(r"blk\.(\d+)\.", name)
        t = documented_type(recipe, name, layer is not None and int(layer.group(1)) in near)
        if t == "Q6_K" and width % 256:   # llama.cpp's fallback table, as documented
            t = "Q8_0"
        out[name] = t
    return out


def test_mamba_layers_next_to_attention_in_nano():
    pattern = json.loads((REAL / "config.json").read_text())["hybrid_override_pattern"]
    assert sorted(mamba_next_to_attention(pattern)) == sorted(
        i for i in range(len(pattern)) if LayerFacts(load_config(REAL).layer_kinds).next_to_attention(i))
    assert mamba_next_to_attention("MEM*EME") == {2, 5} and mamba_next_to_attention("M*EMEME*") == {0, 3, 5}


@pytest.mark.parametrize("recipe", ["NQ4", "NQ5", "NVFP4"])
def test_nemoq_recipes_type_tensors_as_documented(recipe, tiny_model, tmp_path):
    out = tmp_path / f"{recipe}.gguf"
    assert run_cli("quantize", tiny_model, "-o", out, "--recipe", recipe, "--no-tensor-scales").exit_code == 0
    written = tensor_types(out)
    pattern = json.loads((tiny_model / "config.json").read_text())["hybrid_override_pattern"]
    expected = documented_types(recipe, [(k, shape[0]) for k, (shape, _) in written.items()], pattern)
    assert {k: t for k, (_, t) in written.items()} == expected

    config = load_config(REAL)   # Nemotron 3 Nano: the plan from its config.json alone
    planned = {t.spec.name: t.type.upper() for t in typed_for(config, recipe)}
    nano = json.loads((REAL / "config.json").read_text())["hybrid_override_pattern"]
    specs = {s.name: s.row_width for s in tensor_specs(config)}
    assert planned == documented_types(recipe, specs.items(), nano)
