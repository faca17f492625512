"""Read the converter's output back with gguf-py: names, shapes, types, metadata and values."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from nemoq.gguf_file import read_gguf
from tests.conftest import convert

# Written out by hand from llama.cpp's nemotron_h_moe loader, independent of nemoq's tables.
PER_KIND = {
    "M": ["attn_norm.weight", "ssm_in.weight", "ssm_conv1d.weight", "ssm_conv1d.bias", "ssm_a", "ssm_d",
          "ssm_dt.bias", "ssm_norm.weight", "ssm_out.weight"],
    "*": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"],
    "E": ["attn_norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias", "ffn_up_shexp.weight",
          "ffn_down_shexp.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"],
}
ALWAYS_F32 = ("attn_norm", "ssm_conv1d", "ssm_a", "ssm_d", "ssm_dt", "ssm_norm", "ffn_gate_inp", "exp_probs_b",
              "output_norm")
REQUIRED_KEYS = [
    "general.architecture", "general.file_type", "nemotron_h_moe.context_length", "nemotron_h_moe.embedding_length",
    "nemotron_h_moe.block_count", "nemotron_h_moe.feed_forward_length", "nemotron_h_moe.attention.head_count",
    "nemotron_h_moe.attention.head_count_kv", "nemotron_h_moe.attention.key_length",
    "nemotron_h_moe.attention.value_length", "nemotron_h_moe.attention.layer_norm_epsilon",
    "nemotron_h_moe.expert_count", "nemotron_h_moe.expert_used_count", "nemotron_h_moe.expert_group_count",
    "nemotron_h_moe.expert_group_used_count", "nemotron_h_moe.expert_feed_forward_length",
    "nemotron_h_moe.expert_shared_feed_forward_length", "nemotron_h_moe.expert_shared_count",
    "nemotron_h_moe.expert_weights_norm", "nemotron_h_moe.expert_weights_scale", "nemotron_h_moe.vocab_size",
    "nemotron_h_moe.ssm.conv_kernel", "nemotron_h_moe.ssm.state_size", "nemotron_h_moe.ssm.group_count",
    "nemotron_h_moe.ssm.inner_size", "nemotron_h_moe.ssm.time_step_rank", "tokenizer.ggml.model",
    "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
]


def expected_names(pattern: str) -> list[str]:
    names = ["token_embd.weight"]
    for i, kind in enumerate(pattern):
        names += [f"blk.{i}.{n}" for n in PER_KIND[kind]]
    return names + ["output_norm.weight", "output.weight"]


def test_tensor_names_types_and_metadata(random_hub, random_hub_gguf):
    config = json.loads((random_hub / "config.json").read_text())
    contents = read_gguf(random_hub_gguf)
    pattern = config["hybrid_override_pattern"]
    assert [t.name for t in contents.tensors] == expected_names(pattern)
    for t in contents.tensors:
        assert t.type_name == "F32"
    c = config
    d_inner = c["mamba_num_heads"] * c["mamba_head_dim"]
    conv_dim = d_inner + 2 * c["n_groups"] * c["ssm_state_size"]
    m, e, a = pattern.index("M"), pattern.index("E"), pattern.index("*")
    expected_ne = {  # ggml order (ne0 = row width), as llama.cpp's loader states them
        "token_embd.weight": (c["hidden_size"], c["vocab_size"]),
        f"blk.{m}.ssm_in.weight": (c["hidden_size"], d_inner + conv_dim + c["mamba_num_heads"]),
        f"blk.{m}.ssm_conv1d.weight": (c["conv_kernel"], conv_dim),
        f"blk.{m}.ssm_a": (1, c["mamba_num_heads"]),
        f"blk.{m}.ssm_norm.weight": (d_inner // c["n_groups"], c["n_groups"]),
        f"blk.{m}.ssm_out.weight": (d_inner, c["hidden_size"]),
        f"blk.{a}.attn_k.weight": (c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]),
        f"blk.{e}.ffn_gate_inp.weight": (c["hidden_size"], c["n_routed_experts"]),
        f"blk.{e}.ffn_up_exps.weight": (c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]),
        f"blk.{e}.ffn_down_exps.weight": (c["moe_intermediate_size"], c["hidden_size"], c["n_routed_experts"]),
        f"blk.{e}.ffn_up_shexp.weight": (c["hidden_size"], c["moe_shared_expert_intermediate_size"]),
        "output.weight": (c["hidden_size"], c["vocab_size"]),
    }
    shapes = {t.name: t.shape for t in contents.tensors}
    for name, ne in expected_ne.items():
        assert shapes[name] == ne, name
    for key in REQUIRED_KEYS:
        assert key in contents.metadata, key
    m = contents.metadata
    assert m["general.architecture"] == "nemotron_h_moe"
    assert m["tokenizer.ggml.pre"] == "tekken"
    assert m["nemotron_h_moe.block_count"] == len(pattern)
    assert m["nemotron_h_moe.feed_forward_length"] == [config["moe_intermediate_size"] if k == "E" else 0
                                                         for k in pattern]
    assert m["nemotron_h_moe.attention.head_count_kv"] == [config["num_key_value_heads"] if k == "*" else 0
                                                            for k in pattern]
    assert m["nemotron_h_moe.ssm.inner_size"] == config["mamba_num_heads"] * config["mamba_head_dim"]
    assert m["nemotron_h_moe.expert_weights_scale"] == pytest.approx(config["routed_scaling_factor"])
    assert len(m["tokenizer.ggml.tokens"]) == config["vocab_size"]
    template = json.loads((random_hub / "tokenizer_config.json").read_text()).get("chat_template")
    if template is None:
        template = (random_hub / "chat_template.jinja").read_text()
    assert m["tokenizer.chat_template"] == template


def test_values_follow_llama_cpp_transforms(random_hub, random_hub_gguf):
    source = {}
    for shard in random_hub.glob("*.safetensors"):
        source.update(load_file(shard))
    reader = gguf.GGUFReader(random_hub_gguf)
    data = {t.name: np.asarray(t.data) for t in reader.tensors}
    config = json.loads((random_hub / "config.json").read_text())
    pattern = config["hybrid_override_pattern"]
    m, e = pattern.index("M"), pattern.index("E")
    p = f"backbone.layers.{m}.mixer"
    H = config["mamba_num_heads"]
    # A = -exp(A_log), correctly rounded to float32 (float64 exp first: numpy's float32 exp is off
    # by an ulp on some CPUs, and the file must not depend on the CPU)
    a = (-np.exp(source[f"{p}.A_log"].astype(np.float64))).astype(np.float32)
    np.testing.assert_array_equal(data[f"blk.{m}.ssm_a"], a.reshape(H, 1))
    np.testing.assert_array_equal(data[f"blk.{m}.ssm_d"], source[f"{p}.D"].reshape(H, 1))
    np.testing.assert_array_equal(data[f"blk.{m}.ssm_conv1d.weight"], source[f"{p}.conv1d.weight"][:, 0, :])
    np.testing.assert_array_equal(data[f"blk.{m}.ssm_norm.weight"],
                                  source[f"{p}.norm.weight"].reshape(config["n_groups"], -1))
    up = np.stack([source[f"backbone.layers.{e}.mixer.experts.{x}.up_proj.weight"]
                   for x in range(config["n_routed_experts"])])
    np.testing.assert_array_equal(data[f"blk.{e}.ffn_up_exps.weight"], up)
    np.testing.assert_array_equal(data["output.weight"], source["lm_head.weight"])


@pytest.mark.parametrize("outtype, matrix_type", [("bf16", "BF16"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_outtypes_keep_small_tensors_f32(random_hub, tmp_path, outtype, matrix_type):
    contents = read_gguf(convert(random_hub, tmp_path / "o.gguf", "--outtype", outtype))
    for t in contents.tensors:
        base = t.name.split(".")[2] if t.name.startswith("blk.") else t.name.split(".")[0]
        if base in ALWAYS_F32 or len(t.shape) == 1:
            assert t.type_name == "F32", t.name
        else:
            assert t.type_name == matrix_type, t.name


def test_bf16_values_round_like_torch(random_hub, tmp_path):
    import torch
    contents = read_gguf(convert(random_hub, tmp_path / "o.gguf", "--outtype", "bf16"))
    source = {}
    for shard in random_hub.glob("*.safetensors"):
        source.update(load_file(shard))
    ours = np.asarray(contents.tensor_data("output.weight").data).view(np.uint16)
    ref = torch.from_numpy(source["lm_head.weight"]).bfloat16().view(torch.uint16).numpy()
    np.testing.assert_array_equal(ours.reshape(ref.shape), ref)


def test_bf16_checkpoint_to_bf16_is_a_byte_copy(tiny_model, tmp_path):
    from safetensors import safe_open
    contents = read_gguf(convert(tiny_model, tmp_path / "o.gguf", "--outtype", "bf16"))
    shard = next(p for p in tiny_model.glob("*.safetensors")
                 if "lm_head.weight" in safe_open(str(p), "pt").keys())
    with safe_open(str(shard), "pt") as f:
        import torch
        ref = f.get_tensor("lm_head.weight").view(torch.uint16).numpy()
    ours = np.asarray(contents.tensor_data("output.weight").data).view(np.uint16).reshape(ref.shape)
    np.testing.assert_array_equal(ours, ref)


def test_multi_token_prediction_tensors_are_skipped_and_reported(random_hub, tmp_path):
    import shutil

    from safetensors.numpy import save_file
    from tests.conftest import run_cli
    ckpt = tmp_path / "ckpt"
    shutil.copytree(random_hub, ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    save_file({"mtp.layers.0.eh_proj.weight": np.zeros((4, 4), np.float32)}, ckpt / "mtp.safetensors")
    index["weight_map"]["mtp.layers.0.eh_proj.weight"] = "mtp.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run_cli("convert", ckpt, "-o", tmp_path / "o.gguf")
    assert result.exit_code == 0, result.output
    assert "skipped 1 multi-token-prediction tensor" in result.output
    assert all(not t.name.startswith("mtp") for t in read_gguf(tmp_path / "o.gguf").tensors)


def test_fast_metadata_packing_matches_gguf_py():
    from nemoq.convert.output import StreamingGGUFWriter
    w = StreamingGGUFWriter(None, "nemotron_h_moe")
    T = gguf.GGUFValueType
    cases = [(["a", "Ġb", "日本", "[PAD9]"] * 40, T.ARRAY, None), ([1, 3, 6, 1] * 40, T.ARRAY, None),
             ([0.5, 1.5] * 40, T.ARRAY, None), ([0, 1856] * 40, T.ARRAY, T.UINT32), (["x"] * 3, T.ARRAY, None)]
    for val, vtype, sub in cases:
        for add_vtype in (True, False):
            assert w._pack_val(val, vtype, add_vtype, sub) == gguf.GGUFWriter._pack_val(w, val, vtype, add_vtype, sub)
