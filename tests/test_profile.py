"""nemoq profile: per-type output errors from the calibrated walk, and a predictor of llama.cpp's
KLD (c_t * e_t^2, summed over tensors) checked against llama.cpp on the bundled trained model.
The full validation (10 random mixes over >= 8192 held-out tokens) is bench/target_size.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemoq.calib.calibrate import calibration_sequences
from nemoq.calib.profile import (Profile, TensorProfile, check_profile, combined, fit_combine, identity,
                                 measure_errors, read_profile, set_sensitivities, write_profile)
from nemoq.calib.sensitivity import FIRST, Scorer, plain_text, text_sequences, write_with_types
from nemoq.convert.pipeline import open_source
from nemoq.errors import NemoqError
from nemoq.eval.model import LlamaModel
from nemoq.quant.type_errors import TypeError2, matrix_errors


@pytest.fixture(scope="module")
def tiny_source(tiny_model):
    return open_source(tiny_model)


@pytest.fixture(scope="module")
def measured(tiny_source):
    """Errors of every candidate on 1024 calibration tokens (plain rounding)."""
    sequences, _ = calibration_sequences(tiny_source, None, 256, 1024)
    return sequences, measure_errors(tiny_source, sequences, torch.device("cpu"), compensated=False)


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


def test_predicted_kld_follows_llama_cpp(measured, tiny_source, tmp_path):
    """The predictor's assumptions, measured by llama.cpp on calibration tokens: a tensor's KLD in a
    type it was not ablated in lies on the curve through its ablations, and tensors' KLDs add up."""
    sequences, tensors = measured
    names = ["blk.0.ssm_in.weight", "output.weight"]
    chosen = {n: tensors[n] for n in names}
    set_sensitivities(tiny_source, chosen, None, 512, fit_mixes=0)
    profile = Profile(identity(tiny_source), chosen, {}, False)
    for p in chosen.values():
        assert len(p.ablations) == 3 and "q8_0" in p.ablations and "q5_0" not in p.ablations
        assert p.predicted("q8_0") == pytest.approx(p.ablations["q8_0"])
        assert p.predicted("q8_0") < p.predicted("q5_0") < p.predicted("q4_0")
    base = tmp_path / "base.gguf"
    write_with_types(tiny_source, base, {})
    with LlamaModel(base, 512) as m:     # the ablations' text, further on
        text = text_sequences(m, plain_text(None), 512, 4096)[-2:]
    scorer = Scorer(base, text, FIRST)
    path = tmp_path / "mix.gguf"
    for mix in ({names[0]: "q5_0"}, {names[0]: "q4_0", names[1]: "q5_0"}):
        write_with_types(tiny_source, path, mix)
        assert profile.predicted(mix) == pytest.approx(scorer.kld(path), rel=0.4), mix


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
