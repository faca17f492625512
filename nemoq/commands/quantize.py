"""`nemoq quantize`: a plan from config.json (--dry-run), a one-pass quantization (optionally
weighted by an imatrix), or a calibrated one (--calibrate, error-compensated rounding)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from nemoq import kernels_c
from nemoq.commands.base import (ByteProgress, LayerProgress, Output, ScaleNotice, no_byte_progress,
                                 no_layer_progress, scale_notice)
from nemoq.commands.extras import require_calibration
from nemoq.convert.pipeline import ConvertResult
from nemoq.errors import NemoqError


@dataclass(frozen=True)
class RecipeOptions:
    name: str = "NQ4"                    # llama.cpp's recipe names, or nemoq's NQ4 / NQ5
    overrides: tuple[str, ...] = ()      # --tensor-type REGEX=TYPE, first match wins
    tensor_scales: bool = True           # NVFP4/MXFP4 matrices get a `.scale` companion


@dataclass(frozen=True)
class CalibrationOptions:
    """--calibrate and its settings; None: the calibrated walk's default."""
    enabled: bool = False
    data: Path | None = None
    tokens: int | None = None
    ctx: int | None = None
    device: str | None = None
    imatrix_out: Path | None = None

    def given(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "enabled" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class QuantizeOptions:
    src: str                             # checkpoint folder, hub repo id or F32/F16/BF16 GGUF
    output: Output
    recipe: RecipeOptions = RecipeOptions()
    imatrix: Path | None = None          # importance weights (llama.cpp's GGUF or .dat imatrix)
    dry_run: bool = False                # plan from config.json only
    threads: int | None = None           # quantizer threads (None: all cores)
    calibration: CalibrationOptions = CalibrationOptions()


@dataclass
class QuantPlan:
    """Types per tensor, and what the user should hear before weights are read."""
    recipe: object                       # recipes.Recipe
    typed: list                          # recipes.TypedTensor per tensor, in file order
    layer_kinds: tuple[str, ...]
    warnings: list[str] = field(default_factory=list)   # --tensor-type patterns that change nothing
    uncovered: list[str] = field(default_factory=list)  # quantized tensors the imatrix has no statistics for

    @property
    def summary(self):
        from nemoq.quant.recipes import summarize
        return summarize(self.typed)

    def alternatives(self) -> list[tuple[str, float]]:
        """When most weights fall back: the recipes whose formats fit this model."""
        from nemoq.quant.recipes import recipes_that_fit
        if not self.summary.warn_fallbacks:
            return []
        return recipes_that_fit([t.spec for t in self.typed], self.layer_kinds)


@dataclass
class QuantizeOutcome:
    plan: QuantPlan
    result: ConvertResult | None = None      # None after --dry-run
    scales: ScaleNotice | None = None
    kept: list[str] = field(default_factory=list)   # ModelOpt NVFP4 tensors written as stored
    calibration: object | None = None        # calib.calibrated.CalibratedResult with --calibrate
    imatrix_output: Path | None = None


def _recipe(opts: RecipeOptions):
    from nemoq.quant.recipes import RECIPES, parse_override
    recipe = RECIPES.get(opts.name.upper())
    if recipe is None:
        raise NemoqError(f"unknown recipe {opts.name!r}; known: {', '.join(RECIPES)}")
    try:
        return recipe, [parse_override(o) for o in opts.overrides]
    except ValueError as e:
        raise NemoqError(str(e)) from None


def _kept(result: ConvertResult) -> list[str]:
    from nemoq.convert.modelopt_gguf import kept_as_stored
    return kept_as_stored(result.tensors)


def quantize(opts: QuantizeOptions, on_plan: Callable[[QuantPlan], None] = lambda plan: None,
             progress: ByteProgress = no_byte_progress,
             layer_progress: LayerProgress = no_layer_progress) -> QuantizeOutcome:
    """Run the command; `on_plan` sees the plan before any weight is read (after the walk with
    --calibrate, whose plan comes with it)."""
    with kernels_c.quantize_threads(opts.threads):
        if opts.calibration.enabled:
            return _calibrated(opts, on_plan, layer_progress)
        return _plain(opts, on_plan, progress)


def _plain(opts: QuantizeOptions, on_plan, progress: ByteProgress) -> QuantizeOutcome:
    from nemoq.quant.recipes import file_type_of, override_warnings, plan_types, recipe_label
    from nemoq.quant.choose import chooser
    given = [f"--{k.replace('_', '-')}" for k in opts.calibration.given()]
    if given:
        raise NemoqError(f"{', '.join(given)} only go with --calibrate")
    recipe, overrides = _recipe(opts.recipe)
    if opts.dry_run:
        return _dry_run(opts, recipe, overrides, on_plan)
    if opts.output.path is None:
        raise NemoqError("--outfile is required (or use --dry-run)")
    from nemoq.convert.pipeline import open_source, plan_bytes, write_gguf
    source = open_source(opts.src)
    specs = [t.spec for t in source.plan.tensors]
    typed = plan_types(specs, recipe, source.layer_kinds, overrides, opts.recipe.tensor_scales)
    plan = QuantPlan(recipe, typed, source.layer_kinds, override_warnings(specs, overrides))
    imatrix = None
    if opts.imatrix is not None:
        from nemoq.calib.imatrix_file import read_imatrix
        from nemoq.quant.choose import check_imatrix
        imatrix = read_imatrix(opts.imatrix)
        plan.uncovered = check_imatrix(typed, imatrix, opts.imatrix)
    on_plan(plan)
    with progress("quantizing", plan_bytes(source.plan)) as advance:
        result = write_gguf(source, opts.output.path, chooser(typed, imatrix),
                            file_type_of(recipe, typed, source.layer_kinds), recipe=recipe_label(recipe, overrides),
                            force=opts.output.force, split_max_size=opts.output.split_max_size, on_progress=advance)
    return QuantizeOutcome(plan, result, scale_notice(t.name for t in result.tensors), _kept(result))


def _dry_run(opts: QuantizeOptions, recipe, overrides, on_plan) -> QuantizeOutcome:
    """The plan from config.json alone: no weights read, nothing written."""
    from nemoq.convert.config import load_config
    from nemoq.convert.plan import tensor_specs
    from nemoq.convert.source import resolve_config
    from nemoq.quant.recipes import override_warnings, plan_types
    from nemoq.quant.tensor_scale import scale_name, takes_scale
    config = load_config(resolve_config(opts.src))
    specs = tensor_specs(config)
    typed = plan_types(specs, recipe, config.layer_kinds, overrides, opts.recipe.tensor_scales)
    plan = QuantPlan(recipe, typed, config.layer_kinds, override_warnings(specs, overrides))
    on_plan(plan)
    scales = [scale_name(t.spec.name) for t in typed if t.scaled and takes_scale(t.spec, t.type)]
    return QuantizeOutcome(plan, scales=scale_notice(scales, planned=True))


def _calibrated(opts: QuantizeOptions, on_plan, layer_progress: LayerProgress) -> QuantizeOutcome:
    if opts.dry_run:
        raise NemoqError("--dry-run plans without reading weights, --calibrate runs the model: use one of them")
    if opts.imatrix is not None:
        raise NemoqError("--calibrate computes its own statistics from the calibration text; --imatrix is for "
                         "quantizing without it: use one of them")
    if opts.output.path is None:
        raise NemoqError("--outfile is required")
    recipe, overrides = _recipe(opts.recipe)
    require_calibration("quantize --calibrate", opts.src)
    from nemoq.calib.calibrated import quantize_calibrated
    from nemoq.quant.recipes import override_warnings
    with layer_progress("calibrated quantizing") as (on_start, on_progress):
        calibrated = quantize_calibrated(opts.src, opts.output.path, recipe, overrides=overrides,
                                         tensor_scales=opts.recipe.tensor_scales, on_start=on_start,
                                         on_progress=on_progress, force=opts.output.force,
                                         split_max_size=opts.output.split_max_size, **opts.calibration.given())
    specs = [t.spec for t in calibrated.typed]
    plan = QuantPlan(recipe, calibrated.typed, calibrated.layer_kinds, override_warnings(specs, overrides))
    on_plan(plan)
    result = calibrated.conversion
    return QuantizeOutcome(plan, result, scale_notice(t.name for t in result.tensors), _kept(result), calibrated,
                           calibrated.imatrix_output)
