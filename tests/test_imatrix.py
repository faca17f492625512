"""Importance matrices: llama.cpp's file formats, and their use by every quantizer."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from nemoq.calib.imatrix_file import ImportanceMatrix, read_imatrix, write_imatrix
from nemoq.convert.config import load_config
from nemoq.convert.plan import tensor_specs
from nemoq.gguf_file import read_gguf
from nemoq.quant.formats import FORMATS
from tests.conftest import run_cli


def synthetic_imatrix(model_dir, seed=0, unseen_expert=None) -> ImportanceMatrix:
    """Random but strongly uneven column statistics for every matrix of the model."""
    rng = np.random.default_rng(seed)
    sums, counts = {}, {}
    for spec in tensor_specs(load_config(model_dir)):
        if spec.keep_f32 or len(spec.shape) < 2:
            continue
        n_mat = spec.shape[0] if len(spec.shape) == 3 else 1
        counts[spec.name] = rng.integers(50, 500, n_mat).astype(np.float32)
        sums[spec.name] = (rng.lognormal(0, 2, (n_mat, spec.row_width)) * counts[spec.name][:, None]).astype(np.float32)
        if unseen_expert is not None and n_mat > 1:
            counts[spec.name][unseen_expert] = 0
            sums[spec.name][unseen_expert] = 0
    return ImportanceMatrix(sums, counts, ["synthetic"], 4, 512)


def test_gguf_imatrix_round_trips(tiny_model, tmp_path):
    im = synthetic_imatrix(tiny_model)
    write_imatrix(tmp_path / "im.gguf", im)
    back = read_imatrix(tmp_path / "im.gguf")
    assert back.datasets == ["synthetic"] and back.chunk_size == 512
    for name in im.sums:
        np.testing.assert_array_equal(back.sums[name], im.sums[name])
        np.testing.assert_array_equal(back.counts[name], im.counts[name])
    meta = read_gguf(tmp_path / "im.gguf").metadata
    assert meta["general.type"] == "imatrix" and "general.architecture" not in meta


def test_legacy_dat_imatrix_is_read(tmp_path):
    values = np.arange(1, 65, dtype=np.float32)
    name = b"blk.0.ssm_in.weight"
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 10, 64) + values.tobytes()
    (tmp_path / "im.dat").write_bytes(blob + struct.pack("<i", 10))
    im = read_imatrix(tmp_path / "im.dat")
    np.testing.assert_allclose(im.importance("blk.0.ssm_in.weight")[0], values / 10)


def test_unseen_expert_gets_the_layer_mean(tiny_model):
    im = synthetic_imatrix(tiny_model, unseen_expert=3)
    imp = im.importance("blk.1.ffn_up_exps.weight")
    others = [e for e in range(imp.shape[0]) if e != 3]
    np.testing.assert_allclose(imp[3], imp[others].mean(axis=0), rtol=1e-6)
    assert im.unseen_experts("blk.1.ffn_up_exps.weight") == 1


@pytest.mark.parametrize("recipe", ["NQ4", "Q4_K_M", "NVFP4", "MXFP4_MOE"])
def test_quantize_with_imatrix_lowers_the_weighted_error(recipe, tiny_model, tmp_path):
    """The routed experts' importance-weighted error, with their `.scale` where the FP4 recipes
    write one (tensor_scale.ScaledEncoding: importance reaches the scale search and the blocks)."""
    from safetensors import safe_open
    im = synthetic_imatrix(tiny_model, unseen_expert=5)
    write_imatrix(tmp_path / "im.gguf", im)
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    assert run_cli("quantize", tiny_model, "-o", plain, "--recipe", recipe).exit_code == 0
    result = run_cli("quantize", tiny_model, "-o", weighted, "--recipe", recipe, "--imatrix", tmp_path / "im.gguf")
    assert result.exit_code == 0, result.output

    name, source = "blk.1.ffn_up_exps.weight", "backbone.layers.1.mixer.experts.{}.up_proj.weight"
    shards = list(tiny_model.glob("*.safetensors"))
    original = []
    for x in range(8):
        for shard in shards:
            with safe_open(str(shard), "pt") as f:
                if source.format(x) in f.keys():
                    original.append(f.get_tensor(source.format(x)).float().numpy())
    original = np.stack(original)
    imp = im.importance(name)

    def weighted_error(path):
        contents = read_gguf(path)
        t = contents.tensor_data(name)
        fmt = FORMATS[t.tensor_type.name.lower()]
        deq = fmt.dequantize(np.asarray(t.data).reshape(original.shape[0] * original.shape[1], -1))
        deq = deq.reshape(original.shape)
        scale_name = name.removesuffix(".weight") + ".scale"
        if recipe in ("NVFP4", "MXFP4_MOE"):
            deq = deq * np.asarray(contents.tensor_data(scale_name).data).reshape(-1, 1, 1)
        return float((imp[:, None, :] * (deq - original) ** 2).sum())
    assert weighted_error(weighted) < weighted_error(plain)


def test_imatrix_for_another_model_is_refused(tiny_model, tmp_path):
    im = synthetic_imatrix(tiny_model)
    im.sums["blk.0.ssm_in.weight"] = im.sums["blk.0.ssm_in.weight"][:, :64]
    write_imatrix(tmp_path / "im.gguf", im)
    result = run_cli("quantize", tiny_model, "-o", tmp_path / "o.gguf", "--imatrix", tmp_path / "im.gguf")
    assert result.exit_code == 1 and "does not match the model" in result.output
    assert not (tmp_path / "o.gguf").exists()
