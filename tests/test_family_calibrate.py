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


# --- quantize --calibrate: the walk on LatentMoE, Puzzle and the MTP block ------------------------

FAMILY = ("super", "lightning", "puzzle")
SMALL = ("--tokens", "2048", "--ctx", "256")


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory):
    from tests.family_reference import WRITERS
    work = tmp_path_factory.mktemp("family")
    return {name: write(work / name) for name, write in WRITERS.items()}


def mtp_reference(plan, cfg, sequences: np.ndarray, trunk: np.ndarray) -> np.ndarray:
    """llama.cpp's nemotron_h_moe MTP graph up to its head, written out: position t fuses the
    embedding of token t+1 and the trunk's normed state at t."""
    from nemoq.calib import blocks
    from nemoq.calib.weights import LayerLoader
    loader = LayerLoader(plan, CPU)
    w, embd = loader.layer(cfg.n_layers), loader.globals("token_embd.weight")["token_embd.weight"]

    def norm(x, short):
        return blocks.rms_norm(x, w[short], cfg.norm_eps)
    ignore = lambda *args: None   # noqa: E731
    with torch.no_grad():
        e = embd[torch.from_numpy(sequences[:, 1:].astype(np.int64))].float()
        x = torch.cat([norm(e, "nextn.enorm.weight"), norm(torch.from_numpy(trunk[:, :-1]), "nextn.hnorm.weight")], -1)
        x = blocks.linear(x, w["nextn.eh_proj.weight"])
        x = x + blocks.attention(norm(x, "attn_norm.weight"), w, cfg, ignore)
        return (x + blocks.moe(norm(x, "post_attention_norm.weight"), w, cfg, ignore)).numpy()


@pytest.mark.parametrize("feeds", ["full-precision", "sequential", "asymmetric"])
@pytest.mark.parametrize("name", FAMILY)
def test_walk_without_targets_is_the_full_precision_forward(name, feeds, family_ckpts):
    """Nothing quantized, every feed: the walk's trunk is calibrate's forward (LatentMoE and
    Puzzle layers included) and its MTP step is llama.cpp's MTP graph."""
    from nemoq.calib.walk import LayerWalk

    class Kept(LayerWalk):
        def close(self):
            if self.hidden is not None and self.hidden.data.shape[1] == sequences.shape[1] - 1:
                self.mtp_out = np.array(self.hidden.data)
            super().close()
    source = open_source(family_ckpts[name])
    cfg = config_of(source)
    sequences = token_sequences(cfg.vocab)
    trunk = streamed_forward(source.plan, cfg, sequences, ActivationStats(cfg.n_experts).record, device=CPU)
    walk = Kept(source.plan, cfg, sequences, {}, device=CPU, feeds=feeds)
    for _ in range(cfg.n_layers + 1):
        walk.advance()
    assert walk.steps == cfg.n_layers + 1 + source.plan.mtp_layers == cfg.n_layers + 1 + (name != "puzzle")
    if name == "puzzle":   # llama.cpp drops Puzzle's MTP block: the head was the last step
        assert walk.hidden is None
        return
    for states in (walk.hidden, walk.reference if feeds == "asymmetric" else walk.hidden):
        assert rel_err(np.array(states.data), np.array(trunk.data)) <= 1e-6
    walk.finish()
    ref = mtp_reference(source.plan, cfg, sequences, np.array(trunk.data))
    trunk.close()
    assert walk.mtp_out.shape == ref.shape and rel_err(walk.mtp_out, ref) <= 1e-5


@pytest.fixture(scope="module")
def family_files(tmp_path_factory, family_ckpts):
    """Each family checkpoint quantized with NQ4 plainly and with --calibrate (its reports too)."""
    from nemoq.calib.calibrated import quantize_calibrated
    from nemoq.quant.recipes import RECIPES
    work = tmp_path_factory.mktemp("family-q")
    files = {}
    for name, ckpt in family_ckpts.items():
        plain, calibrated = work / f"{name}-plain.gguf", work / f"{name}-calibrated.gguf"
        result = run_cli("quantize", ckpt, "-o", plain, "--recipe", "NQ4")
        assert result.exit_code == 0, result.output
        reports = quantize_calibrated(ckpt, calibrated, RECIPES["NQ4"], tokens=2048, ctx=256).matrices
        files[name] = (plain, calibrated, {m.name: m for m in reports})
    return files


@pytest.mark.parametrize("name", FAMILY)
def test_calibrated_family_file_is_the_plain_plan_compensated(name, family_files, family_ckpts):
    from tests.test_calibrated_quantize import finite_logits, tensor_data, tensor_table
    plain, calibrated, reports = family_files[name]
    table = tensor_table(calibrated)
    assert table == tensor_table(plain)
    ours, theirs = tensor_data(calibrated), tensor_data(plain)
    quantized = [n for n, _, kind in table if kind not in ("F32", "F16", "BF16")]
    assert set(quantized) == set(reports)
    assert [n for n in quantized if np.array_equal(ours[n], theirs[n])] == []   # every one compensated
    assert finite_logits(calibrated)
    latent = [n for n in quantized if "ffn_latent" in n]
    assert len(latent) == {"super": 6, "lightning": 0, "puzzle": 4}[name]   # MoE layers (+ MTP) x 2
    assert all(reports[n].ratio < 1 for n in latent), {n: reports[n].ratio for n in latent}
    cfg = config_of(open_source(family_ckpts[name]))
    mtp = [n for n in quantized if n.startswith(f"blk.{cfg.n_layers}.")]
    assert bool(mtp) == (name != "puzzle")
    per_token = {n: cfg.n_experts_used if "_exps" in n else 1 for n in mtp}   # a routed expert: top-k each
    assert {n: reports[n].tokens for n in mtp} == {n: 8 * 255 * k for n, k in per_token.items()}   # ctx - 1 positions


def test_every_feed_calibrates_super(family_ckpts, family_files, tmp_path):
    """Sequential and asymmetric feeds through LatentMoE and the MTP block: the same plan, other
    bytes downstream of the first rounded matrices (ffn_latent_up after the experts, the MTP
    block after the whole trunk), a file that runs."""
    from nemoq.calib.calibrated import quantize_calibrated
    from nemoq.quant.recipes import RECIPES
    from tests.test_calibrated_quantize import finite_logits, tensor_data, tensor_table
    plain, full_precision, _ = family_files["super"]
    data = {"full-precision": tensor_data(full_precision)}
    for feed in ("sequential", "asymmetric"):
        out = tmp_path / f"{feed}.gguf"
        result = quantize_calibrated(family_ckpts["super"], out, RECIPES["NQ4"], tokens=2048, ctx=256, feeds=feed)
        assert tensor_table(out) == tensor_table(plain)
        assert all(m.ratio < 1 for m in result.matrices if "ffn_latent" in m.name)
        assert finite_logits(out)
        data[feed] = tensor_data(out)
    for a, b in (("sequential", "full-precision"), ("asymmetric", "sequential")):
        for name in ("blk.4.ffn_latent_up.weight", "blk.6.nextn.eh_proj.weight", "blk.6.ffn_latent_down.weight"):
            assert not np.array_equal(data[a][name], data[b][name]), (a, b, name)


def test_calibrating_super_from_its_f32_gguf_gives_the_checkpoints_file(family_ckpts, family_files, tmp_path):
    """The MTP block and the latent widths read back from GGUF metadata: the same walk, the same bytes."""
    from tests.conftest import convert
    from tests.test_calibrated_quantize import tensor_data
    f32 = convert(family_ckpts["super"], tmp_path / "f32.gguf", "--outtype", "f32")
    out = tmp_path / "from-gguf.gguf"
    result = run_cli("quantize", f32, "-o", out, "--recipe", "NQ4", "--calibrate", *SMALL)
    assert result.exit_code == 0, result.output
    assert "output error" in result.output and "blk.6.nextn.eh_proj" in " ".join(result.output.split())
    ours, theirs = tensor_data(out), tensor_data(family_files["super"][1])
    assert ours.keys() == theirs.keys()
    assert [n for n in ours if not np.array_equal(ours[n], theirs[n])] == []


def test_embeddings_are_rounded_through_a_latent_moe_layer_0():
    """A LatentMoE layer 0: the routed experts read L x, so a row's error d costs them
    ||U_e L diag(g) d||^2 (weighted by top-k / experts) beside the shared expert's ||S diag(g) d||^2."""
    from nemoq.calib.embedding import embedding_hessian
    from nemoq.calib.weights import Weights
    gen = torch.Generator().manual_seed(0)
    hidden, latent, ff, experts, share = 12, 5, 7, 3, 0.5
    g, d = torch.rand(hidden, generator=gen) + 0.5, torch.randn(hidden, generator=gen, dtype=torch.float64)
    s, lat = torch.randn(ff, hidden, generator=gen), torch.randn(latent, hidden, generator=gen)
    up = torch.randn(experts, ff, latent, generator=gen)
    w = Weights("blk.0.", {"attn_norm.weight": g, "ffn_up_shexp.weight": s, "ffn_latent_down.weight": lat,
                           "ffn_up_exps.weight": up})
    h = embedding_hessian(w, "moe", share)
    gd = g.double() * d
    cost = (s.double() @ gd).square().sum() + share * sum((up[e].double() @ lat.double() @ gd).square().sum()
                                                          for e in range(experts))
    assert h.shape == (hidden, hidden) and float(d @ torch.from_numpy(h) @ d) == pytest.approx(float(cost), rel=1e-9)
