"""Q4_K: super-blocks of 256 values in 8 groups of 32; value = d * sc[g] * q - dmin * m[g], q in 0..15.

Layout (144 bytes): d (f16), dmin (f16), 12 bytes holding the eight 6-bit scales sc and mins m,
then 128 bytes of nibbles: byte 32c + l holds value 64c + l (low) and 64c + 32 + l (high).
The 6-bit pairs pack as: bytes 0-3 sc[0..3] | (sc[4..7] >> 4) << 6, bytes 4-7 m[0..3] |
(m[4..7] >> 4) << 6, bytes 8-11 (sc[4..7] & 15) | (m[4..7] & 15) << 4.
ggml fits each group with a scale and a min (make_qkx2_quants, weights mean|x| + |x|) and stores
scales and mins relative to their maxima (quantize_row_q4_K_ref); with importance it fits with
weights importance * sqrt(2 mean(x^2) + x^2) (make_qkx3_quants) and stores them with
make_qp_quants (quantize_row_q4_K_impl). We add the same pipeline driven by the error we are
judged on, and a refit of the 6-bit scales and mins, and keep the best per super-block.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import (
    Format, f16_bytes, f16_round, metric_weights, pack_nibbles, per_value, read_f16, unpack_nibbles,
)
from nemoq.quant.formats.search import (
    divide, dot, full, groups_first, groups_last, make_qkx_quants, make_qp_quants, nearest_int, total,
)


def pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins (..., 8) -> (..., 12) bytes."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    return np.concatenate([
        sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
        m[..., :4] | ((m[..., 4:] >> 4) << 6),
        (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4),
    ], axis=-1)


def unpack_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) bytes -> scales, mins (..., 8) as uint8."""
    sc = np.concatenate([b[..., 0:4] & 63, (b[..., 8:12] & 0x0F) | ((b[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([b[..., 4:8] & 63, (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, m


class Q4_K(Format, ggml_type=GGMLQuantizationType.Q4_K):
    nmax = 15
    code_values = np.arange(nmax + 1, dtype=np.float32)
    field_bytes, code_bytes = slice(0, 16), slice(16, 144)
    ref_search = (-1.0, 0.1, 20)  # (rmin, rdelta, nstep) of make_qkx2_quants in the _ref quantizer
    imatrix_search = (-0.9, 0.05, 36)  # ... of make_qkx3_quants in the importance path
    our_search = (-1.5, 0.4, 15)  # ... of our own search: wider, coarser

    def search_rows(self, x, importance=None):
        """Our fit, and the same refitted, whichever is better per super-block."""
        xt = groups_first(x, 8, 32)  # (32 values, 8 groups, rows, super-blocks)
        w = metric_weights(x, importance)
        wt = full(groups_first(w, 8, 32), xt.shape)
        ours = self.fit(xt, wt, self.our_search)
        return self.best_of(x, w, self.pack(*ours), self.pack(*self.refit(xt, wt, *ours)))

    def ggml_rows(self, x, importance=None):
        xt = groups_first(x, 8, 32)
        if importance is None:
            return self.pack(*self.ggml_ref(xt))
        sigma2 = 2 * total((xt * xt).swapaxes(0, 1).reshape(256, *xt.shape[2:])) / 256  # x[0] + x[1] + ...
        qw = groups_first(importance[None, :], 8, 32) * np.sqrt(sigma2 + xt * xt)
        return self.pack(*self.fit(xt, qw, self.imatrix_search))

    def ggml_ref(self, xt):
        """quantize_row_q4_K_ref: weights mean|x| + |x|; scales and mins stored as 63 * value / max."""
        av_x = np.sqrt((xt * xt).sum(axis=0) / 32)
        scales, mins, L = make_qkx_quants(xt, av_x + np.abs(xt), self.nmax, *self.ref_search)
        max_scale = np.maximum(scales.max(axis=0), 0)
        max_min = np.maximum(mins.max(axis=0), 0)
        sc = np.clip(nearest_int(divide(np.float32(63), max_scale) * scales), 0, 63)
        m = np.clip(nearest_int(divide(np.float32(63), max_min) * mins), 0, 63)
        d, dmin = f16_round(max_scale / 63), f16_round(max_min / 63)
        return d, dmin, sc, m, self.levels(xt, d, dmin, sc, m, L)

    def fit(self, xt, weights, search):
        """quantize_row_q4_K_impl's pipeline: group fits, then the 6-bit scales and mins by make_qp_quants."""
        scales, mins, L = make_qkx_quants(xt, weights, self.nmax, *search)
        sw = np.broadcast_to(weights, xt.shape).sum(axis=0)
        d, sc = make_qp_quants(scales, 63, sw)
        dmin, m = make_qp_quants(mins, 63, sw)
        d, dmin = f16_round(d), f16_round(dmin)
        return d, dmin, sc, m, self.levels(xt, d, dmin, sc, m, L)

    def levels(self, xt, d, dmin, sc, m, L):
        """Nearest levels for the stored scales and mins (groups with a zero scale keep L)."""
        dd, dm = d * sc, dmin * m
        return np.where(dd != 0, np.clip(nearest_int(divide(xt + dm, dd)), 0, self.nmax), L)

    def refit(self, xt, wt, d, dmin, sc, m, L, iters=2):
        """With d and dmin fixed: the least-squares scale and min of each group for its levels,
        rounded to 6 bits, then re-round the levels."""
        w = full(wt, xt.shape)
        sum_w, sum_x = w.sum(axis=0), dot(w, xt)
        for _ in range(iters):
            wl = w * L
            sum_l, sum_l2, sum_xl = wl.sum(axis=0), dot(wl, L), dot(wl, xt)
            D = sum_w * sum_l2 - sum_l * sum_l
            scale = divide(sum_w * sum_xl - sum_x * sum_l, D)
            neg_min = divide(sum_l * sum_xl - sum_l2 * sum_x, D)  # x ~ scale * L - neg_min
            sc = np.where(D > 0, np.clip(nearest_int(divide(scale, d)), 0, 63), sc)
            m = np.where(D > 0, np.clip(nearest_int(divide(neg_min, dmin)), 0, 63), m)
            L = self.levels(xt, d, dmin, sc, m, L)
        return d, dmin, sc, m, L

    def pack(self, d, dmin, sc, m, L):
        rows = d.shape[0]
        sc, m = groups_last(sc).reshape(rows, -1, 8), groups_last(m).reshape(rows, -1, 8)
        levels = groups_last(L, 2).astype(np.uint8).reshape(rows, -1, 256)
        parts = [self.pack_fields(d, dmin, sc, m), self.pack_codes(levels)]
        return np.concatenate(parts, axis=-1).reshape(rows, -1)

    def pack_codes(self, q):
        """Levels (..., 256) -> (..., 128): groups 2c and 2c + 1 share bytes 32c to 32c + 31."""
        q = q.reshape(*q.shape[:-1], 4, 2, 32)
        return pack_nibbles(q[..., 0, :], q[..., 1, :]).reshape(*q.shape[:-3], 128)

    def unpack_codes(self, b):
        lo, hi = unpack_nibbles(b.reshape(*b.shape[:-1], 4, 1, 32))
        return np.concatenate([lo, hi], axis=-2).reshape(*b.shape[:-1], 256)  # group 2c + h

    def pack_fields(self, d, dmin, sc, m):
        return np.concatenate([f16_bytes(d), f16_bytes(dmin), pack_scales(sc, m)], axis=-1)

    def unpack_fields(self, b):
        return (read_f16(b[:, 0:2]), read_f16(b[:, 2:4]), *unpack_scales(b[:, 4:16]))

    def grid_of(self, d, dmin, sc, m):
        dd = d[:, None] * sc.astype(np.float32)
        dm = dmin[:, None] * m.astype(np.float32)
        return per_value(dd, 32), per_value(-dm, 32)

    def dequantize_blocks(self, blocks):
        n = blocks.shape[0]
        d, dmin, sc, m = self.fields(blocks)
        q = self.codes(blocks).reshape(n, 8, 32).astype(np.float32)
        dd = (d[:, None] * sc.astype(np.float32))[..., None]
        dm = (dmin[:, None] * m.astype(np.float32))[..., None]
        return (dd * q - dm).reshape(n, 256)
