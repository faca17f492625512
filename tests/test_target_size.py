"""quantize --target-size: the file is exactly the planned size and within the budget, its tensors
have the planned types, a larger budget never predicts more KLD; refusals write nothing.

The profile here has real output errors (the calibrated walk on 512 tokens) and a synthetic KLD
curve (KLD = e^2 per tensor): sizes and budgets do not depend on how KLD is predicted, and the
predictor has its own tests (test_profile.py)."""

from __future__ import annotations

import os

import pytest
import torch

from nemoq.calib.calibrate import calibration_sequences
from nemoq.calib.profile import Profile, identity, measure_errors, write_profile
from nemoq.calib.target import budget_of, plan_for_budget, quantize_to_target
from nemoq.convert.pipeline import open_source
from nemoq.errors import NemoqError
from nemoq.gguf_file import read_gguf
from nemoq.quant.allocate import BudgetTooSmall
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def source(tiny_model):
    return open_source(tiny_model)


@pytest.fixture(scope="module")
def profile(source, tmp_path_factory):
    sequences, _ = calibration_sequences(source, None, 256, 512)
    tensors = measure_errors(source, sequences, torch.device("cpu"), compensated=False)
    for p in tensors.values():
        p.ablations = {t: p.error(t) ** 2 for t in p.errors if t != "f16"}
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    prof = Profile(identity(source), tensors, {"tokens": 512}, False)
    write_profile(path, prof)
    return path, prof


def test_budgets_give_files_of_exactly_the_planned_size(profile, source, tiny_model, tmp_path):
    path, prof = profile
    largest = plan_for_budget(prof, source, 10**9).nbytes   # every tensor in its least-KLD type
    with pytest.raises(BudgetTooSmall) as too_small:
        plan_for_budget(prof, source, 1)
    lo = too_small.value.smallest
    assert lo < largest
    last = None
    for i, budget in enumerate((lo + 1000, (lo + largest) // 2, largest - 1)):
        out = tmp_path / f"t{i}.gguf"
        r = quantize_to_target(tiny_model, out, target_size=budget, profile_path=path)
        assert os.path.getsize(out) == r.plan.nbytes <= budget
        types = {t.name: t.type_name.lower() for t in read_gguf(out).tensors}
        assert all(types[n] == t for n, t in r.plan.types.items())
        scales = [n for n in types if n.endswith(".scale")]
        assert len(scales) == sum(t in ("mxfp4", "nvfp4") and not n.startswith(("token_embd", "output."))
                                  for n, t in r.plan.types.items())
        if last is not None:
            assert r.plan.kld <= last
        last = r.plan.kld


def test_target_bpw_is_file_bits_per_weight(source):
    n = sum(t.spec.n_elements for t in source.plan.tensors)
    assert budget_of(source, None, 5.5) == int(5.5 * n / 8)
    with pytest.raises(NemoqError, match="one of --target-size and --target-bpw"):
        budget_of(source, 100, 5.5)


def test_budget_below_the_smallest_file_writes_nothing(profile, tiny_model, tmp_path):
    path, _ = profile
    out = tmp_path / "small.gguf"
    with pytest.raises(BudgetTooSmall, match=r"below the smallest file this model can be \([0-9,]+ bytes"):
        quantize_to_target(tiny_model, out, target_size=1_000_000, profile_path=path)
    assert list(tmp_path.iterdir()) == []


def test_profile_of_another_model_is_refused(profile, tiny_model, tmp_path):
    path, prof = profile
    other = tmp_path / "other.json"
    write_profile(other, Profile({**prof.model, "output_norm_sha256": "0" * 64}, prof.tensors, {}, False))
    out = tmp_path / "x.gguf"
    with pytest.raises(NemoqError, match="the profile is of another model"):
        quantize_to_target(tiny_model, out, target_size=5_000_000, profile_path=other)
    assert not out.exists()
    with pytest.raises(NemoqError, match="no errors of --calibrate's rounding"):
        quantize_to_target(tiny_model, out, target_size=5_000_000, profile_path=path, calibrate=True)
    assert not out.exists()


def test_calibrated_file_is_the_planned_size(profile, source, tiny_model, tmp_path):
    path, prof = profile
    for p in prof.tensors.values():     # compensated errors: here the plain ones stand in
        for e in p.errors.values():
            e.compensated = e.plain
    compensated = tmp_path / "compensated.json"
    write_profile(compensated, Profile(prof.model, prof.tensors, {}, True))
    out = tmp_path / "c.gguf"
    r = quantize_to_target(tiny_model, out, target_size=4_500_000, profile_path=compensated, calibrate=True,
                           calibrate_options={"tokens": 512, "ctx": 256})
    assert os.path.getsize(out) == r.plan.nbytes <= 4_500_000
    assert read_gguf(out).metadata["nemoq.recipe"].endswith(" --calibrate")


def test_cli_dry_run_prints_the_plan_and_writes_nothing(profile, tiny_model, tmp_path):
    path, _ = profile
    r = run_cli("quantize", tiny_model, "--target-size", "4.5M", "--profile", path, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "predicted KLD" in r.output and "blk.0.ssm_in.weight" in r.output and "of a budget of 4,500,000" in r.output
    assert list(tmp_path.iterdir()) == []


def test_cli_target_size_and_its_refusals(profile, tiny_model, tmp_path):
    path, _ = profile
    out = tmp_path / "m.gguf"
    r = run_cli("quantize", tiny_model, "-o", out, "--target-bpw", "6", "--profile", path)
    assert r.exit_code == 0, r.output
    n = sum(t.spec.n_elements for t in open_source(tiny_model).plan.tensors)
    assert out.stat().st_size <= 6 * n / 8
    small = tmp_path / "s.gguf"
    r = run_cli("quantize", tiny_model, "-o", small, "--target-size", "1M", "--profile", path)
    assert r.exit_code == 1 and "below the smallest file this model can be" in r.output and not small.exists()
    r = run_cli("quantize", tiny_model, "-o", small, "--profile", path)
    assert r.exit_code == 2 and "--profile goes with --target-size, --target-bpw or --fit" in r.output
    r = run_cli("quantize", tiny_model, "-o", small, "--target-size", "4.5M", "--profile", path, "--recipe", "Q4_K_M")
    assert r.exit_code == 2 and "leave out --recipe" in r.output and not small.exists()
    r = run_cli("quantize", tiny_model, "--target-size", "4.5M", "--dry-run")
    assert r.exit_code == 1 and "give --profile" in r.output
