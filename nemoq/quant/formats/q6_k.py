"""Q6_K: super-blocks of 256 values in 16 groups of 16; value = d * sc[g] * (q - 32), q in 0..63.

Layout (210 bytes): ql (128 bytes, low 4 bits), qh (64 bytes, high 2 bits), sc (16 int8 group
scales), d (f16). In each half h of 128 values, value 128h + 32k + l (k = 0..3, l = 0..31) keeps
its low nibble in ql[64h + 32(k % 2) + l] (the low half of the byte for k < 2, the high half for
k >= 2) and its high two bits in qh[32h + l] at bit 2k.
ggml (quantize_row_q6_K_ref / _impl) fits each group with make_qx_quants, weighting values by
x^2 without importance or by the importance itself, stores the group scales as int8 relative to
the largest (mapped to -128) and re-rounds the values. We add a search for the plain or
importance-weighted error and a refit of the int8 scales, keeping the best per super-block.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import (
    Format, f16_bytes, f16_round, metric_weights, pack_nibbles, per_value, read_f16,
)
from nemoq.quant.formats.search import (
    GROUP_MAX_EPS, divide, dot, full, groups_first, groups_last, make_qx_quants, nearest_int, signed_absmax,
)


SHIFTS = np.array([0, 2, 4, 6], np.uint8)[:, None]  # where value 32k + l of a half keeps its high bits


class Q6_K(Format, ggml_type=GGMLQuantizationType.Q6_K):
    code_values = np.arange(-32, 32, dtype=np.float32)  # code q holds level q - 32
    field_bytes, code_bytes = slice(192, 210), slice(0, 192)
    # ours: the largest value mapped to level -32 * factor, 0.6 to 1.05 in steps of 0.025 (written
    # out, as Q4_0's: the bits of each factor shape the output bytes)
    search_factors = np.array([
        0.6, 0.625, 0.65, 0.675, 0.7, 0.725, 0.75, 0.775, 0.8, 0.825, 0.8500000000000001, 0.875,
        0.9, 0.925, 0.9500000000000001, 0.9750000000000001, 1.0, 1.0250000000000001, 1.05,
    ])

    def search_rows(self, x, importance=None):
        """Our search, and the same with the int8 scales refitted, whichever is better per super-block."""
        xt = groups_first(x, 16, 16)  # (16 values, 16 groups, rows, super-blocks)
        w = metric_weights(x, importance)
        wt = full(groups_first(w, 16, 16), xt.shape)
        ours = self.store_scales(xt, *make_qx_quants(xt, 32, wt, 32 * self.search_factors))
        return self.best_of(x, w, self.pack(*ours), self.pack(*self.refit(xt, wt, *ours)))

    def ggml_rows(self, x, importance=None):
        xt = groups_first(x, 16, 16)
        ggml_w = xt * xt if importance is None else groups_first(importance[None, :], 16, 16)
        return self.pack(*self.store_scales(xt, *make_qx_quants(xt, 32, ggml_w)))

    @staticmethod
    def store_scales(xt, scales, L):
        """Group scales -> (d, int8 sc, levels) as ggml: the largest maps to -128, levels re-rounded."""
        max_scale = signed_absmax(scales)
        zero = np.abs(max_scale) < GROUP_MAX_EPS
        iscale = np.float32(-128) / np.where(zero, np.float32(1), max_scale)
        d = np.where(zero, np.float32(0), f16_round(1 / iscale))
        sc = np.where(zero, 0, np.minimum(127, nearest_int(iscale * scales)))
        return d, sc, Q6_K.levels(xt, d, sc, np.where(zero, -32, L))

    @staticmethod
    def levels(xt, d, sc, L):
        """Nearest levels for the stored scales (groups with a zero scale keep L)."""
        dd = d * sc
        return np.where(dd != 0, np.clip(nearest_int(divide(xt, dd)), -32, 31), L)

    @staticmethod
    def refit(xt, wt, d, sc, L, iters=2):
        """With d fixed: the least-squares group scale for the levels, rounded to int8; re-round levels."""
        for _ in range(iters):
            fit = divide(dot(wt * xt, L), dot(wt * L, L))
            sc = np.where(d != 0, np.clip(nearest_int(divide(fit, d)), -128, 127), sc)
            L = Q6_K.levels(xt, d, sc, L)
        return d, sc, L

    def pack(self, d, sc, L):
        rows = d.shape[0]
        q = (groups_last(L, 2) + 32).astype(np.uint8).reshape(rows, -1, 256)
        fields = self.pack_fields(d, groups_last(sc).reshape(rows, -1, 16))
        return np.concatenate([self.pack_codes(q), fields], axis=-1).reshape(rows, -1)

    def pack_codes(self, q):
        """Codes (..., 256) -> ql (128 bytes), qh (64 bytes)."""
        lead = q.shape[:-1]
        q = q.reshape(*lead, 2, 4, 32)
        ql = pack_nibbles(q[..., :2, :], q[..., 2:, :]).reshape(*lead, 128)
        qh = ((q >> 4) << SHIFTS).sum(axis=-2, dtype=np.uint8).reshape(*lead, 64)
        return np.concatenate([ql, qh], axis=-1)

    def unpack_codes(self, b):
        lead = b.shape[:-1]
        ql = b[..., :128].reshape(*lead, 2, 2, 32)
        qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2)  # (..., 2, 4, 32)
        high = (qh >> SHIFTS) & 3
        return (low | (high << 4)).reshape(*lead, 256)

    def pack_fields(self, d, sc):
        """The 16 int8 group scales, then d."""
        return np.concatenate([sc.astype(np.int8).view(np.uint8), f16_bytes(d)], axis=-1)

    def unpack_fields(self, b):
        return read_f16(b[:, 16:18]), b[:, :16].view(np.int8)

    def grid_of(self, d, sc):
        return per_value(d[:, None] * sc.astype(np.float32), 16), np.zeros((d.shape[0], 256), np.float32)

    def dequantize_blocks(self, blocks):
        n = blocks.shape[0]
        d, sc = self.fields(blocks)
        q = (self.codes(blocks).astype(np.int8) - np.int8(32)).astype(np.float32).reshape(n, 16, 16)
        return ((d[:, None] * sc.astype(np.float32))[..., None] * q).reshape(n, 256)
