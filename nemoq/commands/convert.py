"""`nemoq convert`: a checkpoint to GGUF, weight matrices in a float type or Q8_0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nemoq.commands.base import ByteProgress, Output, ScaleNotice, no_byte_progress, scale_notice
from nemoq.convert.pipeline import (ConvertResult, Source, dominant_dtype, float_chooser, open_checkpoint_source,
                                    plan_bytes, write_gguf)

FLOAT_OUTTYPES = ("auto", "f32", "f16", "bf16")


@dataclass(frozen=True)
class ConvertOptions:
    src: str                     # checkpoint folder or hub repo id
    output: Output
    outtype: str = "auto"        # auto, f32, f16, bf16, or a recipe name (q8_0)
    pre: str | None = None       # llama.cpp pre-tokenizer name, when the regex is not recognised
    strict: bool = False         # NaN/Inf weights are an error, not a warning
    mtp: bool = True             # keep the multi-token-prediction block (--no-mtp drops it)


@dataclass
class ConvertOutcome:
    result: ConvertResult
    fallbacks: list[tuple[str, str]]      # (tensor, why and the type it got) under a recipe outtype
    scales: ScaleNotice | None


def _typing(source: Source, outtype: str):
    """(chooser, general.file_type, fallbacks) for the outtype."""
    if outtype in FLOAT_OUTTYPES:
        choose, file_type = float_chooser(outtype, dominant_dtype(source.plan))
        return choose, file_type, []
    # --outtype q8_0 is the quantizer running the Q8_0 recipe: imported only then
    from nemoq.quant.recipes import RECIPES, plan_types
    from nemoq.quant.choose import chooser
    recipe = RECIPES[outtype.upper()]
    typed = plan_types([t.spec for t in source.plan.tensors], recipe, source.layer_kinds)
    return chooser(typed), recipe.file_type, [(t.spec.name, f"{t.fallback_why}: {t.type}") for t in typed
                                              if t.fell_back]


def convert(opts: ConvertOptions, on_source: Callable[[Source], None] = lambda source: None,
            progress: ByteProgress = no_byte_progress) -> ConvertOutcome:
    """Open the checkpoint (`on_source` sees it before any weight is read), then write the file."""
    source = open_checkpoint_source(opts.src, opts.pre, opts.mtp)
    choose, file_type, fallbacks = _typing(source, opts.outtype)
    on_source(source)
    with progress("converting", plan_bytes(source.plan)) as advance:
        result = write_gguf(source, opts.output.path, choose, file_type, force=opts.output.force,
                            split_max_size=opts.output.split_max_size, strict=opts.strict, on_progress=advance)
    return ConvertOutcome(result, fallbacks, scale_notice(t.name for t in result.tensors))
