"""The profile's KLD of a rounded file measured as streams of the layer-streamed forward
(nemoq/calib/ablations.py), held to llama.cpp's KLD of the same file on the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize

from nemoq.calib import ablations
from nemoq.calib.ablations import StreamedKLD, plain_sequences, q8_0_activations, q8_k_activations, streamed_klds
from nemoq.calib.hparams import config_of
from nemoq.calib.sensitivity import FIRST, Scorer, plain_text, text_sequences, write_with_types
from nemoq.convert.pipeline import open_source
from nemoq.eval.model import LlamaModel

CTX = 256
# one tensor at a time, each kind of step: the embeddings (no matmul), Mamba and attention
# matrices, a shared expert, an expert stack in a format with a per-expert scale, the head; the
# 8-bit ones are where llama.cpp's rounding of the activations is as large as the weights'.
# (Not F16: its KLD, ~1e-9 here, is at the level of the two sides' summation orders.)
MIXES = [
    {"token_embd.weight": "q4_0"},
    {"blk.0.ssm_in.weight": "q8_0"},
    {"blk.0.ssm_out.weight": "q6_k"},          # q8_K activations
    {"blk.2.ssm_out.weight": "q4_k"},
    {"blk.1.ffn_down_shexp.weight": "q8_0"},
    {"blk.1.ffn_up_exps.weight": "nvfp4"},
    {"blk.1.ffn_down_exps.weight": "q8_0"},
    {"blk.3.attn_q.weight": "q5_0"},
    {"blk.3.attn_output.weight": "iq4_nl"},
    {"output.weight": "q8_0"},
    {"token_embd.weight": "q8_0", "blk.0.ssm_in.weight": "q5_1", "blk.2.ssm_out.weight": "q5_k",
     "blk.1.ffn_up_exps.weight": "mxfp4", "blk.4.ffn_down_exps.weight": "q5_0", "output.weight": "q4_0"},
]


@pytest.fixture(scope="module")
def source(tiny_model):
    return open_source(tiny_model)


@pytest.fixture(scope="module")
def sequences(source):
    return plain_sequences(source, plain_text(None), CTX, 1024)


@pytest.fixture(scope="module")
def streamed(source, sequences):
    run = StreamedKLD(source, MIXES + [{}], sequences, device=torch.device("cpu"), first=FIRST)
    return run.run(), run.scored


def test_streams_measure_llama_cpps_kld_of_the_same_file(source, sequences, streamed, tmp_path):
    klds, scored = streamed
    base, one = tmp_path / "base.gguf", tmp_path / "one.gguf"
    write_with_types(source, base, {})
    with LlamaModel(base, CTX) as m:   # the source's tokenizer reads the text as llama.cpp does
        np.testing.assert_array_equal(text_sequences(m, plain_text(None), CTX, 1024), sequences)
    scorer = Scorer(base, sequences, FIRST)
    assert scored == sum(len(b) for b in scorer.base) == sequences.shape[0] * (CTX - 1 - FIRST)
    measured = []
    for mix in MIXES:
        write_with_types(source, one, mix)
        measured.append(scorer.kld(one))
    ratios = np.array(klds[:len(MIXES)]) / np.array(measured)
    summary = {next(iter(m.items())): round(float(r), 4) for m, r in zip(MIXES, ratios)}
    # a rounding can tip a router's near-tie one way in torch and the other in ggml: a single
    # token's other experts move a small KLD by a few percent
    assert np.abs(ratios - 1).max() < 0.1, summary
    assert np.median(np.abs(ratios - 1)) < 0.01, summary


def test_a_mix_of_nothing_costs_nothing(streamed):
    klds, _ = streamed
    assert klds[-1] == 0.0
    assert all(k > 0 for k in klds[:-1])


def test_q8_0_activations_are_ggmls_q8_0_round_trip():
    x = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32) * np.float32(3)
    x[0, :32] = 0                       # an all-zero block
    want = dequantize(quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    got = q8_0_activations(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, want)


def q8_k_reference(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref and dequantize_row_q8_K (ggml-quants.c), one block at a time."""
    out = np.zeros_like(x)
    for r, row in enumerate(x.reshape(-1, 256)):
        m = row[np.argmax(np.abs(row))]
        if m == 0:
            continue
        iscale = np.float32(-127) / m
        q = np.minimum(127, np.rint(iscale * row))
        out.reshape(-1, 256)[r] = q * (np.float32(1) / iscale)
    return out


def test_q8_k_activations_follow_ggmls_reference():
    x = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)
    x[1, :256] = 0
    x[2, 7] = -9.0                      # the largest magnitude negative: codes run to +127
    np.testing.assert_allclose(q8_k_activations(torch.from_numpy(x)).numpy(), q8_k_reference(x), rtol=1e-6)


def test_streams_beyond_one_pass_go_in_more_passes_with_the_same_klds(source, monkeypatch):
    mixes, cpu, steps = MIXES[:3], torch.device("cpu"), config_of(source).n_layers + 1
    one, scored = streamed_klds(source, mixes, plain_text(None), tokens=512, ctx=CTX, first=FIRST, device=cpu)
    monkeypatch.setattr(ablations, "STREAM_BYTES", 1)   # a stream a pass
    seen = []
    many, again = streamed_klds(source, mixes, plain_text(None), tokens=512, ctx=CTX, first=FIRST, device=cpu,
                                on_progress=lambda done, total: seen.append((done, total)))
    assert many == one and again == scored
    assert seen == [(i, 3 * steps) for i in range(1, 3 * steps + 1)]
