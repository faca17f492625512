"""Converted ModelOpt checkpoints in llama.cpp (llama-cpp-python) against transformers.

The model is the trained tests/data/nemotron-tiny exported as ModelOpt would (NVIDIA's
selective recipe: attention, the Mamba layers next to it, conv1d and lm_head unquantized), and
transformers runs the float32 checkpoint of the dequantized values (tests/fixtures/modelopt.py).

llama.cpp's CPU NVFP4 matmul quantizes the activations to Q8_0 (vec_dot_type Q8_0), which on
this small model moves logits by 1-2.6% RMS (max |diff| up to 2 on a logit scale of 14, at a few
positions), as much as a Q8_0 file of the same values does. So the NVFP4 file is checked three
ways: (1) its values, as F32, run like transformers to 1e-3 of the logit scale (measured
~5e-5); (2) llama.cpp on the NVFP4 file itself is ten times closer (RMS) to (1) than the same
file without its `.scale` tensors (measured 0.012-0.026 vs 0.68); (3) against transformers,
at most twice the RMS error of that Q8_0 file, and top-1 agreement >= 95%.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from tests.conftest import TINY_MODEL, convert
from tests.fixtures.modelopt import export_modelopt, write_dequantized
from tests.gguf_edit import dequantized, rewrite_gguf
from tests.oracles import compare, hf_logits, llama_logits
from tests.test_convert_golden import tiny_ids

# MEM*EME: attention at 3; Mamba layers 2 and 5 are its neighbours (MoE layers skipped).
TINY_EXCLUDE = ("lm_head", "*mixer.conv1d*", "*layers.2.mixer.*_proj", "*layers.5.mixer.*_proj", "*layers.3.mixer.*")


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.square(a - b).mean() / np.square(b).mean()))


@pytest.fixture(scope="module")
def nvfp4_case(tmp_path_factory):
    # Arbitrary weight_scale_2 (trained weights are small: even a power of two rarely folds, their
    # block scales would underflow UE4M3), so every NVFP4 tensor comes with a `.scale`.
    tmp = tmp_path_factory.mktemp("modelopt-nvfp4")
    ckpt = export_modelopt(TINY_MODEL, tmp / "nvfp4", exclude=TINY_EXCLUDE)
    return convert(ckpt, tmp / "nvfp4.gguf"), write_dequantized(ckpt, tmp / "dequantized"), tmp


def scales_of(path) -> dict[str, np.ndarray]:
    return {t.name.removesuffix(".scale") + ".weight": np.asarray(t.data, dtype=np.float32)
            for t in gguf.GGUFReader(path).tensors if t.name.endswith(".scale")}


def as_f32(src, dst, apply_scale: bool) -> None:
    """The file with every tensor as F32 values (NVFP4 ones times their `.scale` or not), scales dropped."""
    scales = scales_of(src)

    def edit(name, t):
        if name.endswith((".scale", ".input_scale")):
            return False
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            return None
        values, scale = dequantized(t), scales.get(name)
        if scale is None or not apply_scale:
            return values
        return values * (scale.reshape(-1, 1, 1) if values.ndim == 3 else scale.reshape(()))
    rewrite_gguf(src, dst, edit)


def test_nvfp4_file_runs_like_the_dequantized_checkpoint(nvfp4_case):
    gguf_path, dequantized_ckpt, tmp = nvfp4_case
    ids = tiny_ids(TINY_MODEL)
    reference = hf_logits(dequantized_ckpt, ids, clamp_dt=False)
    as_f32(gguf_path, tmp / "values.gguf", apply_scale=True)
    as_f32(gguf_path, tmp / "unscaled.gguf", apply_scale=False)
    ours, values, unscaled = (llama_logits(p, ids) for p in (gguf_path, tmp / "values.gguf", tmp / "unscaled.gguf"))

    exact = compare(values, reference)   # (1) the file holds the dequantized model
    assert exact["max_abs_diff"] <= 1e-3 * exact["max_abs_logit"], exact
    assert scales_of(gguf_path)          # (2) llama.cpp applies the .scale tensors
    close, far = rel_rms(ours, values), rel_rms(unscaled, values)
    assert close < 0.1 * far, (close, far)
    # (3) within llama.cpp's Q8_0-activation noise, measured on a Q8_0 file of the same values
    q8_0 = llama_logits(convert(dequantized_ckpt, tmp / "q8_0.gguf", "--outtype", "q8_0"), ids)
    stats, floor = compare(ours, reference), rel_rms(q8_0, reference)
    assert rel_rms(ours, reference) <= 2 * floor, (rel_rms(ours, reference), floor, stats)
    assert stats["top1"] >= 0.95, stats


def rewrite_f32(src, dst, scales: dict[str, np.ndarray], fold: bool) -> None:
    """An F32 file with `<base>.scale` tensors added, or with the weights multiplied by them."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name != "general.architecture" and not field.name.startswith("GGUF."):
            kind = field.types[0]
            writer.add_key_value(field.name, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        values = dequantized(t)
        scale = scales.get(t.name.removesuffix(".weight"))
        if scale is not None and fold:
            values = values * (scale.reshape(-1, 1, 1) if values.ndim == 3 else scale.reshape(()))
        writer.add_tensor(t.name, values)
        if scale is not None and not fold:
            writer.add_tensor(t.name.removesuffix(".weight") + ".scale", scale)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


PROBE_IDS = [int(i) for i in np.random.default_rng(0).integers(3, 512, 48)]


@pytest.fixture(scope="module")
def random_f32(tmp_path_factory):
    from tests.fixtures.checkpoints import write_checkpoint
    tmp = tmp_path_factory.mktemp("scale-probe")
    ckpt = write_checkpoint(tmp / "ckpt", dtype="float32", config_overrides={"moe_intermediate_size": 64})
    path = convert(ckpt, tmp / "f32.gguf", "--outtype", "f32")
    return path, llama_logits(path, PROBE_IDS)


# One GGUF tensor of every kind modelopt_gguf.SCALE_LOADED names, in the random fixture (MEM*E).
SCALED_KINDS = ("blk.0.ssm_in", "blk.2.ssm_out", "blk.3.attn_q", "blk.3.attn_k", "blk.3.attn_v",
                "blk.3.attn_output", "blk.1.ffn_up_exps", "blk.4.ffn_down_exps", "blk.1.ffn_up_shexp",
                "blk.4.ffn_down_shexp")


def test_the_probe_covers_every_kind_nemoq_writes_scales_for():
    from nemoq.convert.modelopt_gguf import SCALE_LOADED
    kinds = {k for base in SCALED_KINDS for k in SCALE_LOADED
             if gguf.TENSOR_NAMES[k].format(bid=int(base.split(".")[1])) == base}
    assert kinds == set(SCALE_LOADED)


@pytest.mark.parametrize("base", SCALED_KINDS)
def test_llama_cpp_applies_a_scale_tensor_once(base, random_f32, tmp_path):
    """What modelopt_gguf.SCALE_LOADED relies on: `<base>.scale` (per expert for stacks) acts
    as the weight multiplied by it, once."""
    f32, plain = random_f32
    scale = np.linspace(0.5, 2.0, 8 if base.endswith("_exps") else 1).astype(np.float32)
    rewrite_f32(f32, tmp_path / "scaled.gguf", {base: scale}, fold=False)
    rewrite_f32(f32, tmp_path / "folded.gguf", {base: scale}, fold=True)
    scaled, folded = (llama_logits(p, PROBE_IDS) for p in (tmp_path / "scaled.gguf", tmp_path / "folded.gguf"))
    assert np.abs(scaled - folded).max() <= 1e-3 * np.abs(folded).max()
    assert np.abs(plain - folded).max() > 0.1 * np.abs(folded).max()   # the scale mattered


def test_llama_cpp_does_not_load_output_scale(random_f32, tmp_path):
    """Why an NVFP4 lm_head whose scale_2 does not fold is re-quantized: this llama.cpp rejects
    a file with output.scale (an unused tensor)."""
    from llama_cpp import Llama
    f32 = random_f32[0]
    rewrite_f32(f32, tmp_path / "with-output-scale.gguf", {"output": np.ones(1, np.float32)}, fold=False)
    Llama(str(f32), verbose=False, n_ctx=64).close()
    with pytest.raises(ValueError):
        Llama(str(tmp_path / "with-output-scale.gguf"), verbose=False, n_ctx=64)


def test_fp8_to_bf16_runs_like_the_dequantized_checkpoint(tmp_path):
    ckpt = export_modelopt(TINY_MODEL, tmp_path / "fp8", algo="FP8", exclude=TINY_EXCLUDE)
    dequantized_ckpt = write_dequantized(ckpt, tmp_path / "dequantized")
    ours = convert(ckpt, tmp_path / "fp8.gguf")                      # auto: BF16
    direct = convert(dequantized_ckpt, tmp_path / "direct.gguf", "--outtype", "bf16")
    # The same BF16 rounding of the same values, tensor by tensor:
    ours_t, direct_t = gguf.GGUFReader(ours).tensors, gguf.GGUFReader(direct).tensors
    assert [(t.name, t.tensor_type) for t in ours_t] == [(t.name, t.tensor_type) for t in direct_t]
    for a, b in zip(ours_t, direct_t):
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data), err_msg=a.name)
    ids = tiny_ids(TINY_MODEL)
    stats = compare(llama_logits(ours, ids), hf_logits(dequantized_ckpt, ids, clamp_dt=False))
    # BF16 weights and llama.cpp's BF16 activations: ~2.5e-3 of the logit scale here
    assert stats["max_abs_diff"] <= 1e-2 * stats["max_abs_logit"], stats
    assert stats["top1"] == 1.0, stats


def test_fp8_to_f32_matches_transformers_to_1e_3(tmp_path):
    """FP8 dequantized to F32: llama.cpp runs the exact ModelOpt values (no BF16 rounding)."""
    ckpt = export_modelopt(TINY_MODEL, tmp_path / "fp8", algo="FP8", exclude=TINY_EXCLUDE)
    dequantized_ckpt = write_dequantized(ckpt, tmp_path / "dequantized")
    ours = convert(ckpt, tmp_path / "fp8-f32.gguf", "--outtype", "f32")
    ids = tiny_ids(TINY_MODEL)
    stats = compare(llama_logits(ours, ids), hf_logits(dequantized_ckpt, ids, clamp_dt=False))
    # measured here: max |diff| 7.9e-4 with max |logit| 14.3
    assert stats["max_abs_diff"] <= 1e-3 * stats["max_abs_logit"], stats
    assert stats["top1"] == 1.0, stats
