"""`nemoq calibrate`: an importance matrix from a layer-streamed forward over calibration text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nemoq.commands.base import LayerProgress, Output, no_layer_progress
from nemoq.commands.extras import require_calibration


@dataclass(frozen=True)
class CalibrateOptions:
    src: str                     # checkpoint folder, hub repo id or F32/F16/BF16 GGUF
    output: Output               # the imatrix file (llama.cpp's GGUF format)
    data: Path | None = None     # calibration text (default: the shipped corpus, train split)
    tokens: int = 65536
    ctx: int = 512
    device: str = "auto"


def calibrate(opts: CalibrateOptions, layer_progress: LayerProgress = no_layer_progress):
    """-> calib.calibrate.CalibrationResult (coverage per expert, tokens, device, time)."""
    require_calibration("calibrate", opts.src)
    from nemoq.calib.calibrate import calibrate as run
    with layer_progress("calibrating") as (on_start, on_progress):
        return run(opts.src, opts.output.path, data=opts.data, tokens=opts.tokens, ctx=opts.ctx, device=opts.device,
                   force=opts.output.force, on_start=on_start, on_progress=on_progress)
