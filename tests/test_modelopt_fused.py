"""ModelOpt exports of a transformers-5 model (`model.*` names, experts fused into 3-D stacks with
stacked scales, or split per expert) convert to the same GGUF tensors as the hub-layout export.

The oracle is the hub-layout conversion, itself checked against the fixture's torch
dequantization in test_modelopt_convert.py; both checkpoints hold the same ModelOpt tensors.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.fixtures.checkpoints import read_safetensors, write_safetensors
from tests.fixtures.modelopt import to_transformers_layout, write_modelopt_checkpoint
from tests.test_modelopt_quantize import raw

N_EXPERTS = 8


def assert_same_tensors(ours: dict, hub: dict, skip: tuple[str, ...] = ()) -> None:
    assert list(ours) == list(hub)
    for name, (kind, data) in hub.items():
        assert ours[name][0] == kind, name
        if not name.endswith(skip):
            np.testing.assert_array_equal(ours[name][1], data, err_msg=name)


@pytest.mark.parametrize("scale_2", ["pow2", "realistic"])
@pytest.mark.parametrize("fused", [True, False])
def test_transformers5_nvfp4_export_gives_the_hub_exports_tensors(scale_2, fused, tmp_path):
    hub = write_modelopt_checkpoint(tmp_path / "hub", scale_2=scale_2)
    ckpt = to_transformers_layout(hub, tmp_path / "t5", fused=fused)
    state = read_safetensors(ckpt)
    if fused:
        assert state["model.layers.1.mixer.experts.up_proj_weight_scale_2"].shape == (N_EXPERTS,)
    else:
        assert "model.layers.1.mixer.experts.7.up_proj.weight_scale_2" in state
    ours = raw(convert(ckpt, tmp_path / "t5.gguf"))
    assert_same_tensors(ours, raw(convert(hub, tmp_path / "hub.gguf")))


def test_fused_stacks_with_one_shared_input_scale(tmp_path):
    # ModelOpt's fused experts share one input quantizer: one input_scale for the whole stack.
    hub = write_modelopt_checkpoint(tmp_path / "hub")
    ckpt = to_transformers_layout(hub, tmp_path / "fused", shared_input_scale=True)
    ours, state = raw(convert(ckpt, tmp_path / "fused.gguf")), read_safetensors(ckpt)
    assert_same_tensors(ours, raw(convert(hub, tmp_path / "hub.gguf")), skip=("_exps.input_scale",))
    for i in (1, 4):
        for proj in ("up", "down"):
            shared = state[f"model.layers.{i}.mixer.experts.{proj}_proj_input_scale"]
            assert shared.dim() == 0
            np.testing.assert_array_equal(ours[f"blk.{i}.ffn_{proj}_exps.input_scale"][1],
                                          np.full(N_EXPERTS, shared.item(), np.float32))


@pytest.mark.parametrize("fused", [True, False])
def test_transformers5_mixed_precision_export_gives_the_hub_exports_tensors(fused, tmp_path):
    # quantized_layers names each fused stack once (`...experts.up_proj`), or each expert.
    hub = write_modelopt_checkpoint(tmp_path / "hub", algo="MIXED_PRECISION")
    ckpt = to_transformers_layout(hub, tmp_path / "t5", fused=fused)
    ours = raw(convert(ckpt, tmp_path / "t5.gguf"))
    assert ours["blk.1.ffn_up_exps.weight"][0] == "NVFP4" and ours["blk.1.ffn_up_shexp.weight"][0] == "BF16"
    assert_same_tensors(ours, raw(convert(hub, tmp_path / "hub.gguf")))


@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_fp8_export_gives_the_hub_exports_tensors(per_channel, tmp_path):
    hub = write_modelopt_checkpoint(tmp_path / "hub", algo="FP8", fp8_per_channel=per_channel)
    ckpt = to_transformers_layout(hub, tmp_path / "fused")
    assert_same_tensors(raw(convert(ckpt, tmp_path / "fused.gguf", "--outtype", "q8_0")),
                        raw(convert(hub, tmp_path / "hub.gguf", "--outtype", "q8_0")))


def test_fused_stack_with_misshapen_block_scales_is_one_clear_error(tmp_path):
    ckpt = to_transformers_layout(write_modelopt_checkpoint(tmp_path / "hub"), tmp_path / "fused")
    state = read_safetensors(ckpt)
    name = "model.layers.4.mixer.experts.down_proj_weight_scale"
    state[name] = state[name][:, :, :2].contiguous()      # (E, out, in/32): not ModelOpt's groups of 16
    for shard in ckpt.glob("model*.safetensors*"):
        shard.unlink()
    write_safetensors(ckpt, state, 2, total_parameters=True)
    result = run_cli("convert", ckpt, "-o", tmp_path / "out.gguf")
    assert result.exit_code == 1 and not (tmp_path / "out.gguf").exists()
    assert f"{name}[0]" in result.output and "F8_E4M3 [64, 2]" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_fused_stack_that_is_not_3d_is_reported(tmp_path):
    ckpt = to_transformers_layout(write_modelopt_checkpoint(tmp_path / "hub"), tmp_path / "fused")
    state = read_safetensors(ckpt)
    name = "model.layers.1.mixer.experts.up_proj"
    state[name] = state[name].reshape(-1, state[name].shape[-1]).contiguous()
    for shard in ckpt.glob("model*.safetensors*"):
        shard.unlink()
    write_safetensors(ckpt, state, 2, total_parameters=True)
    result = run_cli("convert", ckpt, "-o", tmp_path / "out.gguf")
    assert result.exit_code == 1, result.output
    assert f"fused expert stack {name} has shape" in result.output, result.output
