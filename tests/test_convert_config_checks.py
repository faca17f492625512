"""config.json checks taken from llama.cpp's converter and graph: the layer count against the
pattern, tied embeddings, and the activations llama.cpp hard-codes."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.fixtures.checkpoints import BLOCK_TYPES, write_checkpoint
from tests.oracles import compare, hf_logits, llama_logits
from tests.test_convert_errors import assert_fails, edit_config, edit_shard

# The untied random fixture gives max |diff| / max |logit| = 8e-5 between llama.cpp and transformers.
RELATIVE_TOLERANCE = 2e-4


def tensor_names(path) -> list[str]:
    return [t.name for t in gguf.GGUFReader(str(path)).tensors]


def assert_logits_match_transformers(ckpt, gguf_path) -> None:
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    ids = [int(i) for i in np.random.default_rng(0).integers(3, vocab, 96)]
    stats = compare(llama_logits(gguf_path, ids), hf_logits(ckpt, ids, clamp_dt=False))
    assert stats["max_abs_diff"] <= RELATIVE_TOLERANCE * stats["max_abs_logit"], stats
    assert stats["top1"] == 1.0, stats


# ---- num_hidden_layers against the layer pattern


def test_convert_rejects_layer_count_that_disagrees_with_pattern(fresh_checkpoint, tmp_path):
    edit_config(fresh_checkpoint, num_hidden_layers=6)   # the pattern MEM*E has 5
    assert_fails(fresh_checkpoint, tmp_path, "config.json", "num_hidden_layers is 6",
                 "hybrid_override_pattern has 5 layers")


def test_convert_rejects_layer_count_that_is_not_a_number(fresh_checkpoint, tmp_path):
    edit_config(fresh_checkpoint, num_hidden_layers="5")
    assert_fails(fresh_checkpoint, tmp_path, "config.json", "num_hidden_layers must be an integer")


def test_convert_takes_the_layer_count_from_layers_block_type(tmp_path):
    """As llama.cpp's converter and transformers: a layers_block_type list sets the count itself."""
    ckpt = write_checkpoint(tmp_path / "ckpt", layout="fused", dtype="float32")
    edit_config(ckpt, num_hidden_layers=6)
    convert(ckpt, tmp_path / "out.gguf")


def test_convert_rejects_pattern_and_block_types_that_disagree(fresh_checkpoint, tmp_path):
    """llama.cpp reads hybrid_override_pattern, transformers layers_block_type: both must say the same."""
    edit_config(fresh_checkpoint, layers_block_type=[BLOCK_TYPES[c] for c in "MEM*E"])
    convert(fresh_checkpoint, tmp_path / "same.gguf")
    edit_config(fresh_checkpoint, layers_block_type=[BLOCK_TYPES[c] for c in "ME*ME"])
    assert_fails(fresh_checkpoint, tmp_path, "config.json", "hybrid_override_pattern (MEM*E)",
                 "layers_block_type (ME*ME)", "describe different layers")


# ---- tie_word_embeddings


def test_tied_checkpoint_without_lm_head_runs_on_token_embd(tmp_path):
    """No output.weight, as llama.cpp's converter writes it; llama.cpp then multiplies by token_embd."""
    ckpt = write_checkpoint(tmp_path / "ckpt", dtype="float32", config_overrides={"tie_word_embeddings": True})
    assert "lm_head.weight" not in json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    gguf_path = convert(ckpt, tmp_path / "tied.gguf", "--outtype", "f32")
    names = tensor_names(gguf_path)
    assert "output.weight" not in names and "token_embd.weight" in names
    assert_logits_match_transformers(ckpt, gguf_path)


def test_tied_checkpoint_with_lm_head_converts_it(tmp_path):
    """transformers and llama.cpp's converter both use an lm_head that is there, tied or not."""
    ckpt = write_checkpoint(tmp_path / "ckpt", dtype="float32")
    edit_config(ckpt, tie_word_embeddings=True)
    gguf_path = convert(ckpt, tmp_path / "tied.gguf", "--outtype", "f32")
    assert "output.weight" in tensor_names(gguf_path)
    assert_logits_match_transformers(ckpt, gguf_path)


def test_untied_checkpoint_still_needs_lm_head(fresh_checkpoint, tmp_path):
    edit_shard(fresh_checkpoint, "lm_head.weight", lambda t: t.pop("lm_head.weight"))
    assert_fails(fresh_checkpoint, tmp_path, "missing 1 tensor", "lm_head.weight")


def test_convert_rejects_tie_word_embeddings_that_is_not_a_boolean(fresh_checkpoint, tmp_path):
    edit_config(fresh_checkpoint, tie_word_embeddings="yes")
    assert_fails(fresh_checkpoint, tmp_path, "config.json", "tie_word_embeddings must be true or false")


# ---- activations llama.cpp hard-codes


@pytest.mark.parametrize("key, value", [
    ("mamba_hidden_act", "gelu"),
    ("mamba_hidden_act", "relu2"),
    ("mlp_hidden_act", "silu"),
    ("mlp_hidden_act", "relu"),
    ("mlp_hidden_act", ["relu2"]),
])
def test_convert_rejects_activation_llama_cpp_does_not_compute(fresh_checkpoint, tmp_path, key, value):
    edit_config(fresh_checkpoint, **{key: value})
    assert_fails(fresh_checkpoint, tmp_path, "config.json", f"{key} is {json.dumps(value)}",
                 "the GGUF would compute another model")


def test_convert_accepts_activation_spellings_transformers_maps_to_the_same_function(fresh_checkpoint, tmp_path):
    """swish is SiLU in transformers' ACT2FN; an absent key means transformers' default."""
    config = json.loads((fresh_checkpoint / "config.json").read_text())
    del config["mlp_hidden_act"]
    config["mamba_hidden_act"] = "swish"
    (fresh_checkpoint / "config.json").write_text(json.dumps(config))
    result = run_cli("convert", fresh_checkpoint, "-o", tmp_path / "out.gguf")
    assert result.exit_code == 0, result.output
