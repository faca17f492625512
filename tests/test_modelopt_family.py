"""ModelOpt exports of the family (Super: LatentMoE + MTP; Lightning: Nano's structure + MTP),
laid out as NVIDIA's NVFP4 releases, checked against an independent numpy dequantization.

The oracle (tests/modelopt_numpy.py) decodes the checkpoint's bytes from the format definition
and writes the float32 checkpoint of its values. Then:
* `--outtype f32`: the file is, tensor for tensor and bit for bit, nemoq's F32 conversion of that
  float checkpoint (the float path tests/test_family_convert.py holds to llama.cpp's converter),
  and llama.cpp's logits on it match transformers' on the float checkpoint (<= 1e-3, top-1 100 %).
* `auto` (NVFP4 kept): gguf-py's dequantization of every NVFP4 tensor times its `.scale` equals
  the oracle exactly, FP8 tensors are the BF16 rounding of its values, BF16 and F32 ones are
  as stored - the MTP block included (transformers and llama.cpp's trunk never run it, so this
  is its check). Lightning's NVFP4 lm_head is the one re-quantized tensor (llama.cpp loads no
  output.scale; docs/modelopt.md, path 3). llama.cpp on the file itself quantizes activations
  to Q8_0 for NVFP4 matmuls: its logits are held to twice the distance of a Q8_0 file of the same
  values, and must be far closer than the file without its `.scale` tensors.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase

import gguf
import numpy as np
import pytest

from tests.conftest import convert
from tests.fixtures.family_modelopt import NEVER_QUANTIZED, RELEASE_KINDS, WRITERS
from tests.gguf_edit import dequantized, rewrite_gguf
from tests.modelopt_numpy import bf16_round, dequantized_state, read_shard, write_float_checkpoint
from tests.oracles import compare, hf_logits, llama_logits
from tests.test_convert_golden import random_ids

# layout -> GGUF tensors re-quantized by design (their weight_scale_2 does not fold, no .scale loaded)
REQUANTIZED = {"super": set(), "lightning": {"output.weight"}}
STORAGE_KIND = {"U8": "NVFP4", "F8_E4M3": "FP8", "BF16": "BF16", "F32": "F32"}


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.square(a - b).mean() / np.square(b).mean()))


@pytest.fixture(scope="module", params=list(WRITERS))
def case(request, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp(f"modelopt-{request.param}")
    ckpt = WRITERS[request.param](tmp / "ckpt")
    floats = write_float_checkpoint(ckpt, tmp / "float")
    return {"layout": request.param, "ckpt": ckpt, "float": floats, "tmp": tmp,
            "auto": convert(ckpt, tmp / "auto.gguf"), "f32": convert(ckpt, tmp / "f32.gguf", "--outtype", "f32"),
            "reference": convert(floats, tmp / "reference.gguf", "--outtype", "f32")}


def stored_kinds(ckpt) -> dict[str, str]:
    """module -> how the checkpoint stores its weight (NVFP4, FP8, BF16, F32)."""
    stored = {}
    for shard in ckpt.glob("model*.safetensors"):
        stored.update(read_shard(shard))
    return {n.removesuffix(".weight"): STORAGE_KIND[dtype] for n, (dtype, _) in stored.items() if n.endswith(".weight")}


def tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_fixture_holds_every_tensor_kind_of_the_release(case):
    kinds = stored_kinds(case["ckpt"])
    missing = [(glob, kind) for glob, kind in RELEASE_KINDS[case["layout"]]
               if not any(fnmatchcase(m, glob) and k == kind for m, k in kinds.items())]
    assert missing == []
    never = NEVER_QUANTIZED[case["layout"]]
    assert [m for m, k in kinds.items() if k in ("NVFP4", "FP8") and any(fnmatchcase(m, g) for g in never)] == []
    section = json.loads((case["ckpt"] / "hf_quant_config.json").read_text())["quantization"]
    assert section["quant_algo"] == "MIXED_PRECISION"
    declared = {m: v["quant_algo"] for m, v in section["quantized_layers"].items()}
    assert declared == {m: k for m, k in kinds.items() if k in ("NVFP4", "FP8")}
    stored = {}
    for shard in case["ckpt"].glob("model*.safetensors"):
        stored.update(read_shard(shard))
    for module, kind in declared.items():   # per-tensor FP8; NVFP4 groups of 16; an input_scale each
        weight, scale = stored[module + ".weight"][1], stored[module + ".weight_scale"][1]
        assert scale.size == 1 if kind == "FP8" else scale.shape == (weight.shape[0], weight.shape[1] * 2 // 16)
        assert module + ".input_scale" in stored


def test_numpy_e4m3_decodes_every_byte_as_torch_does():
    import torch
    from tests.modelopt_numpy import e4m3
    bits = np.arange(256, dtype=np.uint8)
    want = torch.from_numpy(bits).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(e4m3(bits), want)


def test_numpy_oracle_agrees_with_the_fixtures_torch_dequantization(case):
    from tests.fixtures.modelopt import read_safetensors, write_dequantized
    torch_values = read_safetensors(write_dequantized(case["ckpt"], case["tmp"] / "torch-dequantized"))
    ours = dequantized_state(case["ckpt"])
    assert set(ours) == set(torch_values)
    assert [n for n in ours if not np.array_equal(ours[n], torch_values[n].numpy())] == []


def test_f32_file_is_the_dequantized_checkpoints_conversion(case):
    ours, reference = tensors(case["f32"]), tensors(case["reference"])
    assert [(n, t.tensor_type) for n, t in ours.items()] == [(n, t.tensor_type) for n, t in reference.items()]
    assert [n for n in ours if not np.array_equal(np.asarray(ours[n].data), np.asarray(reference[n].data))] == []


def test_auto_file_keeps_nvfp4_bit_for_bit(case):
    ours, reference = tensors(case["auto"]), tensors(case["reference"])
    assert {n for n in ours if not n.endswith((".scale", ".input_scale"))} == set(reference)
    by_type: dict[str, list[str]] = {}
    differ = []
    for name, t in ours.items():
        if name.endswith((".scale", ".input_scale")):
            continue
        want = dequantized(reference[name])
        values = dequantized(t)
        scale = ours.get(name.removesuffix(".weight") + ".scale")
        if scale is not None:
            s = np.asarray(scale.data, dtype=np.float32)
            values = values * (s.reshape(-1, 1, 1) if values.ndim == 3 else s.reshape(()))
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            want = bf16_round(want)
        by_type.setdefault(t.tensor_type.name, []).append(name)
        if not np.array_equal(values, want):
            differ.append(name)
    assert sorted(differ) == sorted(REQUANTIZED[case["layout"]])
    for name in differ:   # path 3's error, as convert reports it (2.7 % RMS on this fixture)
        assert rel_rms(dequantized(ours[name]), dequantized(reference[name])) < 0.05
    mtp = f'blk.{len(json.loads((case["ckpt"] / "config.json").read_text())["hybrid_override_pattern"])}.'
    nvfp4 = set(by_type["NVFP4"])
    assert {name for name in reference if "_exps." in name and not name.startswith(mtp)} <= nvfp4
    assert not any(name.startswith(mtp) for name in nvfp4)                 # the MTP block: BF16
    assert not any(name.startswith(mtp) and name.endswith("scale") for name in ours)


def test_logits_match_transformers_on_the_dequantized_checkpoint(case):
    ids = random_ids(json.loads((case["float"] / "config.json").read_text())["vocab_size"])
    stats = compare(llama_logits(case["f32"], ids), hf_logits(case["float"], ids, clamp_dt=False))
    assert stats["max_abs_diff"] <= 1e-3, stats   # measured 2.9e-4 (super), 3.6e-4 (lightning)
    assert stats["top1"] == 1.0, stats


def test_nvfp4_file_runs_within_llama_cpps_q8_0_activation_noise(case):
    ids = random_ids(json.loads((case["float"] / "config.json").read_text())["vocab_size"])
    reference = hf_logits(case["float"], ids, clamp_dt=False)
    unscaled = case["tmp"] / "unscaled.gguf"
    rewrite_gguf(case["auto"], unscaled, lambda name, t: False if name.endswith(".scale") else None)
    q8_0 = convert(case["float"], case["tmp"] / "q8_0.gguf", "--outtype", "q8_0")
    ours, without, floor = (rel_rms(llama_logits(p, ids), reference) for p in (case["auto"], unscaled, q8_0))
    assert ours <= 2 * floor, (ours, floor)
    assert not without <= 4 * ours, (ours, without)   # NaN too: unscaled values can overflow
