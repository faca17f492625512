"""The streamed calibration forward pass against transformers' NemotronHForCausalLM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nemoq.calib import blocks
from nemoq.calib.forward import logits, streamed_forward
from nemoq.calib.hparams import config_of
from nemoq.calib.stats import ActivationStats
from nemoq.calib.weights import LayerLoader
from nemoq.convert.pipeline import open_source
from tests.fixtures.checkpoints import write_checkpoint
from tests.oracles import _hf_model

CPU = torch.device("cpu")
# The oracle must step the SSM as our forward does: no dt clamp when DT_LIMIT is (0, inf).
CLAMP_DT = blocks.DT_LIMIT != (0.0, math.inf)


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def token_sequences(vocab: int, n: int = 2, length: int = 200, seed: int = 0) -> np.ndarray:
    # 200 tokens: two SSD chunks of 128, the second padded
    return np.random.default_rng(seed).integers(0, vocab, (n, length)).astype(np.int32)


def ours(src, sequences, **kwargs):
    source = open_source(src)
    cfg = config_of(source)
    stats = ActivationStats(cfg.n_experts)
    hidden = streamed_forward(source.plan, cfg, sequences, stats.record, device=CPU, **kwargs)
    final = np.array(hidden.data)
    hidden.close()
    return source, final, stats


def reference(src, sequences):
    model = _hf_model(str(src), CLAMP_DT)
    with torch.no_grad():
        out = model(torch.from_numpy(sequences.astype(np.int64)), output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()   # the last hidden state is after norm_f


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib-ckpt")
    return {
        "hub": write_checkpoint(root / "hub", layout="hub", dtype="float32", seed=1),
        "fused": write_checkpoint(root / "fused", layout="fused", dtype="bfloat16", seed=2),
        "expert-groups": write_checkpoint(root / "groups", layout="hub", dtype="float32", seed=3,
                                          config_overrides={"n_group": 4, "topk_group": 2,
                                                            "hybrid_override_pattern": "ME*EM"}),
    }


@pytest.mark.parametrize("name", ["hub", "fused", "expert-groups", "nemotron-tiny"])
def test_streamed_forward_matches_transformers(name, random_checkpoints, tiny_model):
    src = tiny_model if name == "nemotron-tiny" else random_checkpoints[name]
    sequences = token_sequences(2048 if name == "nemotron-tiny" else 512)
    source, final, _ = ours(src, sequences)
    ref_hidden, ref_logits = reference(src, sequences)
    assert rel_err(final, ref_hidden) <= 1e-4
    assert rel_err(logits(source.plan, final, CPU), ref_logits) <= 1e-4


def test_gguf_source_gives_the_checkpoint_forward(tiny_model, tiny_gguf_f32):
    sequences = token_sequences(2048, n=1)
    _, from_checkpoint, _ = ours(tiny_model, sequences)
    _, from_gguf, _ = ours(tiny_gguf_f32, sequences)
    assert rel_err(from_gguf, from_checkpoint) <= 1e-6


def test_only_one_layer_is_held_at_a_time(tiny_model):
    """Every load happens after the previous layer's weights were freed."""
    source = open_source(tiny_model)
    cfg = config_of(source)
    loader = LayerLoader(source.plan, CPU)
    held_at_load = []
    load = loader._load

    def counting_load(tensors, prefix):
        held_at_load.append(len(loader.live))
        return load(tensors, prefix)
    loader._load = counting_load
    hidden = streamed_forward(source.plan, cfg, token_sequences(2048, n=1, length=64),
                              ActivationStats(cfg.n_experts).record, device=CPU, loader=loader)
    hidden.close()
    assert len(held_at_load) == cfg.n_layers + 2      # embeddings, every layer, the final norm
    assert max(held_at_load) == 0


def test_spilled_hidden_states_give_the_same_result(tiny_model):
    sequences = token_sequences(2048, n=2, length=64)
    _, in_memory, stats = ours(tiny_model, sequences)
    _, spilled, spilled_stats = ours(tiny_model, sequences, spill_bytes=0)
    np.testing.assert_array_equal(spilled, in_memory)
    for name in stats.sums:
        np.testing.assert_array_equal(spilled_stats.sums[name], stats.sums[name])
