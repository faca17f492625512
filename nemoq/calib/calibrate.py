"""`nemoq calibrate`: an importance matrix from a layer-streamed forward pass over calibration text.

Consumes the converter's stream (nemoq.convert.pipeline.open_source: a checkpoint folder, a hub
id or an F32/F16/BF16 GGUF), so the forward runs on GGUF-named tensors and the statistics are
keyed exactly as quantize looks them up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nemoq.calib.coverage import LayerCoverage, expert_coverage
from nemoq.calib.data import load_items
from nemoq.calib.forward import Progress, streamed_forward
from nemoq.calib.hparams import config_of
from nemoq.calib.imatrix_file import ImportanceMatrix, write_imatrix
from nemoq.calib.sequences import make_sequences, model_text
from nemoq.calib.stats import ActivationStats
from nemoq.errors import NemoqError
from nemoq.files import atomic_outputs, claim_output

DEFAULT_TOKENS = 65536
DEFAULT_CTX = 512
DEVICE_ORDER = ("cuda", "mps", "cpu")   # --device auto picks the first available
AVAILABLE = {"cuda": lambda: torch.cuda.is_available(), "cpu": lambda: True,
             "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}


@dataclass
class CalibrationResult:
    output: Path
    imatrix: ImportanceMatrix
    coverage: list[LayerCoverage]
    sequences: int
    ctx: int
    device: str
    seconds: float
    spilled: bool

    @property
    def tokens(self) -> int:
        return self.sequences * self.ctx


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(next(d for d in DEVICE_ORDER if AVAILABLE[d]()))
    if name not in AVAILABLE:
        raise NemoqError(f"unknown device {name!r}; use auto, {', '.join(DEVICE_ORDER)}")
    if not AVAILABLE[name]():
        raise NemoqError(f"device {name} is not available to torch here; use --device auto or cpu")
    return torch.device(name)


def calibration_sequences(source, data: Path | None, ctx: int, tokens: int) -> tuple[np.ndarray, list[str]]:
    """The calibration text (--data, or the shipped corpus) as token sequences (n, ctx) in the
    source's own template and tokenizer, and the dataset names an imatrix records."""
    items, datasets = load_items(data)
    return make_sequences(items, model_text(source), ctx, tokens, str(data) if data else "nemoq corpus"), datasets


def calibrate(src: str | Path, out: Path, *, data: Path | None = None, tokens: int = DEFAULT_TOKENS,
              ctx: int = DEFAULT_CTX, device: str = "auto", force: bool = False,
              on_start: Callable[[int, int], None] | None = None,
              on_progress: Callable[[Progress], None] | None = None) -> CalibrationResult:
    from nemoq.convert.pipeline import open_source

    with claim_output(out, force) as out:    # before the long forward pass, not after it
        torch_device = pick_device(device)
        source = open_source(src)
        cfg = config_of(source, forward="imatrix")
        sequences, datasets = calibration_sequences(source, data, ctx, tokens)
        if on_start is not None:
            on_start(sequences.shape[0], cfg.n_layers + 1)
        stats = ActivationStats(cfg.n_experts)
        start = time.perf_counter()
        hidden = streamed_forward(source.plan, cfg, sequences, stats.record, device=torch_device,
                                  on_progress=on_progress)
        spilled = hidden.spilled
        hidden.close()
        imatrix = stats.to_imatrix(datasets, sequences.shape[0], ctx)
        with atomic_outputs(out, force) as tmp:
            write_imatrix(tmp, imatrix)
    return CalibrationResult(out, imatrix, expert_coverage(imatrix), sequences.shape[0], ctx, str(torch_device),
                             time.perf_counter() - start, spilled)
