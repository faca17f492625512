"""Q4_0: blocks of 32 values, one f16 scale d and 32 4-bit levels q in 0..15, value = d * (q - 8).

Layout (18 bytes): d, then 16 bytes where byte j holds value j (low nibble) and value j + 16 (high).
ggml quantizes without importance by mapping the value of largest magnitude to -8
(quantize_row_q4_0_ref); with an importance vector it searches the scale (make_qx_quants) with
weights importance * sqrt(mean(x^2) + x^2) (quantize_row_q4_0_impl). We compute ggml's result and
our own search for the error itself, and keep per block whichever has the lower error.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import (
    Format, NibbleCodes, OneScale, metric_weights,
)
from nemoq.quant.formats.search import (
    Grid, full, groups_first, groups_last, make_qx_quants, refine_on_grid, signed_absmax,
)


class Q4_0(OneScale, NibbleCodes, Format, ggml_type=GGMLQuantizationType.Q4_0):
    nmax = 8  # signed levels -nmax .. nmax-1
    code_values = np.arange(-nmax, nmax, dtype=np.float32)  # code q holds level q - nmax
    field_bytes, code_bytes = slice(0, 2), slice(2, 18)
    # ours: the largest value mapped to level -nmax * factor; 12 factors spaced geometrically from
    # 0.85 to 2.5, written out because a library's exp/log (numpy's geomspace) rounds differently
    # on different CPUs and releases, and every bit of a target can change output bytes
    search_factors = np.array([
        0.85, 0.9375873764644297, 1.0342001041240614, 1.1407681910175516, 1.2583174769061407,
        1.3879795081550224, 1.5310024301617142, 1.688763002183515, 1.8627798502205128,
        2.0547280855282986, 2.2664554294803034, 2.5,
    ])

    def search_rows(self, x, importance=None):
        xt = groups_first(x, 32)  # (32, rows, blocks)
        wt = full(groups_first(metric_weights(x, importance), 32), xt.shape)
        targets = (self.nmax * self.search_factors).astype(np.float32)   # a float32 search, as ggml's
        d, _ = make_qx_quants(xt, self.nmax, wt, targets)
        d, idx = refine_on_grid(xt, wt, d, Grid(np.arange(-self.nmax, self.nmax), 0.5))
        return self.pack(d, idx - self.nmax)

    def ggml_rows(self, x, importance=None):
        xt = groups_first(x, 32)
        if importance is None:
            return self.pack(*self.ggml_ref(xt))
        sigma2 = np.cumsum(x * x, axis=-1)[:, -1] / x.shape[-1]  # summed in order, as ggml (np.sum is pairwise)
        qw = groups_first(importance[None, :], 32) * np.sqrt(sigma2[:, None] + xt * xt)
        return self.pack(*make_qx_quants(xt, self.nmax, qw))

    def ggml_ref(self, xt):
        """quantize_row_q4_0_ref: d = max / -8, q = min(15, (int)(x / d + 8.5))."""
        d = signed_absmax(xt) / np.float32(-self.nmax)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        q = np.trunc(xt * inv + np.float32(self.nmax + 0.5))
        return d, np.minimum(2 * self.nmax - 1, q) - self.nmax

    def pack(self, d, l):
        """d (rows, blocks), signed levels l (32, rows, blocks) -> (rows, blocks * type_size) bytes."""
        q = groups_last(l + self.nmax).astype(np.uint8).reshape(*d.shape, 32)
        out = np.concatenate([self.pack_fields(d), self.pack_codes(q)], axis=-1)
        return out.reshape(d.shape[0], -1)

    def dequantize_blocks(self, blocks):
        (d,) = self.fields(blocks)
        q = self.codes(blocks).astype(np.int8) - np.int8(self.nmax)  # code_values[codes], 2x faster
        return d[:, None] * q.astype(np.float32)
