"""ModelOpt NVFP4 / FP8 checkpoints -> GGUF: the values gguf-py reads back are ModelOpt's.

The oracle is the fixture's own torch dequantization (tests/fixtures/modelopt.py):
e2m1 * weight_scale * weight_scale_2 in float32, float32(fp8) * weight_scale. gguf-py
dequantizes the GGUF, times `<name>.scale` where the file has one (as llama.cpp applies it).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from nemoq.convert.pipeline import dominant_dtype, float_chooser, open_checkpoint_source, write_gguf
from tests.conftest import convert
from tests.fixtures.checkpoints import read_safetensors
from tests.fixtures.modelopt import DEFAULT_EXCLUDE, fp8_dequantize, nvfp4_dequantize, write_modelopt_checkpoint

N_EXPERTS = 8
MOE_LAYERS, MAMBA_LAYER = (1, 4), 0


def quantized_sources() -> dict[str, list[str]]:
    """GGUF tensor -> the ModelOpt modules it holds (one per expert for stacks), for pattern MEM*E."""
    p = "backbone.layers"
    table = {f"blk.{MAMBA_LAYER}.ssm_in.weight": [f"{p}.0.mixer.in_proj"],
             f"blk.{MAMBA_LAYER}.ssm_out.weight": [f"{p}.0.mixer.out_proj"]}
    for i in MOE_LAYERS:
        for proj in ("up", "down"):
            table[f"blk.{i}.ffn_{proj}_exps.weight"] = [f"{p}.{i}.mixer.experts.{k}.{proj}_proj" for k in range(N_EXPERTS)]
            table[f"blk.{i}.ffn_{proj}_shexp.weight"] = [f"{p}.{i}.mixer.shared_experts.{proj}_proj"]
    return table


def oracle(state: dict, modules: list[str]) -> np.ndarray:
    def one(m: str) -> torch.Tensor:
        w, s = state[m + ".weight"], state[m + ".weight_scale"]
        return nvfp4_dequantize(w, s, state[m + ".weight_scale_2"]) if w.dtype == torch.uint8 else fp8_dequantize(w, s)
    values = [one(m).numpy() for m in modules]
    return np.stack(values) if len(values) > 1 else values[0]


def foldable(state: dict, module: str) -> bool:
    """Every block scale times weight_scale_2 is an E4M3 number (so a UE4M3 block scale can hold it)."""
    product = state[module + ".weight_scale"].float().double() * state[module + ".weight_scale_2"].double()
    return bool((product.float().to(torch.float8_e4m3fn).double() == product).all())


def read_gguf(path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (type name, float32 values in the GGUF's logical shape, as gguf-py dequantizes)."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        out[t.name] = (t.tensor_type.name, values)
    return out


def with_scale(tensors: dict, name: str) -> np.ndarray:
    """A tensor's values times its `.scale` (per expert for stacks), as llama.cpp applies it."""
    values = tensors[name][1]
    scale = tensors.get(name.removesuffix(".weight") + ".scale")
    if scale is None:
        return values
    return values * (scale[1].reshape(-1, 1, 1) if values.ndim == 3 else scale[1].reshape(()))


def convert_auto(ckpt, out):
    source = open_checkpoint_source(ckpt)
    choose, file_type = float_chooser("auto", dominant_dtype(source.plan))
    return write_gguf(source, out, choose, file_type)


@pytest.mark.parametrize("scale_2", ["pow2", "realistic"])
def test_nvfp4_values_are_modelopts_bit_for_bit(scale_2, tmp_path):
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt", scale_2=scale_2)
    result = convert_auto(ckpt, tmp_path / "out.gguf")
    tensors, state = read_gguf(tmp_path / "out.gguf"), read_safetensors(ckpt)
    notes = {t.name: t.note for t in result.tensors}
    folded = 0
    for name, modules in quantized_sources().items():
        assert tensors[name][0] == "NVFP4", name
        np.testing.assert_array_equal(with_scale(tensors, name), oracle(state, modules), err_msg=name)
        base = name.removesuffix(".weight")
        if all(foldable(state, m) for m in modules):   # no companion tensor at all
            assert "folded" in notes[name] and base + ".scale" not in tensors, notes[name]
            folded += 1
        else:
            expected = [float(state[m + ".weight_scale_2"]) for m in modules]
            np.testing.assert_array_equal(tensors[base + ".scale"][1].reshape(-1), np.float32(expected))
            inputs = [float(state[m + ".input_scale"]) for m in modules]
            np.testing.assert_array_equal(tensors[base + ".input_scale"][1].reshape(-1), np.float32(inputs))
    assert not result.warnings, result.warnings
    assert folded > 0 if scale_2 == "pow2" else folded == 0, folded
    # Excluded modules, embeddings and the router stay as stored.
    assert tensors["blk.3.attn_q.weight"][0] == "BF16" and tensors["blk.2.ssm_in.weight"][0] == "BF16"
    assert tensors["output.weight"][0] == "BF16" and tensors["token_embd.weight"][0] == "BF16"
    assert tensors["blk.1.ffn_gate_inp.weight"][0] == "F32"
    np.testing.assert_array_equal(tensors["output.weight"][1], state["lm_head.weight"].float().numpy())


def test_nvfp4_output_without_scale_support_is_requantized_and_reported(tmp_path):
    # llama.cpp does not load output.scale, and an arbitrary scale_2 does not fold exactly.
    exclude = tuple(p for p in DEFAULT_EXCLUDE if p != "lm_head")
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt", exclude=exclude)
    result = convert_auto(ckpt, tmp_path / "out.gguf")
    tensors, state = read_gguf(tmp_path / "out.gguf"), read_safetensors(ckpt)
    assert tensors["output.weight"][0] == "NVFP4" and "output.scale" not in tensors
    want = oracle(state, ["lm_head"])
    measured = float(np.sqrt(((tensors["output.weight"][1] - want) ** 2).sum() / (want ** 2).sum()))
    report = next(t for t in result.tensors if t.name == "output.weight")
    assert report.rel_rms_error == pytest.approx(measured, rel=1e-4)
    assert 0 < measured < 0.05, measured
    assert any(w.startswith("output.weight: re-quantized to NVFP4") for w in result.warnings), result.warnings


def test_nvfp4_with_a_float_outtype_is_dequantized(tmp_path):
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt")
    convert(ckpt, tmp_path / "out.gguf", "--outtype", "f32")
    tensors, state = read_gguf(tmp_path / "out.gguf"), read_safetensors(ckpt)
    assert {kind for kind, _ in tensors.values()} == {"F32"} and not any(n.endswith(".scale") for n in tensors)
    for name, modules in quantized_sources().items():
        np.testing.assert_array_equal(tensors[name][1], oracle(state, modules), err_msg=name)


def test_nvfp4_row_width_outside_ggufs_block_falls_back_to_bf16(tmp_path):
    # Expert FFN 32: ModelOpt's 16-groups fit, GGUF's 64-value NVFP4 block does not.
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt", config_overrides={"moe_intermediate_size": 32},
                                     declare=("config",))
    result = convert_auto(ckpt, tmp_path / "out.gguf")
    tensors, state = read_gguf(tmp_path / "out.gguf"), read_safetensors(ckpt)
    name = "blk.1.ffn_down_exps.weight"
    assert tensors[name][0] == "BF16" and tensors["blk.1.ffn_up_exps.weight"][0] == "NVFP4"
    want = torch.from_numpy(oracle(state, quantized_sources()[name])).bfloat16().float().numpy()
    np.testing.assert_array_equal(tensors[name][1], want)
    assert any(w.startswith(f"{name}: row width 32") for w in result.warnings), result.warnings


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_auto_is_bf16_of_the_dequantized_values(per_channel, tmp_path):
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt", algo="FP8", fp8_per_channel=per_channel)
    convert(ckpt, tmp_path / "out.gguf")
    tensors, state = read_gguf(tmp_path / "out.gguf"), read_safetensors(ckpt)
    for name, modules in quantized_sources().items():
        assert tensors[name][0] == "BF16", name
        want = torch.from_numpy(oracle(state, modules)).bfloat16().float().numpy()
        np.testing.assert_array_equal(tensors[name][1], want, err_msg=name)


def test_fp8_to_q8_0_is_ggmls_q8_0_of_the_dequantized_values(tmp_path):
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt", algo="FP8", fp8_per_channel=True)
    convert(ckpt, tmp_path / "out.gguf", "--outtype", "q8_0")
    state = read_safetensors(ckpt)
    raw = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    for name, modules in quantized_sources().items():
        assert raw[name].tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        want = gguf.quants.quantize(oracle(state, modules), gguf.GGMLQuantizationType.Q8_0)
        np.testing.assert_array_equal(np.asarray(raw[name].data).reshape(want.shape), want, err_msg=name)


def test_mixed_precision_keeps_nvfp4_and_writes_fp8_as_bf16(tmp_path):
    # As NVIDIA's larger Nemotron releases: routed experts NVFP4, shared experts and Mamba FP8.
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt", algo="MIXED_PRECISION")
    result = convert_auto(ckpt, tmp_path / "out.gguf")
    tensors, state = read_gguf(tmp_path / "out.gguf"), read_safetensors(ckpt)
    for name, modules in quantized_sources().items():
        want = oracle(state, modules)
        if "_exps" in name:
            assert tensors[name][0] == "NVFP4", name
            np.testing.assert_array_equal(with_scale(tensors, name), want, err_msg=name)
        else:
            assert tensors[name][0] == "BF16", name
            np.testing.assert_array_equal(tensors[name][1], torch.from_numpy(want).bfloat16().float().numpy())
    assert not result.warnings, result.warnings


@pytest.mark.parametrize("outtype", ["auto", "f32", "q8_0"])
def test_progress_counts_the_source_bytes_once(outtype, tmp_path):
    # Dequantized NVFP4 rows are float32 (~7x the packed bytes): progress must still add up to
    # plan_bytes, the total the bar is given, and so must the bytes the summary says were read.
    from nemoq.convert.pipeline import plan_bytes
    from nemoq.quant.recipes import RECIPES, plan_types
    from nemoq.quant.choose import chooser
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt")
    source = open_checkpoint_source(ckpt)
    if outtype == "q8_0":
        recipe = RECIPES["Q8_0"]
        typed = plan_types([t.spec for t in source.plan.tensors], recipe, source.layer_kinds)
        choose, file_type = chooser(typed), recipe.file_type
    else:
        choose, file_type = float_chooser(outtype, dominant_dtype(source.plan))
    advanced: list[int] = []
    result = write_gguf(source, tmp_path / "out.gguf", choose, file_type, on_progress=advanced.append)
    assert sum(advanced) == plan_bytes(source.plan) == result.bytes_read
