"""What the calibrated walk hands around: how a matrix is quantized (Target), its bytes
(Quantized), what calibration bought on it (MatrixReport), the input statistics H (Gram) and
the `record` that fills them during a pass (Recorder)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from nemoq.quant.compensate import Compensated

GRAM_ROWS = 4096


@dataclass(frozen=True)
class Target:
    """How the recipe quantizes one matrix."""
    type: str       # a block format of nemoq.quant.formats
    scaled: bool    # quantized as x / scale with a per-matrix `.scale` tensor (NVFP4, MXFP4)


@dataclass
class Quantized:
    """One tensor's bytes as the walk made them, with its per-matrix scales."""
    blocks: np.ndarray           # GGUF rows (rows, bytes); (experts, rows, bytes) for a stack
    scales: np.ndarray | None    # float32 (matrices,) for a `.scale` tensor


@dataclass(frozen=True)
class MatrixReport:
    """What calibration bought on one tensor (experts pooled), on the calibration tokens."""
    name: str
    type: str
    tokens: int                  # tokens that reached it (summed over experts)
    error: float                 # ||(W - Q) X|| / ||W X|| with compensation
    error_rounding: float        # ... with importance-weighted rounding
    fallback: str | None
    worst_expert: tuple[int, float, float] | None = None   # (expert, error, error_rounding)

    @property
    def ratio(self) -> float:
        return self.error / self.error_rounding if self.error_rounding > 0 else 1.0


class Gram:
    """sum over tokens of x x^T of one matrix's input, the tokens summed, and sum x^2 per column.

    H is summed in float64 over products of at most GRAM_ROWS tokens in float32 (twice as fast
    as float64 products on a CPU, and within 1e-6 of them: the damping is 1e-2); the diagonal
    for the imatrix is summed in float64 throughout, as `nemoq calibrate` sums it.
    """

    def __init__(self, n: int, device: torch.device):
        # MPS has no float64: its float32 products are summed on the CPU
        where = "cpu" if device.type == "mps" else device
        self.h = torch.zeros((n, n), dtype=torch.float64, device=where)
        self.diag = torch.zeros(n, dtype=torch.float64, device=where)
        self.tokens = 0
        self.shift: torch.Tensor | None = None   # sum (x - x~) x~^T, asymmetric feeds (quant/asymmetric.py)

    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> None:
        """x: the tokens' inputs; reference: the full-precision model's inputs for the same tokens,
        where x are the quantized model's (the shift is then summed too); weight: each token's
        factor on the matrix's output (a routed expert's gate), which H and the shift weigh by
        (sum g^2 x x^T); the diagonal stays unweighted, it is the imatrix's statistic."""
        x = x.reshape(-1, x.shape[-1]).float()
        if reference is not None and self.shift is None:
            self.shift = torch.zeros_like(self.h)
        references = reference.reshape(x.shape).float().split(GRAM_ROWS) if reference is not None else None
        weights = weight.reshape(-1, 1).float().split(GRAM_ROWS) if weight is not None else None
        for i, rows in enumerate(x.split(GRAM_ROWS)):
            self.diag += rows.to(self.h.device, torch.float64).square().sum(0)
            weighted = rows if weights is None else rows * weights[i]
            self.h += (weighted.T @ weighted).to(self.h.device, torch.float64)
            if references is not None:
                moved = references[i] - rows if weights is None else (references[i] - rows) * weights[i]
                self.shift += (moved.T @ weighted).to(self.h.device, torch.float64)
        self.tokens += x.shape[0]

    def numpy(self) -> np.ndarray:
        return self.h.cpu().numpy()


def report_of(name: str, type_name: str, c: Compensated, tokens: int) -> MatrixReport:
    if not c.experts:
        return MatrixReport(name, type_name, tokens, c.error, c.error_rounding, c.fallback)
    e = max(range(len(c.experts)), key=lambda i: c.experts[i].error)
    worst = (e, c.experts[e].error, c.experts[e].error_rounding)
    return MatrixReport(name, type_name, tokens, c.error, c.error_rounding, expert_fallbacks(c.experts), worst)


def expert_fallbacks(experts: tuple[Compensated, ...]) -> str | None:
    """Which experts fell back, grouped by why ("3 of 128 experts (#4,#9,#17): fewer than 64 tokens")."""
    why: dict[str, list[int]] = {}
    for i, c in enumerate(experts):
        if c.fallback:
            reason = re.sub(r"^\d+ calibration tokens, (fewer than \d+)$", r"\1 tokens", c.fallback)
            why.setdefault(reason, []).append(i)
    if not why:
        return None
    return "; ".join(f"{len(e)} of {len(experts)} experts ({_ids(e)}): {reason}" for reason, e in why.items())


def _ids(experts: list[int], limit: int = 8) -> str:
    return ",".join(f"#{i}" for i in experts[:limit]) + (",..." if len(experts) > limit else "")


class StageRecorded(Exception):
    """Every input of the stage is recorded: the rest of the layer is not needed."""


class Recorder:
    """A pass's `record` for one batch: adds each named input to its Gram in `grams` (with
    `references`, the other stream's inputs by name, their shift too); with `keep`, keeps the
    inputs instead (the full-precision stream of a pair); with `cut`, ends the forward once
    every named input is seen; every input, named or not, goes to `statistics` where given."""

    def __init__(self, names: list[str], grams: dict[str, Gram], device: torch.device, *, cut: bool,
                 keep: bool = False, references: dict[str, torch.Tensor] | None = None,
                 statistics: Callable | None = None):
        self.wanted, self.grams, self.device, self.cut = set(names), grams, device, cut
        self.keep, self.references, self.statistics = keep, references, statistics
        self.kept: dict[str, torch.Tensor] = {}
        self.seen: set[str] = set()
        self.last: tuple = (None, None)   # the last input recorded and its Gram: q, k and v share one

    def __call__(self, name: str, x: torch.Tensor, expert) -> None:
        if self.statistics is not None:
            self.statistics(name, x, expert)
        if name not in self.wanted:
            return
        if self.keep:
            self.kept[name] = x
        elif x is self.last[0]:
            self.grams.setdefault(name, self.last[1])
        else:
            gram = self.grams.setdefault(name, Gram(x.shape[-1], self.device))
            gram.add(x, None if self.references is None else self.references[name])
            self.last = (x, gram)
        self.seen.add(name)
        if self.cut and self.seen == self.wanted:
            raise StageRecorded
