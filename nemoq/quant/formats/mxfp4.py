"""MXFP4 (OCP microscaling FP4): blocks of 32 E2M1 values sharing one E8M0 power-of-two scale.

Layout (17 bytes): e (E8M0: scale 2^(e - 127)), then 16 bytes where byte j holds value j (low
nibble) and value j + 16 (high nibble). A nibble is an E2M1 number: bit 3 the sign, bits 0-2
index 0, 0.5, 1, 1.5, 2, 3, 4, 6. ggml keeps E2M1 doubled as integers (KVALUES) times half the
scale; we dequantize the same way so the floats match ggml bit for bit.
ggml picks e = floor(log2(max|x|)) - 2 + 127 and rounds to nearest, ignoring importance. We also
try the neighbouring exponents and keep per block the one with the lowest (weighted) error.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import Format, metric_weights, pack_halves, per_value, unpack_halves
from nemoq.quant.formats.search import Grid, divide, dot, full, groups_first, groups_last

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
E2M1_GRID = Grid(E2M1, 0.25)
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def e2m1_magnitudes(ax: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Index of the E2M1 magnitude nearest to ax / scale (ties to the smaller, as ggml); 0 if scale is 0."""
    return E2M1_GRID.index(ax * divide(np.float32(1), scale), ties_down=True)


def e2m1_encode(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Nearest E2M1 nibbles (sign in bit 3, never for zero) of x / scale.

    x * (1 / scale) may round across a midpoint, so the neighbours are checked by comparing
    |v * scale - |x||, the distances ggml's best_index_mxfp4 compares, for ggml's bytes exactly.
    """
    ax = np.abs(x)
    mag = e2m1_magnitudes(ax, scale)

    def dist(i):
        return np.abs(E2M1[i] * scale - ax)

    lower = np.maximum(mag, 1) - 1
    mag = np.where(dist(lower) <= dist(mag), lower, mag)
    upper = np.minimum(mag + 1, 7)
    mag = np.where(dist(upper) < dist(mag), upper, mag)
    return mag | (((x < 0) & (mag > 0)).astype(np.uint8) << 3)


def best_e2m1_scale(xt: np.ndarray, wt: np.ndarray, scales: list[np.ndarray]) -> np.ndarray:
    """Per group, the index into `scales` (candidate arrays of per-group scales) with the lowest
    weighted squared error after rounding to nearest; the first candidate wins ties."""
    ax = np.abs(xt)
    wt = full(wt, xt.shape)
    best = pick = None
    for i, scale in enumerate(scales):
        diff = ax - scale * E2M1[e2m1_magnitudes(ax, scale)]
        err = dot(wt * diff, diff)
        if best is None:
            best, pick = err, np.zeros(err.shape, np.intp)
            continue
        better = err < best
        np.copyto(best, err, where=better)
        pick[better] = i
    return pick


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """Half the E8M0 scale, 2^(e - 128), built from bits as ggml_e8m0_to_fp32_half (denormal for e < 2)."""
    e = np.asarray(e, dtype=np.uint32)
    return np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32).view(np.float32)


class MXFP4(Format, ggml_type=GGMLQuantizationType.MXFP4):
    code_values = KVALUES  # times half the scale
    field_bytes, code_bytes = slice(0, 1), slice(1, 17)
    steps = (0, -2, -1, 1)  # exponents tried, relative to ggml's (first)

    def search_rows(self, x, importance=None):
        """ggml's exponent and its neighbours, the best per block (so never worse than ggml's)."""
        xt = groups_first(x, 32)  # (32, rows, blocks)
        wt = full(groups_first(metric_weights(x, importance), 32), xt.shape)
        e = self.ggml_exponent(xt)
        exps = [np.clip(e + step, 0, 254).astype(np.uint8) for step in self.steps]
        pick = best_e2m1_scale(xt, wt, [2 * e8m0_half(e) for e in exps])
        return self.pack(np.choose(pick, exps), xt)

    quantize_rows = search_rows   # ggml's exponent is the search's first candidate

    def ggml_rows(self, x, importance=None):
        xt = groups_first(x, 32)
        return self.pack(np.clip(self.ggml_exponent(xt), 0, 254).astype(np.uint8), xt)

    @staticmethod
    def ggml_exponent(xt):
        """quantize_row_mxfp4_ref: e = floor(log2(max|x|)) - 2 + 127, so max|x| / 2^(e - 127) is in [4, 8).

        The floor is taken exactly from the float's exponent (frexp). ggml's floorf(log2f(.)) can
        round up to the next power of two for the float32 values a few ulps below one, and where
        it does depends on the platform's log2f; BF16 and F16 weights are never that close.
        """
        amax = np.abs(xt).max(axis=0)
        return np.where(amax > 0, np.frexp(amax)[1] - 1 - 2 + 127, 0)

    def pack(self, e, xt):
        """Exponents (rows, blocks) and values (32, rows, blocks) -> (rows, blocks * 17) bytes."""
        q = groups_last(e2m1_encode(xt, 2 * e8m0_half(e))).reshape(*e.shape, 32)
        out = np.concatenate([self.pack_fields(e), self.pack_codes(q)], axis=-1)
        return out.reshape(e.shape[0], -1)

    def pack_codes(self, q):
        return pack_halves(q)

    def unpack_codes(self, b):
        return unpack_halves(b)

    def pack_fields(self, e):
        return np.asarray(e, dtype=np.uint8)[..., None]

    def unpack_fields(self, b):
        return (b[:, 0],)

    def grid_of(self, e):
        return per_value(e8m0_half(e)[:, None], 32), np.zeros((e.shape[0], 32), np.float32)

    def dequantize_blocks(self, blocks):
        (e,) = self.fields(blocks)
        with np.errstate(over="ignore"):  # e = 255 overflows to inf, as in ggml
            return e8m0_half(e)[:, None] * KVALUES[self.codes(blocks)]
