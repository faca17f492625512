"""calibrate's layer-streamed forward on LatentMoE (Nemotron 3 Super): transformers' numbers, and
statistics for the latent projections and the experts in the latent width."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemoq.calib.forward import logits, streamed_forward
from nemoq.calib.hparams import config_of
from nemoq.calib.stats import ActivationStats
from nemoq.convert.pipeline import open_source
from tests.conftest import run_cli
from tests.fixtures.family import write_super
from tests.test_calib_forward import CPU, reference, rel_err, token_sequences


@pytest.fixture(scope="module")
def super_ckpt(tmp_path_factory):
    return write_super(tmp_path_factory.mktemp("super"), seed=4)


def test_latent_moe_forward_matches_transformers(super_ckpt):
    source = open_source(super_ckpt)
    cfg = config_of(source, forward="imatrix")
    sequences = token_sequences(cfg.vocab)
    stats = ActivationStats(cfg.n_experts)
    hidden = streamed_forward(source.plan, cfg, sequences, stats.record, device=CPU)
    final = np.array(hidden.data)
    hidden.close()
    ref_hidden, ref_logits = reference(super_ckpt, sequences)
    assert rel_err(final, ref_hidden) <= 1e-4
    assert rel_err(logits(source.plan, final, CPU), ref_logits) <= 1e-4
    imatrix = stats.to_imatrix(["test"], sequences.shape[0], sequences.shape[1])
    moe_layer = cfg.layers_of("moe")[0]
    down, up = (imatrix.sums[f"blk.{moe_layer}.ffn_latent_{d}.weight"] for d in ("down", "up"))
    assert down.shape[-1] == cfg.hidden and up.shape[-1] == cfg.latent
    assert imatrix.sums[f"blk.{moe_layer}.ffn_up_exps.weight"].shape[-1] == cfg.latent


def test_calibrate_then_quantize_with_its_imatrix(super_ckpt, tmp_path):
    """The MTP block gets no statistics from calibrate's forward: quantize says which tensors the
    imatrix does not cover, and the latent projections are covered."""
    imatrix = tmp_path / "imatrix.gguf"
    result = run_cli("calibrate", super_ckpt, "-o", imatrix, "--tokens", "2048", "--ctx", "256")
    assert result.exit_code == 0, result.output
    result = run_cli("quantize", super_ckpt, "-o", tmp_path / "q.gguf", "--recipe", "NQ4", "--imatrix", imatrix)
    assert result.exit_code == 0, result.output
    from nemoq.calib.imatrix_file import read_imatrix
    from nemoq.quant.recipes import stays_f32
    source = open_source(super_ckpt)
    n = config_of(source, forward="imatrix").n_layers
    covered = set(read_imatrix(imatrix).sums)
    mtp = [t.name for t in source.plan.tensors if t.layer == n and not stays_f32(t.spec)]
    assert "blk.1.ffn_latent_down.weight" in covered and "blk.1.ffn_latent_up.weight" in covered
    assert mtp and not covered & set(mtp)
    # token_embd (never calibrated, as in llama.cpp) and the MTP block
    assert f"imatrix has no statistics for {len(mtp) + 1} quantized tensor(s)" in result.output


def test_puzzle_forward_matches_llama_cpp(tmp_path):
    """No transformers class runs Puzzle: its per-layer top-k and expert widths are checked against
    llama.cpp running nemoq's F32 file (the same Mamba scan difference as elsewhere: <= 1e-3)."""
    from tests.conftest import convert
    from tests.fixtures.family import write_puzzle
    from tests.oracles import llama_logits
    ckpt = write_puzzle(tmp_path / "ckpt")
    source = open_source(ckpt)
    cfg = config_of(source, forward="imatrix")
    sequences = token_sequences(cfg.vocab, n=1, length=64)
    hidden = streamed_forward(source.plan, cfg, sequences, ActivationStats(cfg.n_experts).record, device=CPU)
    ours = logits(source.plan, np.array(hidden.data), CPU)[0]
    hidden.close()
    ref = llama_logits(convert(ckpt, tmp_path / "f32.gguf", "--outtype", "f32"), sequences[0].tolist())
    assert np.abs(ours - ref).max() <= 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
