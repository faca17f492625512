"""`nemoq quantize --target-size / --target-bpw`: the types with the least predicted KLD whose file
fits a byte budget, written through the recipe machinery as one `--tensor-type` per tensor.

The file's size is exact, not estimated. A GGUF file is its header (metadata and tensor infos),
padded to the alignment, then each tensor's data padded to the alignment. Choosing a type for a
tensor adds (file_bytes):
  - its data, padded;
  - for NVFP4/MXFP4 with tensor scales, the `.scale` companion's data (padded) and tensor info;
  - its `--tensor-type` entry in the `nemoq.recipe` metadata string.
Everything else (metadata, the other tensor infos, the tensors that stay F32) is fixed; it is
measured by writing the header the writer would write for one plan (header_bytes) and taking the
choice-dependent parts out. The header's padding (< ALIGNMENT) is counted as fixed; the chosen
plan's real header is measured again before anything is written.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf

from nemoq.calib.hparams import config_of
from nemoq.calib.profile import Profile, check_profile, profiled_specs
from nemoq.calib.sensitivity import only
from nemoq.convert.dtypes import type_nbytes
from nemoq.convert.output import StreamingGGUFWriter
from nemoq.convert.pipeline import Source, plan_jobs, write_header
from nemoq.errors import NemoqError
from nemoq.quant.allocate import Allocation, Candidate, allocate
from nemoq.quant.fit import Fit, FitBudget, fit_budget
from nemoq.quant.recipes import RECIPES, file_type_of, plan_types, recipe_label
from nemoq.quant.choose import chooser
from nemoq.quant.tensor_scale import scale_name, takes_scale

ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
BASE = RECIPES["F16"]      # every profiled tensor gets its own --tensor-type; the rest stay F32 anyway
CALIBRATED_SUFFIX = " --calibrate"


def padded(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def tensor_info_bytes(name: str, n_dims: int) -> int:
    """One GGUF tensor info: name (u64 length + bytes), n_dims (u32), dims (u64 each), type (u32), offset (u64)."""
    return 8 + len(name.encode()) + 4 + 8 * n_dims + 4 + 8


def label_bytes(name: str, type_name: str) -> int:
    return len(f" --tensor-type {only(name)}={type_name}".encode())


def file_bytes(spec, type_name: str, tensor_scales: bool) -> int:
    """What typing `spec` as `type_name` adds to the file (see the module's docstring)."""
    n = padded(type_nbytes(type_name, spec.shape)) + label_bytes(spec.name, type_name)
    if tensor_scales and takes_scale(spec, type_name):
        n += padded(4 * spec.n_matrices) + tensor_info_bytes(scale_name(spec.name), 1)
    return n


def overrides_of(types: dict[str, str]) -> list[tuple[str, str]]:
    return [(only(n), t) for n, t in types.items()]


def typed_plan(source: Source, types: dict[str, str], tensor_scales: bool):
    return plan_types([t.spec for t in source.plan.tensors], BASE, source.layer_kinds, overrides_of(types),
                      tensor_scales)


def label(types: dict[str, str], calibrated: bool) -> str:
    return recipe_label(BASE, overrides_of(types)) + (CALIBRATED_SUFFIX if calibrated else "")


def header_bytes(source: Source, types: dict[str, str], tensor_scales: bool, calibrated: bool,
                 typed=None, jobs=None) -> int:
    """The unpadded header write_gguf writes for this plan: measured by writing it (typed and
    jobs: the plan's, where the caller has them already)."""
    typed = typed if typed is not None else typed_plan(source, types, tensor_scales)
    jobs = jobs if jobs is not None else plan_jobs(source.plan, chooser(typed))
    with tempfile.TemporaryDirectory(prefix="nemoq-header-") as tmp:
        with StreamingGGUFWriter(Path(tmp) / "header.gguf", source.architecture) as writer:
            write_header(writer, source, jobs, file_type_of(BASE, typed, source.layer_kinds), label(types, calibrated))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            return writer.fout[0].tell()


def exact_size(source: Source, types: dict[str, str], tensor_scales: bool, calibrated: bool) -> int:
    """The file's bytes for this plan: padded header, then every tensor's padded data."""
    typed = typed_plan(source, types, tensor_scales)
    jobs = plan_jobs(source.plan, chooser(typed))
    data = sum(padded(job.encoding.nbytes(job.tensor.shape)) + sum(padded(c.nbytes) for c in job.companions)
               for job in jobs)
    return padded(header_bytes(source, types, tensor_scales, calibrated, typed, jobs)) + data


@dataclass
class TargetPlan:
    types: dict[str, str]
    shares: dict[str, float]      # predicted KLD of each tensor alone
    bytes_of: dict[str, int]      # each tensor's data bytes (with its `.scale`)
    nbytes: int                   # the file, exactly
    budget: int
    kld: float                    # predicted
    combine: float = 1.0          # the profile's q: shares weigh k^(1/q) (profile.combined)
    fit: object | None = None     # quant.fit.FitBudget with --fit: how the budget was reckoned

    def share(self, name: str) -> float:
        """The tensor's part of the predicted KLD's sum (k^(1/q) over the sum of them)."""
        costs = {n: k ** (1 / self.combine) for n, k in self.shares.items()}
        return costs[name] / sum(costs.values()) if sum(costs.values()) > 0 else 0.0


def options_of(profile: Profile, source: Source, compensated: bool, tensor_scales: bool) -> dict[str, list[Candidate]]:
    specs = {s.name: s for s in profiled_specs(source)}
    # costs k^(1/q): their sum orders files as profile.combined does
    q = profile.combine
    return {n: [Candidate(t, file_bytes(specs[n], t, tensor_scales), p.predicted(t, compensated) ** (1 / q))
                for t in p.errors] for n, p in profile.tensors.items()}


def fixed_bytes(source: Source, profile: Profile, options: dict[str, list[Candidate]], tensor_scales: bool,
                calibrated: bool) -> int:
    """File bytes that no choice changes (with the header's padding counted in full)."""
    ref = {n: cands[0].type for n, cands in options.items()}
    specs = {s.name: s for s in profiled_specs(source)}
    chosen_header = sum(file_bytes(specs[n], t, tensor_scales) - padded(type_nbytes(t, specs[n].shape))
                        - (padded(4 * specs[n].n_matrices) if tensor_scales and takes_scale(specs[n], t) else 0)
                        for n, t in ref.items())
    others = sum(padded(type_nbytes("f32", t.shape)) for t in source.plan.tensors if t.name not in options)
    return header_bytes(source, ref, tensor_scales, calibrated) - chosen_header + (ALIGNMENT - 1) + others


def plan_for_budget(profile: Profile, source: Source, budget: int, *, compensated: bool = False,
                    tensor_scales: bool = True, calibrated: bool = False,
                    profile_path: Path | None = None) -> TargetPlan:
    """The least predicted KLD whose file is at most `budget` bytes."""
    check_profile(profile, source, profile_path or Path("profile"))
    if compensated and not profile.compensated:
        raise NemoqError("the profile has no errors of --calibrate's rounding: make it with nemoq profile --calibrate",
                         profile_path)
    missing = [s.name for s in profiled_specs(source) if s.name not in profile.tensors]
    if missing:
        raise NemoqError(f"the profile has no candidates for {len(missing)} tensor(s) (e.g. {missing[0]})",
                         profile_path)
    options = options_of(profile, source, compensated, tensor_scales)
    fixed = fixed_bytes(source, profile, options, tensor_scales, calibrated)
    allocation: Allocation = allocate(options, budget, fixed)
    size = exact_size(source, allocation.types, tensor_scales, calibrated)
    if size > budget:   # cannot happen unless the metadata changed with the types (e.g. the size label)
        raise NemoqError(f"the planned file is {size:,} bytes, over the budget of {budget:,} "
                         f"(a nemoq bug: please report)")
    specs = {s.name: s for s in profiled_specs(source)}
    bytes_of = {n: type_nbytes(t, specs[n].shape)
                + (4 * specs[n].n_matrices if tensor_scales and takes_scale(specs[n], t) else 0)
                for n, t in allocation.types.items()}
    shares = {n: profile.tensors[n].predicted(t, compensated) for n, t in allocation.types.items()}
    kld = profile.kld_of_cost(allocation.kld)
    return TargetPlan(allocation.types, shares, bytes_of, size, budget, kld, profile.combine)


def fit_of(source: Source, fit: Fit | None) -> FitBudget | None:
    """--fit's breakdown: the memory less what llama.cpp needs for this model at that context."""
    return fit_budget(config_of(source), fit) if fit is not None else None


def budget_of(source: Source, target_size: int | None, target_bpw: float | None, fit: Fit | None = None) -> int:
    """--target-size in bytes, --target-bpw as file bits per weight (header included), or what
    --fit leaves for the file."""
    return budget_and_fit(source, target_size, target_bpw, fit)[0]


def budget_and_fit(source: Source, target_size: int | None, target_bpw: float | None,
                   fit: Fit | None) -> tuple[int, FitBudget | None]:
    """budget_of, with --fit's breakdown (None without --fit), reckoned once."""
    if sum(x is not None for x in (target_size, target_bpw, fit)) != 1:
        raise NemoqError("give one of --target-size and --target-bpw, or --fit")
    if target_size is not None:
        return int(target_size), None
    if fit is not None:
        fitted = fit_of(source, fit)
        return fitted.weights, fitted
    n = sum(t.spec.n_elements for t in source.plan.tensors)
    return int(target_bpw * n / 8), None


@dataclass
class TargetResult:
    plan: TargetPlan
    profile: Profile
    conversion: object            # convert.pipeline.ConvertResult
    calibration: object | None    # calibrated.CalibratedResult with --calibrate


def quantize_to_target(src: str | Path, out: Path, *, target_size: int | None = None, target_bpw: float | None = None,
                       fit: Fit | None = None, profile_path: Path | None = None, calibrate: bool = False,
                       tensor_scales: bool = True, force: bool = False, profile_options: dict | None = None,
                       calibrate_options: dict | None = None, on_plan=lambda plan: None) -> TargetResult:
    """Profile (unless `profile_path` is given), allocate, write; the file is checked to be the
    planned size, at most the budget (else it is removed)."""
    import os

    from nemoq.calib.profile import make_profile, read_profile
    from nemoq.convert.pipeline import open_source, write_gguf
    from nemoq.files import claim_output
    with claim_output(Path(out), force) as out:
        source = open_source(src)
        budget, fitted = budget_and_fit(source, target_size, target_bpw, fit)
        if profile_path is not None:
            profile = read_profile(profile_path)
        else:
            profile = make_profile(src, compensated=calibrate, **(profile_options or {}))
        plan = plan_for_budget(profile, source, budget, compensated=calibrate, tensor_scales=tensor_scales,
                               calibrated=calibrate, profile_path=profile_path)
        plan.fit = fitted
        on_plan(plan)
        calibration = None
        if calibrate:
            from nemoq.calib.calibrated import quantize_calibrated
            calibration = quantize_calibrated(src, out, BASE, overrides=overrides_of(plan.types),
                                              tensor_scales=tensor_scales, force=force, **(calibrate_options or {}))
            result = calibration.conversion
        else:
            typed = typed_plan(source, plan.types, tensor_scales)
            result = write_gguf(source, out, chooser(typed), file_type_of(BASE, typed, source.layer_kinds),
                                recipe=label(plan.types, False), force=force)
        size = os.path.getsize(out)
        if size != plan.nbytes or size > budget:
            os.unlink(out)
            raise NemoqError(f"wrote {size:,} bytes where {plan.nbytes:,} were planned (budget {budget:,}); "
                             f"the file was removed (a nemoq bug: please report)", out)
    return TargetResult(plan, profile, result, calibration)


def plan_only(src: str | Path, profile_path: Path, *, target_size: int | None = None, target_bpw: float | None = None,
              fit: Fit | None = None, calibrate: bool = False, tensor_scales: bool = True) -> TargetPlan:
    """--dry-run: the plan from the profile and the source's headers (no weight is quantized)."""
    from nemoq.calib.profile import read_profile
    from nemoq.convert.pipeline import open_source
    source = open_source(src)
    budget, fitted = budget_and_fit(source, target_size, target_bpw, fit)
    plan = plan_for_budget(read_profile(profile_path), source, budget,
                           compensated=calibrate, tensor_scales=tensor_scales, calibrated=calibrate,
                           profile_path=profile_path)
    plan.fit = fitted
    return plan
