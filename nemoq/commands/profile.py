"""`nemoq profile` and `nemoq quantize --target-size / --target-bpw`: a profile of per-tensor
candidate types, and the file with the least predicted KLD for a byte budget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nemoq.commands.base import LayerProgress, Output, no_layer_progress
from nemoq.errors import NemoqError

# (label, total) -> context giving advance(done, total): the one-tensor ablations
CountProgress = Callable[[str], object]


@dataclass(frozen=True)
class ProfileOptions:
    src: str
    output: Output
    data: Path | None = None
    tokens: int | None = None
    ctx: int | None = None
    device: str | None = None
    compensated: bool = False            # also the errors of --calibrate's rounding
    sensitivity_tokens: int | None = None

    def given(self) -> dict:
        names = ("data", "tokens", "ctx", "device", "sensitivity_tokens")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class TargetOptions:
    size: int | None = None              # --target-size in bytes
    bpw: float | None = None             # --target-bpw: file bits per weight
    profile: Path | None = None          # --profile; None: profile in the same run
    fit: object | None = None            # --fit: quant.fit.Fit (memory, context, KV type)
    plot: Path | None = None             # --plot: predicted size vs KLD (PNG)


def profile(opts: ProfileOptions, layer_progress: LayerProgress = no_layer_progress,
            on_ablation: Callable[[int, int], None] | None = None):
    from nemoq.calib.profile import profile_to_file
    if opts.output.path is None:
        raise NemoqError("--outfile is required")
    with layer_progress("profiling") as (on_start, on_progress):
        return profile_to_file(opts.src, opts.output.path, force=opts.output.force, compensated=opts.compensated,
                               on_start=on_start, on_progress=on_progress, on_ablation=on_ablation, **opts.given())


def quantize_to_target(opts, target: TargetOptions, on_plan=lambda plan: None,
                       layer_progress: LayerProgress = no_layer_progress,
                       on_ablation: Callable[[int, int], None] | None = None):
    """opts: commands.quantize.QuantizeOptions (its recipe name and --tensor-type are not used:
    the allocator types every tensor). --dry-run needs --profile and returns only the plan."""
    from nemoq.calib import target as t
    if opts.recipe.overrides:
        raise NemoqError("--target-size/--target-bpw choose every tensor's type: leave out --tensor-type")
    if opts.imatrix is not None:
        raise NemoqError("--target-size/--target-bpw rounds plainly or with --calibrate: leave out --imatrix")
    if opts.output.split_max_size:
        raise NemoqError("--target-size/--target-bpw write one file: leave out --split-max-size")
    calibrate = opts.calibration.enabled
    if opts.calibration.imatrix_out is not None and not calibrate:
        raise NemoqError("--imatrix-out only goes with --calibrate")
    if target.plot is not None:   # before any work: a missing matplotlib or an existing picture
        from nemoq.commands.extras import require
        from nemoq.files import refuse_to_clobber
        require("plot", "quantize --plot")
        refuse_to_clobber([target.plot], opts.output.force)
    if opts.dry_run:
        if target.profile is None:
            raise NemoqError("--dry-run plans from a profile without reading weights: give --profile (nemoq profile)")
        plan = t.plan_only(opts.src, target.profile, target_size=target.size, target_bpw=target.bpw, fit=target.fit,
                           calibrate=calibrate, tensor_scales=opts.recipe.tensor_scales)
        on_plan(plan)
        if target.plot is not None:
            from nemoq.calib.profile import read_profile
            _plot(opts, target, read_profile(target.profile), plan)
        return None
    if opts.output.path is None:
        raise NemoqError("--outfile is required (or use --dry-run)")
    if target.fit is not None:   # memory that llama.cpp's own needs fill: refused before any progress shows
        from nemoq.convert.pipeline import open_source
        t.fit_of(open_source(opts.src), target.fit)
    given = opts.calibration.given()
    walk = {k: v for k, v in given.items() if k in ("data", "tokens", "ctx", "device")}
    with layer_progress("profiling" if target.profile is None else "calibrated quantizing") as (on_start, on_progress):
        result = t.quantize_to_target(
            opts.src, opts.output.path, target_size=target.size, target_bpw=target.bpw, fit=target.fit,
            profile_path=target.profile, calibrate=calibrate, tensor_scales=opts.recipe.tensor_scales,
            force=opts.output.force,
            profile_options={**walk, "on_start": on_start, "on_progress": on_progress, "on_ablation": on_ablation},
            calibrate_options=given if calibrate else None, on_plan=on_plan)
    if target.plot is not None:
        _plot(opts, target, result.profile, result.plan)
    return result


def _plot(opts, target: TargetOptions, profile, plan) -> None:
    from nemoq.calib.target_plot import plot_target
    from nemoq.convert.pipeline import open_source
    plot_target(open_source(opts.src), profile, plan, target.plot, force=opts.output.force,
                compensated=opts.calibration.enabled, tensor_scales=opts.recipe.tensor_scales)
