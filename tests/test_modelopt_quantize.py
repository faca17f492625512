"""`nemoq quantize` of a ModelOpt NVFP4 checkpoint: what a recipe wants as NVFP4 keeps NVIDIA's blocks.

Oracles: `nemoq convert` of the same checkpoint (the lossless repack, checked against the
fixture's torch dequantization in test_modelopt_convert.py), the fixture's dequantization itself,
gguf-py's Q8_0 of the dequantized values, and llama.cpp against transformers on the trained model.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from nemoq.convert.modelopt_gguf import kept_as_stored
from nemoq.convert.pipeline import open_checkpoint_source, write_gguf
from nemoq.quant.recipes import RECIPES, plan_types
from nemoq.quant.choose import chooser
from tests.conftest import TINY_MODEL, convert, run_cli
from tests.fixtures.checkpoints import read_safetensors
from tests.fixtures.modelopt import export_modelopt, write_dequantized, write_modelopt_checkpoint
from tests.oracles import compare, hf_logits, llama_logits
from tests.test_convert_golden import tiny_ids
from tests.test_modelopt_convert import oracle, quantized_sources, read_gguf, with_scale
from tests.test_modelopt_llama import TINY_EXCLUDE, rel_rms

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def raw(path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).copy()) for t in gguf.GGUFReader(str(path)).tensors}


def quantize(ckpt, out, *extra):
    result = run_cli("quantize", ckpt, "-o", out, "--recipe", "NVFP4", *extra)
    assert result.exit_code == 0, result.output
    assert "ModelOpt NVFP4 tensor(s) as the checkpoint stores them" in " ".join(result.output.split())
    return out


def companions(tensors: dict, name: str) -> dict:
    base = name.removesuffix(".weight")
    return {n: v for n, v in tensors.items() if n in (base + ".scale", base + ".input_scale")}


@pytest.mark.parametrize("scale_2", ["pow2", "realistic"])
def test_recipe_nvfp4_keeps_the_stored_blocks_as_convert_does(scale_2, tmp_path):
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt", scale_2=scale_2)
    converted = raw(convert(ckpt, tmp_path / "convert.gguf"))
    quantized = raw(quantize(ckpt, tmp_path / "quantize.gguf"))
    values, state = read_gguf(tmp_path / "quantize.gguf"), read_safetensors(ckpt)
    # Layer 0 is not next to attention, so every NVFP4 tensor of the checkpoint stays NVFP4.
    for name, modules in quantized_sources().items():
        assert quantized[name][0] == "NVFP4", name
        np.testing.assert_array_equal(quantized[name][1], converted[name][1], err_msg=name)
        kept, stored = companions(quantized, name), companions(converted, name)
        assert kept.keys() == stored.keys(), name
        for n in kept:
            np.testing.assert_array_equal(kept[n][1], stored[n][1], err_msg=n)
        np.testing.assert_array_equal(with_scale(values, name), oracle(state, modules), err_msg=name)
    # What the recipe puts at Q8_0 (excluded BF16 modules here) is Q8_0 of the stored values.
    for name in ("blk.3.attn_q.weight", "blk.2.ssm_in.weight", "output.weight", "token_embd.weight"):
        assert quantized[name][0] == "Q8_0", name
        want = gguf.quants.quantize(read_gguf(tmp_path / "convert.gguf")[name][1], Q8_0)
        np.testing.assert_array_equal(quantized[name][1].reshape(want.shape), want, err_msg=name)


def test_tensors_the_recipe_puts_at_q8_0_are_q8_0_of_the_dequantized_values(tmp_path):
    # Everything but conv1d quantized: attention, the Mamba layer next to it and lm_head are
    # NVFP4 in the checkpoint, and the recipe wants them as Q8_0.
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt", exclude=("*mixer.conv1d*",))
    source = open_checkpoint_source(ckpt)
    recipe = RECIPES["NVFP4"]
    typed = plan_types([t.spec for t in source.plan.tensors], recipe, source.layer_kinds)
    result = write_gguf(source, tmp_path / "out.gguf", chooser(typed), recipe.file_type)
    tensors, state = raw(tmp_path / "out.gguf"), read_safetensors(ckpt)
    p = "backbone.layers"
    at_q8_0 = {"output.weight": ["lm_head"], "blk.2.ssm_in.weight": [f"{p}.2.mixer.in_proj"],
               "blk.2.ssm_out.weight": [f"{p}.2.mixer.out_proj"],
               **{f"blk.3.attn_{g}.weight": [f"{p}.3.mixer.{m}_proj"]
                  for g, m in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))}}
    for name, modules in at_q8_0.items():
        assert tensors[name][0] == "Q8_0", name
        want = gguf.quants.quantize(oracle(state, modules), Q8_0)
        np.testing.assert_array_equal(tensors[name][1].reshape(want.shape), want, err_msg=name)
        assert name.removesuffix(".weight") + ".scale" not in tensors
    assert sorted(kept_as_stored(result.tensors)) == sorted(quantized_sources())
    values = read_gguf(tmp_path / "out.gguf")
    for name, modules in quantized_sources().items():
        np.testing.assert_array_equal(with_scale(values, name), oracle(state, modules), err_msg=name)


def test_without_tensor_scales_only_exact_folds_are_kept(tmp_path):
    # --no-tensor-scales: no `.scale` tensor may be written, so a weight_scale_2 that does not fold
    # into the block scales leaves the tensor to the recipe's quantizer (dequantized values).
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt", scale_2="realistic")
    source = open_checkpoint_source(ckpt)
    recipe = RECIPES["NVFP4"]
    typed = plan_types([t.spec for t in source.plan.tensors], recipe, source.layer_kinds, tensor_scales=False)
    result = write_gguf(source, tmp_path / "out.gguf", chooser(typed), recipe.file_type)
    tensors, state = read_gguf(tmp_path / "out.gguf"), read_safetensors(ckpt)
    assert not kept_as_stored(result.tensors)
    assert not [n for n in tensors if n.endswith((".scale", ".input_scale"))]
    for name, modules in quantized_sources().items():
        assert tensors[name][0] == "NVFP4", name
        want = oracle(state, modules)
        error = rel_rms(tensors[name][1], want)
        assert 0 < error < 0.2, (name, error)   # re-quantized: close, not the stored values


def test_recipe_nvfp4_file_runs_in_llama_cpp_like_the_dequantized_model(tmp_path):
    ckpt = export_modelopt(TINY_MODEL, tmp_path / "nvfp4", exclude=TINY_EXCLUDE)
    dequantized_ckpt = write_dequantized(ckpt, tmp_path / "dequantized")
    path = quantize(ckpt, tmp_path / "nvfp4.gguf")
    scales = [n for n in raw(path) if n.endswith(".scale")]
    assert scales   # trained weights: weight_scale_2 does not fold, the stored blocks keep their .scale
    ids = tiny_ids(TINY_MODEL)
    reference = hf_logits(dequantized_ckpt, ids, clamp_dt=False)
    ours = llama_logits(path, ids)
    # within llama.cpp's Q8_0-activation noise, measured on a Q8_0 file of the same values
    floor = rel_rms(llama_logits(convert(dequantized_ckpt, tmp_path / "q8_0.gguf", "--outtype", "q8_0"), ids),
                    reference)
    stats = compare(ours, reference)
    assert rel_rms(ours, reference) <= 2 * floor, (rel_rms(ours, reference), floor, stats)
    assert stats["top1"] >= 0.95, stats
