"""Q5_1: blocks of 32 values, an f16 scale d, an f16 min m and 32 5-bit levels q in 0..31,
value = d * q + m.

Layout (24 bytes): d, m, qh (4 bytes, little-endian uint32: bit j is the fifth bit of value j),
then 16 bytes of low nibbles as in Q4_0 (byte j: value j low, value j + 16 high).
llama.cpp writes Q5_1 where a Q5_K tensor's rows are not a multiple of 256 (Nemotron's 2688,
1856 and 3712). ggml maps each block's [min, max] onto 0..31 without importance
(quantize_row_q5_1_ref); with importance it fits a scale and a min with weights
importance * sqrt(mean(x^2) + x^2) over the row (make_qkx3_quants in quantize_row_q5_1_impl) and
keeps the levels of that fit. We add Q4_K's scale-and-min search for the error itself, with the
levels re-rounded for the half-precision d and m as stored, and keep the better per block.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import (
    Format, f16_bytes, f16_round, metric_weights, pack_five_bits, per_value, read_f16, unpack_five_bits,
)
from nemoq.quant.formats.search import (
    divide, full, groups_first, groups_last, make_qkx_quants, nearest_int, running_min_max,
)


class Q5_1(Format, ggml_type=GGMLQuantizationType.Q5_1):
    nmax = 31
    code_values = np.arange(nmax + 1, dtype=np.float32)
    field_bytes, code_bytes = slice(0, 4), slice(4, 24)
    imatrix_search = (-0.9, 0.05, 36)   # (rmin, rdelta, nstep) of ggml's make_qkx3_quants
    our_search = (-2.0, 0.25, 24)       # ... of ours (on the tiny model's weights, with the
                                        # levels re-rounded: 0.78x ggml's error, 0.82x with importance)

    def search_rows(self, x, importance=None):
        xt = groups_first(x, 32)  # (32, rows, blocks)
        wt = full(groups_first(metric_weights(x, importance), 32), xt.shape)
        scale, neg_min, L = make_qkx_quants(xt, wt, self.nmax, *self.our_search)
        d, m = f16_round(scale), f16_round(-neg_min)
        L = np.where(d != 0, np.clip(nearest_int(divide(xt - m, d)), 0, self.nmax), L)
        return self.pack(d, m, L)

    def ggml_rows(self, x, importance=None):
        xt = groups_first(x, 32)
        if importance is None:
            return self.pack(*self.ggml_ref(xt))
        sigma2 = np.cumsum(x * x, axis=-1)[:, -1] / x.shape[-1]  # summed in order, as ggml
        qw = groups_first(importance[None, :], 32) * np.sqrt(sigma2[:, None] + xt * xt)
        scale, neg_min, L = make_qkx_quants(xt, qw, self.nmax, *self.imatrix_search)
        return self.pack(scale, -neg_min, L)

    def ggml_ref(self, xt):
        """quantize_row_q5_1_ref: d = (max - min) / 31, q = (int)((x - min) / d + 0.5)."""
        mn, mx = running_min_max(xt)
        d = (mx - mn) / np.float32(self.nmax)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        return d, mn, np.trunc((xt - mn) * inv + np.float32(0.5))

    def pack(self, d, m, L):
        """d, m (rows, blocks), levels L (32, rows, blocks) -> (rows, blocks * 24) bytes."""
        q = groups_last(L).astype(np.uint8).reshape(*d.shape, 32)
        out = np.concatenate([self.pack_fields(d, m), self.pack_codes(q)], axis=-1)
        return out.reshape(d.shape[0], -1)

    def pack_codes(self, q):
        return pack_five_bits(q)

    def unpack_codes(self, b):
        return unpack_five_bits(b)

    def pack_fields(self, d, m):
        return np.concatenate([f16_bytes(d), f16_bytes(m)], axis=-1)

    def unpack_fields(self, b):
        return read_f16(b[:, 0:2]), read_f16(b[:, 2:4])

    def grid_of(self, d, m):
        return per_value(d[:, None], 32), per_value(m[:, None], 32)

    def dequantize_blocks(self, blocks):
        d, m = self.fields(blocks)
        return d[:, None] * self.codes(blocks).astype(np.float32) + m[:, None]
