"""The rest of the Nemotron-H MoE family (Super's LatentMoE, the MTP block, Puzzle) converts to what
llama.cpp's converter writes, loads in llama.cpp and computes transformers' logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nemoq.gguf_file import read_gguf
from tests.conftest import convert, run_cli
from tests.family_reference import REFERENCE, WRITERS, differences
from tests.fixtures.family import PUZZLE_BLOCKS, write_lightning, write_puzzle, write_super
from tests.llama_converter import converter_dir, run_llama_converter
from tests.oracles import compare, hf_logits, llama_logits
from tests.test_convert_golden import random_ids

NO_SDIST = "llama-cpp-python 0.3.36 sdist not found (tests/llama_converter.py says where to put it); " \
           "test_matches_llama_cpp_reference checks the same against tests/data/family_reference.json"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    return {name: write(tmp_path_factory.mktemp(name)) for name, write in WRITERS.items()}


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gguf")
    return {name: convert(ckpt, out / f"{name}.gguf", "--outtype", "f32") for name, ckpt in checkpoints.items()}


def _config(checkpoint) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


@pytest.mark.parametrize("name", list(WRITERS))
def test_matches_llama_cpp_reference(name, checkpoints, converted):
    reference = json.loads(REFERENCE.read_text())[name]
    assert differences(converted[name], reference, _config(checkpoints[name])) == []


@pytest.mark.skipif(converter_dir() is None, reason=NO_SDIST)
@pytest.mark.parametrize("name", list(WRITERS))
def test_matches_llama_cpp_converter_run_now(name, checkpoints, converted, tmp_path):
    from tests.family_reference import summary
    ours = run_llama_converter(checkpoints[name], tmp_path / "llama.gguf")
    assert differences(converted[name], summary(ours), _config(checkpoints[name])) == []


def test_super_layout_in_gguf(converted, checkpoints):
    """Experts in the latent width, router and shared expert full width, the MTP block appended."""
    cfg = _config(checkpoints["super"])
    H, L, I, E = cfg["hidden_size"], cfg["moe_latent_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    contents = read_gguf(converted["super"])
    shapes = {t.name: tuple(reversed(t.shape)) for t in contents.tensors}
    n = len(cfg["hybrid_override_pattern"])
    for layer in (1, n):   # a trunk MoE layer and the MTP block
        assert shapes[f"blk.{layer}.ffn_latent_down.weight"] == (L, H)
        assert shapes[f"blk.{layer}.ffn_latent_up.weight"] == (H, L)
        assert shapes[f"blk.{layer}.ffn_up_exps.weight"] == (E, I, L)
        assert shapes[f"blk.{layer}.ffn_down_exps.weight"] == (E, L, I)
        assert shapes[f"blk.{layer}.ffn_gate_inp.weight"] == (E, H)
    assert shapes[f"blk.{n}.nextn.eh_proj.weight"] == (H, 2 * H)
    meta = contents.metadata
    assert meta["nemotron_h_moe.block_count"] == n + 1
    assert meta["nemotron_h_moe.nextn_predict_layers"] == 1
    assert meta["nemotron_h_moe.moe_latent_size"] == L


@pytest.mark.parametrize("name", ["super", "lightning"])
def test_logits_match_transformers(name, checkpoints, converted):
    """LatentMoE (super) and Nano-like (lightning) trunks; transformers ignores mtp.* on load."""
    ids = random_ids(_config(checkpoints[name])["vocab_size"])
    stats = compare(llama_logits(converted[name], ids), hf_logits(checkpoints[name], ids, clamp_dt=False))
    assert stats["max_abs_diff"] <= 1e-3, stats
    assert stats["top1"] == 1.0, stats


def test_puzzle_runs_in_llama_cpp(checkpoints, converted):
    """No transformers class runs Puzzle; llama.cpp loads the per-layer arrays and runs the file."""
    meta = read_gguf(converted["puzzle"]).metadata
    widths = [b.get("moe_intermediate_size", 0) for b in PUZZLE_BLOCKS]
    assert meta["nemotron_h_moe.expert_feed_forward_length"] == widths
    assert meta["nemotron_h_moe.expert_used_count"] == [b.get("num_experts_per_tok", 0) for b in PUZZLE_BLOCKS]
    logits = llama_logits(converted["puzzle"], random_ids(_config(checkpoints["puzzle"])["vocab_size"], 32))
    assert logits.shape[0] == 32 and np.isfinite(logits).all() and logits.std() > 0


def test_puzzle_drops_its_mtp_block_and_says_so(checkpoints, tmp_path):
    result = run_cli("convert", checkpoints["puzzle"], "-o", tmp_path / "p.gguf")
    assert result.exit_code == 0, result.output
    assert "multi-token-prediction tensor" in result.output
    assert not any(".nextn." in t.name for t in read_gguf(tmp_path / "p.gguf").tensors)


def test_mtp_declared_but_absent_is_said_in_one_line(tmp_path):
    """The transformers-5 layout cannot hold MTP tensors (transformers drops them on load)."""
    ckpt = write_lightning(tmp_path / "ckpt", mtp=False)
    result = run_cli("convert", ckpt, "-o", tmp_path / "o.gguf")
    assert result.exit_code == 0, result.output
    assert "no mtp.* tensors" in result.output
    meta = read_gguf(tmp_path / "o.gguf").metadata
    assert meta["nemotron_h_moe.block_count"] == len(_config(ckpt)["hybrid_override_pattern"])
    assert "nemotron_h_moe.nextn_predict_layers" not in meta


def test_incomplete_mtp_block_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    ckpt = write_super(tmp_path / "ckpt", n_shards=1)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["mtp.layers.1.final_layernorm.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    result = run_cli("convert", ckpt, "-o", tmp_path / "o.gguf")
    assert result.exit_code != 0
    assert "mtp.layers.1.final_layernorm.weight" in result.output


@pytest.mark.parametrize("blocks, message", [
    ([{**b, "n_routed_experts": 4} if b["block_type"] == "moe" else b for b in PUZZLE_BLOCKS], "n_routed_experts"),
    ([{"block_type": "moe"} if b["block_type"] == "moe" else b for b in PUZZLE_BLOCKS], "without"),
    ([{**b, "block_type": "dense"} for b in PUZZLE_BLOCKS], "unknown layer kinds"),
])
def test_puzzle_block_configs_llama_cpp_cannot_hold_are_refused(blocks, message, tmp_path):
    ckpt = write_puzzle(tmp_path / "ckpt", blocks=PUZZLE_BLOCKS)
    cfg = _config(ckpt)
    cfg["block_configs"] = blocks
    (ckpt / "config.json").write_text(json.dumps(cfg))
    result = run_cli("convert", ckpt, "-o", tmp_path / "o.gguf")
    assert result.exit_code != 0
    assert message in result.output and "config.json" in result.output


def test_no_mtp_drops_the_block(checkpoints, converted, tmp_path):
    result = run_cli("convert", checkpoints["super"], "-o", tmp_path / "o.gguf", "--outtype", "f32", "--no-mtp")
    assert result.exit_code == 0, result.output
    assert "multi-token-prediction tensor" in result.output
    without, full = read_gguf(tmp_path / "o.gguf"), read_gguf(converted["super"])
    n = len(_config(checkpoints["super"])["hybrid_override_pattern"])
    assert without.metadata["nemotron_h_moe.block_count"] == n
    assert "nemotron_h_moe.nextn_predict_layers" not in without.metadata
    assert without.metadata["nemotron_h_moe.feed_forward_length"] == full.metadata[
        "nemotron_h_moe.feed_forward_length"][:n]
    kept = {t.name for t in full.tensors if not t.name.startswith(f"blk.{n}.")}
    assert {t.name for t in without.tensors} == kept


def test_transformers_layout_of_super_gives_the_hub_files_trunk(checkpoints, tmp_path):
    """transformers 5 saves LatentMoE experts fused in the latent width and drops mtp.*: the file
    is the hub checkpoint's without its MTP block, byte for byte, and says why there is none."""
    from tests.fixtures.checkpoints import to_fused_layout
    hub = write_super(tmp_path / "hub", mtp=False)
    fused = to_fused_layout(hub, tmp_path / "fused")
    assert "model.layers.1.mixer.experts.up_proj" in json.loads(
        (fused / "model.safetensors.index.json").read_text())["weight_map"]
    result = run_cli("convert", fused, "-o", tmp_path / "fused.gguf", "--outtype", "f32")
    assert result.exit_code == 0, result.output
    assert "no mtp.* tensors" in result.output
    a = read_gguf(convert(checkpoints["super"], tmp_path / "hub.gguf", "--outtype", "f32", "--no-mtp"))
    b = read_gguf(tmp_path / "fused.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for t in a.tensors:
        assert np.array_equal(np.asarray(a.tensor_data(t.name).data), np.asarray(b.tensor_data(t.name).data)), t.name


def test_more_than_one_mtp_block_is_refused_unless_dropped(tmp_path):
    ckpt = write_lightning(tmp_path / "ckpt")
    cfg = _config(ckpt)
    cfg["num_nextn_predict_layers"] = 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    result = run_cli("convert", ckpt, "-o", tmp_path / "o.gguf")
    assert result.exit_code == 1 and "llama.cpp loads one MTP block" in result.output, result.output
    assert run_cli("convert", ckpt, "-o", tmp_path / "o.gguf", "--no-mtp").exit_code == 0


def test_super_modelopt_mixed_precision_export_converts(tmp_path):
    """As NVIDIA's Super NVFP4 release: routed experts NVFP4 (kept as stored, with `.scale`), shared
    experts, Mamba projections and latent projections FP8, attention and mtp.* BF16."""
    from tests.fixtures.modelopt import export_modelopt
    dims = {"hidden_size": 192, "moe_latent_size": 128, "moe_intermediate_size": 128,
            "moe_shared_expert_intermediate_size": 128, "n_routed_experts": 32, "num_experts_per_tok": 4}
    ckpt = export_modelopt(write_super(tmp_path / "float", overrides=dims, dtype="bfloat16"), tmp_path / "nvfp4",
                           algo="MIXED_PRECISION",
                           exclude=("lm_head", "*mixer.conv1d*", "mtp.*", "*layers.3.mixer.*", "*layers.2.mixer.*_proj"),
                           fp8_modules=("*shared_experts*", "*mixer.in_proj", "*mixer.out_proj", "*latent_proj"))
    result = run_cli("convert", ckpt, "-o", tmp_path / "o.gguf")
    assert result.exit_code == 0, result.output
    types = {t.name: t.type_name for t in read_gguf(tmp_path / "o.gguf").tensors}
    n = len(_config(ckpt)["hybrid_override_pattern"])
    for layer in (1, 4):
        assert types[f"blk.{layer}.ffn_up_exps.weight"] == types[f"blk.{layer}.ffn_down_exps.weight"] == "NVFP4"
        assert f"blk.{layer}.ffn_up_exps.scale" in types
        assert types[f"blk.{layer}.ffn_latent_down.weight"] == "BF16"   # FP8 values, dequantized
    assert types[f"blk.{n}.ffn_up_exps.weight"] == types[f"blk.{n}.nextn.eh_proj.weight"] == "BF16"
    assert not any(name.startswith(f"blk.{n}.") and name.endswith("scale") for name in types)
