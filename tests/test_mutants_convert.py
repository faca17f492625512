"""The converter's name and metadata helpers, as mutation testing (docs/mutation.md) found them
untested: against llama.cpp's tensor names and GGUF keys as gguf-py spells them, and the A
transform against llama.cpp's converter (`-torch.exp(A_log)` in float32)."""

from __future__ import annotations

import numpy as np
import torch
from gguf import MODEL_TENSOR

from nemoq.convert.mapping import ROWS_BY_LAYER_KIND, TAIL_ROWS, Row, llama_cpp_build_for, neg_exp


def test_neg_exp_is_llama_cpps_a_transform_in_float32():
    a_log = np.array([[-3.0, -0.5, 0.0], [0.25, 1.0, 2.5]], np.float32)
    ours = neg_exp(a_log)
    theirs = (-torch.exp(torch.from_numpy(a_log).double())).float().numpy()   # exact exp, rounded once
    assert ours.shape == a_log.shape and ours.dtype == np.float32
    assert (ours == theirs).all()
    assert (np.abs(ours - (-torch.exp(torch.from_numpy(a_log))).numpy()) <= np.spacing(np.abs(ours))).all()


def test_gguf_names_are_llama_cpps():
    """The names llama.cpp's nemotron_h_moe loader looks up (llama-arch.cpp)."""
    a = next(r for r in ROWS_BY_LAYER_KIND["mamba"] if r.tensor == MODEL_TENSOR.SSM_A)
    conv_bias = next(r for r in ROWS_BY_LAYER_KIND["mamba"] if r.suffix == "bias")
    assert a.gguf_name(7) == "blk.7.ssm_a"
    assert conv_bias.gguf_name(0) == "blk.0.ssm_conv1d.bias"
    assert TAIL_ROWS[-1].gguf_name(None) == "output.weight"
    assert Row("x", MODEL_TENSOR.FFN_DOWN_EXP, "weight", ()).gguf_name(12) == "blk.12.ffn_down_exps.weight"


def test_the_llama_cpp_build_is_the_newest_any_scale_needs():
    assert llama_cpp_build_for([]) == 0
    assert llama_cpp_build_for(["output.scale", "token_embd.weight"]) == 0     # not a scale llama.cpp loads
    assert llama_cpp_build_for(["blk.12.ssm_in.scale"]) == 8372                # any layer number
    assert llama_cpp_build_for(["blk.0.attn_v.scale", "blk.3.ssm_out.scale"]) == 8827
    assert llama_cpp_build_for(["blk.3.ssm_out.scale", "blk.0.attn_v.scale"]) == 8827   # in any order
    assert llama_cpp_build_for(["blk.3.ssm_out.weight.scale"]) == 0


def hparams_read_back(config, tmp_path, **kwargs) -> dict:
    """The key/values add_hparams writes, as gguf-py's reader returns them."""
    import gguf

    from nemoq.convert.metadata import add_hparams

    path = tmp_path / "kv.gguf"
    writer = gguf.GGUFWriter(path, "nemotron_h_moe")
    add_hparams(writer, config, "probe", **kwargs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def config_from(cfg: dict, tmp_path):
    import json

    from nemoq.convert.config import load_config

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return load_config(tmp_path)


def test_puzzle_expert_sizes_are_per_layer_arrays_as_llama_cpps_converter_writes(tmp_path):
    """llama.cpp reads expert_used_count and expert_feed_forward_length as one value or one per
    layer (get_key_or_arr); its converter writes Puzzle's per-block values with 0 on other layers."""
    from tests.fixtures.family import PUZZLE_BLOCKS, puzzle_config

    kv = hparams_read_back(config_from(puzzle_config(), tmp_path), tmp_path)
    moe = [b["block_type"] == "moe" for b in PUZZLE_BLOCKS]
    assert kv["nemotron_h_moe.expert_used_count"] == [b.get("num_experts_per_tok", 0) for b in PUZZLE_BLOCKS]
    assert kv["nemotron_h_moe.expert_feed_forward_length"] == [
        b["moe_intermediate_size"] if m else 0 for b, m in zip(PUZZLE_BLOCKS, moe)]
    assert "nemotron_h_moe.nextn_predict_layers" not in kv      # llama.cpp drops Puzzle's MTP head


def test_uniform_expert_sizes_are_single_uint32s(tmp_path):
    import gguf

    from tests.fixtures.checkpoints import tiny_config

    cfg = tiny_config()
    kv = hparams_read_back(config_from(cfg, tmp_path), tmp_path)
    assert kv["nemotron_h_moe.expert_used_count"] == cfg["num_experts_per_tok"]
    assert kv["nemotron_h_moe.expert_feed_forward_length"] == cfg["moe_intermediate_size"]
    reader = gguf.GGUFReader(tmp_path / "kv.gguf")
    assert reader.fields["nemotron_h_moe.expert_used_count"].types == [gguf.GGUFValueType.UINT32]


def test_mtp_rows_are_nvidias_names_under_their_sub_layer():
    """NVIDIA's hub checkpoints name the MTP block's attention under mtp.layers.0 and its MoE under
    mtp.layers.1 (REFERENCE.md, Family), each with the trunk's row for the same tensor."""
    from nemoq.convert.mapping import ATTENTION_ROWS, MOE_ROWS, MTP_ROWS, _under

    sources = {r.source for r in MTP_ROWS}
    assert {"0.mixer.q_proj.weight", "0.norm.weight", "1.mixer.gate.weight",
            "1.mixer.shared_experts.down_proj.weight"} <= sources
    moved = _under("1.", MOE_ROWS + ATTENTION_ROWS)
    assert [r.source for r in moved] == ["1." + r.source for r in MOE_ROWS + ATTENTION_ROWS]
    assert [(r.tensor, r.shape, r.keep_f32) for r in moved] == [(r.tensor, r.shape, r.keep_f32)
                                                               for r in MOE_ROWS + ATTENTION_ROWS]


def test_the_mtp_block_counts_as_one_more_block_with_attention_and_experts(tmp_path):
    """llama.cpp's converter appends the MTP block after the trunk (block_count + 1) and gives it
    both a KV head count and an expert width, since it holds an attention and an MoE sub-layer."""
    from tests.fixtures.checkpoints import tiny_config
    from tests.fixtures.family import LIGHTNING_DIMS

    cfg = tiny_config(**LIGHTNING_DIMS)
    kv = hparams_read_back(config_from(cfg, tmp_path), tmp_path)
    pattern = cfg["hybrid_override_pattern"]
    assert cfg["num_nextn_predict_layers"] == 1 and kv["nemotron_h_moe.block_count"] == len(pattern) + 1
    assert kv["nemotron_h_moe.nextn_predict_layers"] == 1
    assert kv["nemotron_h_moe.attention.head_count_kv"] == [
        cfg["num_key_value_heads"] if k == "*" else 0 for k in pattern] + [cfg["num_key_value_heads"]]
    assert kv["nemotron_h_moe.feed_forward_length"] == [
        cfg["moe_intermediate_size"] if k == "E" else 0 for k in pattern] + [cfg["moe_intermediate_size"]]


def test_key_or_array_writers_and_puzzle_values_called_directly(tmp_path):
    """HPARAMS builds these at import; called here so that each is exercised as it is written."""
    import gguf

    from nemoq.convert.config import ModelConfig
    from nemoq.convert.metadata import Keys, _per_layer_if_puzzle, _scalar_or_per_layer
    from tests.fixtures.checkpoints import tiny_config
    from tests.fixtures.family import puzzle_config

    (tmp_path / "p").mkdir()
    (tmp_path / "u").mkdir()
    puzzle, uniform = config_from(puzzle_config(), tmp_path / "p"), config_from(tiny_config(), tmp_path / "u")
    widths = _per_layer_if_puzzle(ModelConfig.expert_ff_of, lambda c: c.expert_ff)
    assert widths(puzzle) == [0, 64, 0, 0, 96] and widths(uniform) == uniform.expert_ff

    path = tmp_path / "kv.gguf"
    writer = gguf.GGUFWriter(path, "nemotron_h_moe")
    _scalar_or_per_layer(Keys.EXPERT_USED_COUNT)(writer, [0, 2, 0, 0, 3])
    _scalar_or_per_layer(Keys.EXPERT_FEED_FORWARD_LENGTH)(writer, 64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf.GGUFReader(path).fields
    assert fields["nemotron_h_moe.expert_used_count"].contents() == [0, 2, 0, 0, 3]
    assert fields["nemotron_h_moe.expert_feed_forward_length"].types == [gguf.GGUFValueType.UINT32]
    assert fields["nemotron_h_moe.expert_feed_forward_length"].contents() == 64


def test_neg_exp_overflows_to_minus_inf_quietly():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert neg_exp(np.array([100.0], np.float32))[0] == -np.inf


def test_size_label_counts_experts_as_llama_cpps_converter(tmp_path):
    """general.size_label from the tensors written: 4 experts of 64 x 32 x 2 matrices plus 1000
    other weights, labelled by gguf-py's size_label as llama.cpp's converter labels it."""
    import gguf

    from nemoq.convert.metadata import add_size_label

    writer = gguf.GGUFWriter(tmp_path / "s.gguf", "nemotron_h_moe")
    writer.add_tensor_info("token_embd.weight", (10, 100), np.dtype(np.float32), 4000)
    for name in ("blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"):
        writer.add_tensor_info(name, (4, 64, 32), np.dtype(np.float32), 4 * 4 * 64 * 32)
    add_size_label(writer)
    expert = 2 * 64 * 32
    assert writer.kv_data[0]["general.size_label"].value == gguf.size_label(1000 + 4 * expert, 1000, expert, 4)
    assert writer.kv_data[0]["general.size_label"].value == "4x5.1K"


def test_a_plan_without_the_mtp_block_writes_the_trunk_alone(tmp_path):
    """add_hparams(mtp_layers=0): the file leaves the MTP block out (llama.cpp's converter without
    --mtp), so neither the extra block nor nextn_predict_layers is written; general.type is model."""
    from tests.fixtures.checkpoints import tiny_config
    from tests.fixtures.family import LIGHTNING_DIMS

    cfg = tiny_config(**LIGHTNING_DIMS)
    config = config_from(cfg, tmp_path)
    kv = hparams_read_back(config, tmp_path, mtp_layers=0)
    assert kv["nemotron_h_moe.block_count"] == len(cfg["hybrid_override_pattern"])
    assert "nemotron_h_moe.nextn_predict_layers" not in kv
    assert kv["general.type"] == "model" and kv["general.name"] == "probe"
    kv = hparams_read_back(config, tmp_path, mtp_layers=1)
    assert kv["nemotron_h_moe.block_count"] == len(cfg["hybrid_override_pattern"]) + 1


def test_size_label_of_a_model_without_experts_counts_every_weight(tmp_path):
    import gguf

    from nemoq.convert.metadata import add_size_label

    writer = gguf.GGUFWriter(tmp_path / "d.gguf", "nemotron_h_moe")
    writer.add_tensor_info("token_embd.weight", (25, 100), np.dtype(np.float32), 10000)
    add_size_label(writer)
    assert writer.kv_data[0]["general.size_label"].value == gguf.size_label(2500, 0, 0, 0) == "2.5K"
