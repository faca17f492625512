"""Bad ModelOpt checkpoints: one line naming the file, exit code 1, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures.modelopt import write_modelopt_checkpoint
from tests.test_convert_errors import INDEX, assert_fails, shard_of

MODULE = "backbone.layers.0.mixer.in_proj"


@pytest.fixture
def nvfp4_checkpoint(tmp_path) -> Path:
    return write_modelopt_checkpoint(tmp_path / "ckpt")


def edit_shard(ckpt: Path, tensor: str, edit) -> Path:
    """edit_shard of test_convert_errors, through torch: numpy has no float8."""
    shard = shard_of(ckpt, tensor)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (ckpt / INDEX).write_text(json.dumps(index))
    return shard


def edit_quant_config(ckpt: Path, **changes) -> None:
    path = ckpt / "hf_quant_config.json"
    config = json.loads(path.read_text())
    config["quantization"].update(changes)
    path.write_text(json.dumps(config))


def test_modelopt_rejects_unknown_quant_algo(nvfp4_checkpoint, tmp_path):
    edit_quant_config(nvfp4_checkpoint, quant_algo="INT4_AWQ")
    assert_fails(nvfp4_checkpoint, tmp_path, "hf_quant_config.json", "unsupported quant_algo 'INT4_AWQ'")


def test_modelopt_rejects_nvfp4_groups_other_than_16(nvfp4_checkpoint, tmp_path):
    edit_quant_config(nvfp4_checkpoint, group_size=32)
    assert_fails(nvfp4_checkpoint, tmp_path, "hf_quant_config.json", "group_size 32")


@pytest.mark.parametrize("companion", ["weight_scale", "weight_scale_2"])
def test_modelopt_rejects_missing_scale(companion, nvfp4_checkpoint, tmp_path):
    name = f"{MODULE}.{companion}"
    shard = edit_shard(nvfp4_checkpoint, name, lambda t: t.pop(name))
    assert_fails(nvfp4_checkpoint, tmp_path, shard.name, f"has no {name}")


def test_modelopt_rejects_mismatching_scale_shape(nvfp4_checkpoint, tmp_path):
    name = f"{MODULE}.weight_scale"
    shard = edit_shard(nvfp4_checkpoint, name, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    assert_fails(nvfp4_checkpoint, tmp_path, shard.name, name, "NVFP4 needs F8_E4M3")


def test_modelopt_rejects_mismatching_packed_weight(nvfp4_checkpoint, tmp_path):
    # Half the packed columns: the config's width no longer matches the unpacked weight.
    name = f"{MODULE}.weight"
    shard = edit_shard(nvfp4_checkpoint, name, lambda t: t.update({name: t[name][:, ::2].contiguous()}))
    assert_fails(nvfp4_checkpoint, tmp_path, shard.name, f"{MODULE}.weight_scale")


def test_modelopt_rejects_a_scale_on_an_excluded_module(nvfp4_checkpoint, tmp_path):
    edit_quant_config(nvfp4_checkpoint, exclude_modules=["lm_head", "*in_proj"])
    assert_fails(nvfp4_checkpoint, tmp_path, "excluded from quantization in hf_quant_config.json")


def test_modelopt_rejects_nan_block_scale(nvfp4_checkpoint, tmp_path):
    name = f"{MODULE}.weight_scale"

    def poison(t):
        bits = t[name].view(torch.uint8).clone()
        bits[0, 0] = 0x7F                     # E4M3's NaN
        t[name] = bits.view(torch.float8_e4m3fn)
    shard = edit_shard(nvfp4_checkpoint, name, poison)
    result = assert_fails(nvfp4_checkpoint, tmp_path, shard.name, "NaN block scale", extra=("--outtype", "auto"))
    assert name in result
