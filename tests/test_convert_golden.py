"""The converter's output, run by llama.cpp, gives the logits transformers gives."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import convert
from tests.fixtures.checkpoints import write_checkpoint
from tests.oracles import compare, hf_logits, llama_logits

N_TOKENS = 96

# Random-weight fixtures: both layouts, and shapes llama.cpp's own converter mishandles.
RANDOM_CASES = {
    "hub": dict(layout="hub"),
    "fused-layers-block-type": dict(layout="fused", pattern_key="layers_block_type"),
    "vocab-700-head-dim-32": dict(layout="hub", config_overrides=dict(vocab_size=700, mamba_head_dim=32,
                                                                       mamba_num_heads=8)),
    "widths-multiple-of-256": dict(layout="fused", config_overrides=dict(
        hidden_size=256, moe_intermediate_size=256, moe_shared_expert_intermediate_size=512,
        mamba_num_heads=4, mamba_head_dim=64, num_attention_heads=4, head_dim=64)),
}


def random_ids(vocab: int, n: int = N_TOKENS, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(3, vocab, n)]


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_fixture_logits_match_transformers(case, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", dtype="float32", **RANDOM_CASES[case])
    gguf_path = convert(ckpt, tmp_path / "out.gguf", "--outtype", "f32")
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    ids = random_ids(vocab)
    stats = compare(llama_logits(gguf_path, ids), hf_logits(ckpt, ids, clamp_dt=False))
    assert stats["max_abs_diff"] <= 1e-3, stats
    assert stats["top1"] == 1.0, stats


def tiny_ids(tiny_model) -> list[int]:
    from tokenizers import Tokenizer
    text = (tiny_model / "README.md").read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert len(ids) >= 128
    return [1] + ids[:127]


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_trained_model_f32_logits_match_transformers(layout, tiny_model, tiny_model_fused, tmp_path):
    ckpt = tiny_model if layout == "hub" else tiny_model_fused
    gguf_path = convert(ckpt, tmp_path / "tiny-f32.gguf", "--outtype", "f32")
    ids = tiny_ids(tiny_model)
    stats = compare(llama_logits(gguf_path, ids), hf_logits(ckpt, ids))
    # llama.cpp's sequential Mamba scan and transformers' chunked scan differ by ~3e-3 relative
    assert stats["max_abs_diff"] <= 5e-3 * stats["max_abs_logit"], stats
    assert stats["top1"] == 1.0, stats


def test_trained_model_f16_keeps_top1(tiny_model, tmp_path):
    gguf_path = convert(tiny_model, tmp_path / "tiny-f16.gguf", "--outtype", "f16")
    ids = tiny_ids(tiny_model)
    stats = compare(llama_logits(gguf_path, ids), hf_logits(tiny_model, ids))
    assert stats["top1"] >= 0.99, stats


def test_trained_model_q8_0_keeps_top1(tiny_model, tmp_path):
    gguf_path = convert(tiny_model, tmp_path / "tiny-q8_0.gguf", "--outtype", "q8_0")
    ids = tiny_ids(tiny_model)
    stats = compare(llama_logits(gguf_path, ids), hf_logits(tiny_model, ids))
    assert stats["top1"] >= 0.95, stats
