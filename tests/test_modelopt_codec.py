"""The ModelOpt codec tables and the quantization config, against torch, gguf-py and the fixture."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from nemoq.convert import modelopt_codec as codec
from nemoq.convert.modelopt_config import read_quant_config
from tests.fixtures.modelopt import nvfp4_dequantize


def test_e4m3_table_is_torchs_float8_e4m3fn():
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(codec.E4M3, want)   # NaN where torch has NaN


def random_nvfp4(rows=6, width=256, seed=0):
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (rows, width // 2), dtype=np.uint8)
    scales = rng.integers(0, 0x7F, (rows, width // 16), dtype=np.uint8)   # every non-NaN, non-negative code
    return packed, scales


def test_repacked_blocks_dequantize_in_gguf_py_to_modelopts_values():
    packed, scales = random_nvfp4()
    blocks = codec.repack_nvfp4(packed, scales)
    got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.NVFP4).reshape(packed.shape[0], -1)
    want = nvfp4_dequantize(torch.from_numpy(packed), torch.from_numpy(scales).view(torch.float8_e4m3fn),
                            torch.tensor(1.0)).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(codec.dequantize_nvfp4(packed, scales, 1.0), want)


@pytest.mark.parametrize("scale_2", [2.0 ** -4, 2.0 ** 3, 0.37, 2.0 ** -12])
def test_fold_is_offered_exactly_when_every_product_is_an_e4m3_value(scale_2):
    _, scales = random_nvfp4(seed=1)
    scales = scales[(scales >= 0x30) & (scales < 0x50)].reshape(1, -1)   # mid-range: pow2 shifts may fit
    table = codec.fold_scale_2(scales, scale_2)
    product = torch.from_numpy(scales).view(torch.float8_e4m3fn).double() * scale_2
    exact = bool((product.float().to(torch.float8_e4m3fn).double() == product).all())
    assert (table is not None) == exact
    if table is not None:
        np.testing.assert_array_equal(codec.E4M3[table[scales]].astype(np.float64), product.numpy())


def test_negative_and_nan_block_scales_are_refused():
    with pytest.raises(Exception, match="NaN"):
        codec.check_scales(np.array([[0x10, 0x7F]], dtype=np.uint8), "w.weight_scale", "f")
    with pytest.raises(Exception, match="negative"):
        codec.check_scales(np.array([[0x90]], dtype=np.uint8), "w.weight_scale", "f")


def test_quant_config_from_config_json_with_ignore_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head", "*conv1d*"]}}))
    q = read_quant_config(tmp_path)
    assert q.algo == "FP8" and q.path.name == "config.json"
    assert q.is_excluded("lm_head") and q.is_excluded("backbone.layers.0.mixer.conv1d")
    assert not q.is_excluded("backbone.layers.0.mixer.in_proj")


def test_quant_config_mixed_precision_names_an_algorithm_per_module(tmp_path):
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {
        "quant_algo": "MIXED_PRECISION", "quantized_layers": {
            "backbone.layers.0.mixer.in_proj": {"quant_algo": "NVFP4", "group_size": 16},
            "backbone.layers.1.mixer.shared_experts.up_proj": {"quant_algo": "FP8"}}}}))
    q = read_quant_config(tmp_path)
    assert q.algo_for("backbone.layers.0.mixer.in_proj") == "NVFP4"
    assert q.algo_for("backbone.layers.1.mixer.shared_experts.up_proj") == "FP8"
    assert q.algo_for("lm_head") is None


def test_unquantized_checkpoint_has_no_quant_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NemotronHForCausalLM"]}))
    assert read_quant_config(tmp_path) is None
