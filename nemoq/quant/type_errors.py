"""What each candidate type would cost one matrix: its output error on calibration inputs.

For W (rows, n) with H = sum over tokens of x x^T, rounding W to Q costs
tr((W - Q) H (W - Q)^T) = sum over tokens ||(W - Q) x||^2, and tr(W H W^T) is the output's own
energy; a profile keeps both (summed over the experts of a stack) so relative errors pool the way
compensate.stack pools them. Two roundings per type: plain, as `nemoq quantize` writes the file
without an imatrix (the format's quantizer, the FP4 per-matrix scale as ScaledEncoding chooses it),
and error-compensated, as `--calibrate` does (compensate.compensated_quantize). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nemoq.quant.compensate import DAMPING, column_order, compensated_quantize, output_energy, squared_error
from nemoq.quant.encodings import BLOCK_ENCODINGS
from nemoq.quant.tensor_scale import SCALE_RULES, best_scale, calibrated_scale

# Every type a profile may offer a tensor, if its block divides the row width (f16: any width).
CANDIDATE_TYPES = ("f16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "iq4_nl", "q4_0", "mxfp4", "nvfp4")


@dataclass
class TypeError2:
    """Squared output errors of one type, summed over the matrices measured so far."""
    plain: float = 0.0
    compensated: float | None = None


def plain_rounding(type_name: str, w: np.ndarray, scaled: bool) -> tuple[np.ndarray, np.float32]:
    """(what the file stores of W after plain rounding, no importance; its per-matrix scale)."""
    if type_name == "f16":
        return w.astype(np.float16), np.float32(1)
    enc = BLOCK_ENCODINGS[type_name]
    scale = np.float32(1)
    if scaled and type_name in SCALE_RULES:
        scale = best_scale(enc, w, None, SCALE_RULES[type_name])
    return enc.quantize(w if scale == 1 else w / scale), scale   # no copy of an unscaled head (1.4 GB)


def stored_values(type_name: str, stored: np.ndarray, scale: np.float32, shape: tuple[int, ...]) -> np.ndarray:
    """The values a file's stored matrix (plain_rounding's) stands for, float32."""
    if type_name == "f16":
        return stored.astype(np.float32)
    return BLOCK_ENCODINGS[type_name].dequantize(stored).reshape(shape) * scale


def plain_values(type_name: str, w: np.ndarray, scaled: bool) -> np.ndarray:
    """W as the file would hold it after plain rounding (no importance), float32."""
    return stored_values(type_name, *plain_rounding(type_name, w, scaled), w.shape)


def compensated_error(type_name: str, w: np.ndarray, h: np.ndarray, tokens: int, scaled: bool,
                      energy: float, importance: np.ndarray | None = None, quantize=compensated_quantize) -> float:
    """Squared output error after compensated rounding (as nemoq.calib.walk quantizes: the FP4
    scale chosen with the inputs' mean square, then W / scale rounded through H in the format's
    column order)."""
    if type_name == "f16":
        return squared_error(w, plain_values("f16", w, False), h)
    if scaled and type_name in SCALE_RULES:
        w = w / calibrated_scale(type_name, w, h, tokens, importance)
    c = quantize(type_name, w, h, damping=DAMPING, importance=importance, tokens=tokens,
                 act_order=column_order(type_name))
    return c.error ** 2 * energy


# rows per product through H: the output head's 131072 x 2688 in float64 at once took 7 GB of
# temporaries beside its weights
ROWS = 4096


def through_tokens(x: np.ndarray):
    """tr(D H D^T) as ||D X^T||^2 for H = X^T X (x: the tokens, (tokens, n)): 2 r n t operations
    instead of 2 r n^2, for a routed expert's few hundred tokens against 1,856-2,688 columns. The
    products in float32, their squares summed in float64."""
    x_t = np.ascontiguousarray(np.asarray(x, dtype=np.float32).T)

    def squared(w: np.ndarray, q: np.ndarray | None = None) -> float:
        d = np.asarray(w if q is None else w - q, dtype=np.float32)
        return float(np.square(d @ x_t, dtype=np.float64).sum())
    return squared


def matrix_errors(w: np.ndarray, h: np.ndarray, types: tuple[str, ...], *, tokens: int, scaled: dict[str, bool],
                  compensated: bool, importance: np.ndarray | None = None, inputs: np.ndarray | None = None,
                  quantize=compensated_quantize) -> tuple[float, dict[str, TypeError2]]:
    """(tr(W H W^T), squared error per type) of one matrix (rows, n) with its H (n, n); `quantize`:
    the compensated rounding (compensate.py's reference, or a fast path with its signature);
    `inputs`: the tokens H sums, where at hand (through them where fewer than half the columns)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    h = np.asarray(h, dtype=np.float64)
    if inputs is not None and len(inputs) < w.shape[1] / 2:
        squared = through_tokens(inputs)
        energy = squared(w)
    else:
        energy = sum(output_energy(w[r:r + ROWS], h) for r in range(0, len(w), ROWS))
        squared = lambda w, q: sum(squared_error(w[r:r + ROWS], q[r:r + ROWS], h)   # noqa: E731
                                   for r in range(0, len(w), ROWS))
    out = {}
    for t in types:
        e = TypeError2(squared(w, plain_values(t, w, scaled.get(t, False))))
        if compensated:
            e.compensated = compensated_error(t, w, h, tokens, scaled.get(t, False), energy, importance, quantize)
        out[t] = e
    return energy, out
