"""Per-matrix scales for the FP4 formats, stored as llama.cpp's `<name>.scale` tensors.

NVFP4's per-16 scales are UE4M3 floats: 3 mantissa bits, normal from 2^-6 up to 448. Weights
of a trained model are small (|w| ~ 0.01-0.1), so without a per-tensor scale the block scales
(max|x| / 6 ~ 0.002-0.02) land in E4M3's subnormal range, where only 1-3 bits of precision are
left. NVIDIA's checkpoints therefore carry `weight_scale_2` = amax / (6 * 448) per matrix:
the largest value of the matrix then uses the largest block scale, and every block scale is a
normal E4M3 number. llama.cpp multiplies a matmul's output by `<name>.scale` (one value per
expert for stacked experts), so nemoq quantizes x / scale and writes the scale beside it.

Rows arrive in chunks that need not align with matrices, and a matrix's scale needs its
amax: rows are gathered until a matrix is complete (one expert, or one 2-D tensor), then
quantized. That bounds memory by the largest matrix in float32, not a whole expert stack.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

from nemoq import kernels_c
from nemoq.convert.dtypes import Companion, EncodingBase
from nemoq.convert.mapping import SCALE_LOADED
from nemoq.convert.plan import matrices_in
from nemoq.quant.encodings import BLOCK_ENCODINGS, BlockEncoding, widen_to_float32


@dataclass(frozen=True)
class ScaleRule:
    full_scale: float            # the value a matrix's largest |x| is mapped to (at most)
    factors: int = 1             # candidate scales: the start * 2^(-k / factors), k < factors
    power_of_two: bool = False   # round the start down to a power of two


# NVFP4: the largest E2M1 value (6) times the largest UE4M3 block scale (448), as NVIDIA
# ModelOpt's weight_scale_2, rounded down to a power of two: every block scale stays a normal
# E4M3 number and the per-16 code search sees the same mantissa grid as without a scale (on the
# trained fixture ModelOpt's exact amax scale lowered the weights' squared error by 6% but
# raised KLD by 8%; the power of two lowered both).
# MXFP4: E8M0 block scales are powers of two, so only a scale's position inside an octave
# changes the grid; 16 positions are tried per matrix (on sample rows, all in one quantizer
# call) and the one with the lowest weighted error kept: KLD 0.74x ggml's MXFP4 on the trained
# fixture (0.71x with an imatrix), vs 0.94x without a scale. 8 positions halve the search but
# gave 0.75x / 0.79x.
SCALE_RULES = {
    "nvfp4": ScaleRule(6.0 * 448.0, power_of_two=True),
    "mxfp4": ScaleRule(6.0, factors=16),
}
SAMPLE_ROWS = 64   # 16 or 32 sample rows chose worse scales (KLD 0.83x / 0.77x)


def takes_scale(spec, type_name: str) -> bool:
    """A format with a scale rule, on a weight whose `.scale` llama.cpp applies (not the
    embeddings or the output head: llama.cpp refuses a file with `output.scale`; not the MTP
    block: llama.cpp looks for `.scale` tensors only beside the weights it loads, and skips that
    block unless asked for it, so a file with one there does not load)."""
    return type_name in SCALE_RULES and spec.row.tensor in SCALE_LOADED and spec.layer_kind != "mtp"


def scale_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".scale"


def matrix_scale(x: np.ndarray, full_scale: float) -> np.float32:
    """amax / full_scale, or 1 for an all-zero matrix."""
    amax = max(float(x.max()), -float(x.min())) if x.size else 0.0   # no |x| copy of the matrix
    return np.float32(amax / full_scale) if amax > 0 else np.float32(1.0)


class ScaledEncoding(EncodingBase):
    """A block encoding for one tensor whose matrices are quantized as x / scale; the scales
    become the `<name>.scale` companion tensor (shape (n_matrices,))."""

    def __init__(self, base: BlockEncoding, shape: tuple[int, ...], importance: np.ndarray | None = None):
        self.base, self.ggml_type = base, base.ggml_type
        self.rule = SCALE_RULES[base.name]
        self.rows_per_matrix = shape[-2]
        self.n_matrices = matrices_in(shape)
        self.importance = None if importance is None else importance.reshape(-1, importance.shape[-1])
        self.scales = np.ones(self.n_matrices, dtype=np.float32)
        self._width = shape[-1]
        self._pending: np.ndarray | None = None   # allocated when the tensor is being written
        self._filled = self._matrix = 0

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return self.base.nbytes(shape)

    def companions(self, tensor) -> tuple[Companion, ...]:
        return (Companion(scale_name(tensor.name), (self.n_matrices,), lambda: self.scales),)

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        x = widen_to_float32(rows, source_dtype).reshape(-1, rows.shape[-1])
        if self._pending is None:
            self._pending = np.empty((self.rows_per_matrix, self._width), dtype=np.float32)
        pieces, start = [], 0
        while start < x.shape[0]:
            take = min(x.shape[0] - start, self.rows_per_matrix - self._filled)
            self._pending[self._filled:self._filled + take] = x[start:start + take]
            self._filled += take
            start += take
            if self._filled == self.rows_per_matrix:
                pieces.append(self._quantize_matrix())
        if not pieces:
            return np.empty((0, self.base.nbytes((1, x.shape[-1]))), dtype=np.uint8)
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def _quantize_matrix(self) -> np.ndarray:
        m = self._matrix
        importance = None
        if self.importance is not None:
            importance = self.importance[min(m, self.importance.shape[0] - 1)]
        scale = best_scale(self.base, self._pending, importance, self.rule)
        self.scales[m] = scale
        out = self.base.quantize(np.divide(self._pending, scale, out=self._pending), importance)
        self._matrix, self._filled = m + 1, 0
        if self._matrix == self.n_matrices:
            self._pending = None
        return out


def calibrated_scale(type_name: str, w: np.ndarray, h: np.ndarray, tokens: int,
                     importance: np.ndarray | None = None) -> np.float32:
    """The `.scale` of a matrix rounded through its inputs' H (quantize --calibrate, profiles):
    best_scale weighted by the inputs' mean square diag(H) / tokens, else by the importance."""
    mean_square = np.diag(h) / tokens if tokens else importance
    return best_scale(BLOCK_ENCODINGS[type_name], w, None if mean_square is None else mean_square.astype(np.float32),
                      SCALE_RULES[type_name])


def best_scale(base: BlockEncoding, x: np.ndarray, importance: np.ndarray | None, rule: ScaleRule) -> np.float32:
    """The rule's candidate scale with the lowest (importance-)weighted error on sample rows."""
    start = matrix_scale(x, rule.full_scale)
    if rule.power_of_two:
        start = np.ldexp(np.float32(0.5), np.frexp(start)[1])   # exactly, where log2 may round up
    if rule.factors == 1:
        return start
    rows = x[:: max(1, x.shape[0] // SAMPLE_ROWS)]
    scales = (start * octave_steps(rule.factors)).astype(np.float32)
    errors = candidate_errors(base, rows, scales, importance)
    return scales[int(np.argmin(errors))]


@functools.cache
def octave_steps(n: int) -> np.ndarray:
    """2^(-k / n) for k < n in float64, from Python's decimal arithmetic (correctly rounded on
    every machine, where numpy's power and a C library's pow may differ in the last bit)."""
    steps = np.array([float(Decimal(2) ** (Decimal(-k) / n)) for k in range(n)])
    steps.setflags(write=False)
    return steps


def candidate_errors(base: BlockEncoding, rows: np.ndarray, scales: np.ndarray,
                     importance: np.ndarray | None) -> np.ndarray:
    """float64 (candidates,): sum over rows and columns of w * (dequantized(rows / s) * s - rows)^2
    per candidate scale s. C (kernels_c.scale_errors: row by row in cache) where built, else numpy;
    the two differ only in the order of float64 additions."""
    if kernels_c.available(base.name) and base.name in kernels_c.SCALE_SEARCH_FORMATS:
        return kernels_c.scale_errors(base.name, rows, scales, importance, threads=kernels_c.THREADS).sum(axis=0)
    w = np.ones(rows.shape[-1], np.float32) if importance is None else importance
    # every candidate in one quantizer call: (candidates * rows, n) rows
    scaled = rows[None, :, :] / scales[:, None, None]
    values = base.dequantize(base.quantize(scaled.reshape(-1, rows.shape[-1]), importance))
    diff = values.reshape(scaled.shape) * scales[:, None, None] - rows[None]
    return np.einsum("fij,fij,j->f", diff, diff, w, dtype=np.float64)
