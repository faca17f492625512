"""nemoq profile: per-type output errors from the calibrated walk, and its predictor of llama.cpp's
KLD held to issue 14's bar on the bundled trained model: 10 random type mixes, predicted vs
measured on >= 8192 held-out tokens, Spearman >= 0.9 and median relative error <= 25%."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nemoq.calib.calibrate import calibration_sequences
from nemoq.calib.predictor_check import check_predictor, held_out_scorer, spearman
from nemoq.calib.profile import (Profile, TensorProfile, ablation_types, check_profile, combined, fit_combine,
                                 identity, measure_errors, read_profile, set_sensitivities, write_profile)
from nemoq.calib.sensitivity import DEFAULT_TOKENS as SENSITIVITY_TOKENS, write_with_types
from nemoq.convert.pipeline import open_source
from nemoq.errors import NemoqError
from nemoq.quant import type_errors
from nemoq.quant.type_errors import TypeError2, matrix_errors
from tests.fixtures.corpus import load_texts


@pytest.fixture(scope="module")
def tiny_source(tiny_model):
    return open_source(tiny_model)


@pytest.fixture(scope="module")
def measured(tiny_source):
    """Errors of every candidate on 1024 calibration tokens (plain rounding)."""
    sequences, _ = calibration_sequences(tiny_source, None, 256, 1024)
    return sequences, measure_errors(tiny_source, sequences, torch.device("cpu"), compensated=False)


@pytest.fixture(scope="module")
def profile(measured, tiny_source):
    """The whole profile, as make_profile builds it from those errors: each tensor's ablations and
    the fit mixes, measured by llama.cpp on the train split's text."""
    sequences, tensors = measured
    tensors = copy.deepcopy(tensors)
    scored, fits = set_sensitivities(tiny_source, tensors, None, SENSITIVITY_TOKENS)
    q, scale = fit_combine(tensors, fits)
    return Profile(identity(tiny_source), tensors, {"tokens": int(sequences.size), "ablation_tokens_scored": scored},
                   False, q, fits, scale)


def test_every_quantized_tensor_gets_the_types_that_fit_its_width(measured, tiny_source):
    _, tensors = measured
    assert set(tensors) == set(identity(tiny_source)["tensors"])
    for name, p in tensors.items():
        fits_256 = p.shape[-1] % 256 == 0
        assert ("q4_k" in p.errors) == fits_256, name
        assert {"f16", "q8_0", "q5_0", "q4_0", "iq4_nl", "mxfp4", "nvfp4"} <= set(p.errors), name
        # more bits, less error: f16 < q8_0 < q5_0 < q4_0
        assert p.error("f16") < p.error("q8_0") < p.error("q5_0") < p.error("q4_0"), name
        assert 0.005 < p.error("q4_0") < 0.2, name
        assert p.energy > 0 and p.tokens > 0


def test_compensated_errors_are_below_plain_rounding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 256)) @ rng.standard_normal((256, 256)) * 0.3 + rng.standard_normal(256)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    energy, errors = matrix_errors(w, x.T @ x, ("q8_0", "q4_0", "q4_k", "mxfp4"), tokens=2048,
                                   scaled={"mxfp4": True}, compensated=True)
    assert energy > 0
    for t, e in errors.items():
        assert e.compensated < 0.9 * e.plain, t


def test_errors_through_an_experts_few_tokens_equal_those_through_h():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((96, 512)) * rng.lognormal(0, 1, 512)).astype(np.float32)
    w = (rng.standard_normal((48, 512)) * 0.02).astype(np.float32)
    types = ("q8_0", "q4_k", "iq4_nl", "nvfp4")
    h = x.astype(np.float64).T @ x.astype(np.float64)
    energy, errors = matrix_errors(w, h, types, tokens=96, scaled={"nvfp4": True}, compensated=False)
    energy_t, errors_t = matrix_errors(w, h, types, tokens=96, scaled={"nvfp4": True}, compensated=False, inputs=x)
    assert energy_t == pytest.approx(energy, rel=1e-5)
    for t in types:
        assert errors_t[t].plain == pytest.approx(errors[t].plain, rel=1e-4), t
    # through the tokens only where they are fewer than half the columns; else through H
    _, dense = matrix_errors(w, h * 2, types, tokens=96, scaled={}, compensated=False, inputs=np.tile(x, (3, 1)))
    assert dense["q8_0"].plain == pytest.approx(2 * errors["q8_0"].plain, rel=1e-6)


def test_errors_through_h_go_a_few_rows_at_a_time_with_the_same_sums(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 256))
    w = (rng.standard_normal((70, 256)) * 0.02).astype(np.float32)
    whole = matrix_errors(w, x.T @ x, ("q8_0", "q4_k"), tokens=300, scaled={}, compensated=False)
    monkeypatch.setattr(type_errors, "ROWS", 16)
    chunked = matrix_errors(w, x.T @ x, ("q8_0", "q4_k"), tokens=300, scaled={}, compensated=False)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-12)
    for t in ("q8_0", "q4_k"):
        assert chunked[1][t].plain == pytest.approx(whole[1][t].plain, rel=1e-12)


@pytest.mark.parametrize("fmt", ["iq4_nl", "q4_k"])
def test_compensated_errors_are_the_walks_rounding(fmt):
    """The profile prices --calibrate's rounding: the same column order as the walk (block order
    for IQ4_NL, act order for the others)."""
    from nemoq.quant.compensate import column_order, compensated_quantize
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1024, 256)) @ rng.standard_normal((256, 256)) * 0.3
    x[:, :8] *= 10
    w = rng.standard_normal((32, 256)).astype(np.float32)
    h = x.T @ x
    energy, errors = matrix_errors(w, h, (fmt,), tokens=1024, scaled={}, compensated=True)
    walk = compensated_quantize(fmt, w, h, tokens=1024, act_order=column_order(fmt))
    other = compensated_quantize(fmt, w, h, tokens=1024, act_order=not column_order(fmt))
    assert errors[fmt].compensated == pytest.approx(walk.error ** 2 * energy, rel=1e-9)
    assert other.error != walk.error


def test_profile_round_trips_and_is_refused_for_another_model(measured, tiny_source, tmp_path):
    _, tensors = measured
    profile = Profile(identity(tiny_source), tensors, {"tokens": 1024}, False)
    write_profile(tmp_path / "p.json", profile)
    back = read_profile(tmp_path / "p.json")
    name = "blk.0.ssm_in.weight"
    assert back.tensors[name].error("q4_0") == pytest.approx(tensors[name].error("q4_0"), rel=1e-12)
    check_profile(back, tiny_source, tmp_path / "p.json")
    for key, change in (("tensors", {**back.model["tensors"], name: [1, 2]}), ("output_norm_sha256", "0" * 64),
                        ("config_sha256", "0" * 64)):
        other = Profile({**back.model, key: change}, back.tensors, back.calibration, False)
        with pytest.raises(NemoqError, match="the profile is of another model"):
            check_profile(other, tiny_source, tmp_path / "p.json")
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(NemoqError, match="not a nemoq profile"):
        read_profile(tmp_path / "bad.json")


def test_each_tensor_is_ablated_at_its_curves_ends_and_middle(profile):
    for name, p in profile.tensors.items():
        assert sorted(p.ablations) == sorted(ablation_types(p)) and len(p.ablations) == 3, name
        for t, kld in p.ablations.items():
            assert p.predicted(t) == pytest.approx(kld), (name, t)


def test_predicted_kld_of_random_mixes_matches_llama_cpp_on_held_out_text(profile, tiny_source, tmp_path):
    """Issue 14's acceptance: the profile (train split) predicts the KLD llama.cpp measures for 10
    random whole-model mixes on the val split, in rank (Spearman >= 0.9) and in size (median
    relative error <= 25%)."""
    base = tmp_path / "base.gguf"
    write_with_types(tiny_source, base, {})
    scorer = held_out_scorer(base, "\n\n".join(load_texts("val")), scored=8192)
    assert sum(len(b) for b in scorer.base) >= 8192
    check = check_predictor(profile, tiny_source, scorer, tmp_path, mixes=10, seed=0)
    summary = f"predicted {np.round(check.predicted, 5)}, measured {np.round(check.measured, 5)}"
    assert check.spearman >= 0.9, summary
    assert check.median_error <= 0.25, summary


def test_spearman_ranks_ties_together():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([0.02] * 4, [1, 2, 3, 4]))     # a constant predictor ranks nothing
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) < 1.0


def test_combination_exponent_is_recovered_from_whole_model_mixes():
    rng = np.random.default_rng(3)
    tensors = {}
    for i in range(20):
        p = TensorProfile(f"t{i}", (64, 64), energy=1.0)
        for t, e in (("q8_0", 0.003), ("q5_0", 0.02), ("q4_0", 0.04)):
            p.errors[t] = TypeError2(e ** 2 * rng.uniform(0.5, 2))
            p.ablations[t] = rng.uniform(0.1, 2) * p.errors[t].plain
        tensors[p.name] = p
    mixes = [{n: str(rng.choice(["q8_0", "q5_0", "q4_0"])) for n in tensors} for _ in range(3)]
    fits = [{"types": m, "kld": 1.3 * combined([tensors[n].predicted(t) for n, t in m.items()], 0.8)} for m in mixes]
    q, scale = fit_combine(tensors, fits)
    assert q == pytest.approx(0.8, abs=0.011) and scale == pytest.approx(1.3, rel=0.05)
    assert combined([0.01, 0.02], 1.0) == pytest.approx(0.03)
    assert combined([0.01, 0.02], 0.8) < 0.03


def test_embedding_errors_from_the_used_rows_equal_the_whole_tables(tiny_source):
    """Only the rows the calibration text uses are rounded (each row rounds on its own); the
    sums are those over the whole table with each row weighted by its uses."""
    from nemoq.calib.profile import EMBEDDINGS, embedding_profile, profiled_specs
    from nemoq.calib.weights import read_tensor
    from nemoq.quant.type_errors import plain_values
    spec = next(s for s in profiled_specs(tiny_source) if s.name == EMBEDDINGS)
    sequences, _ = calibration_sequences(tiny_source, None, 256, 1024)
    p = embedding_profile(tiny_source, spec, sequences)
    table = read_tensor(next(t for t in tiny_source.plan.tensors if t.name == EMBEDDINGS)).float().numpy()
    uses = np.bincount(sequences.reshape(-1), minlength=len(table)).astype(np.float64)
    assert 0 < np.count_nonzero(uses) < len(table)
    assert p.energy == pytest.approx(float((uses * (table.astype(np.float64) ** 2).sum(1)).sum()), rel=1e-12)
    for t in ("q8_0", "q4_0", "nvfp4"):
        d = table.astype(np.float64) - plain_values(t, table, False)
        assert p.errors[t].plain == pytest.approx(float((uses * (d ** 2).sum(1)).sum()), rel=1e-9), t
