"""IQ4_NL: blocks of 32 values, one f16 scale d and 32 4-bit indices into a fixed non-linear table.

value = d * KVALUES[q]. Layout (18 bytes) as Q4_0: d, then byte j holds index j (low nibble)
and index j + 16 (high nibble).
ggml (quantize_iq4_nl, ntry = 7) weights each value by x^2 without importance and by
importance * sqrt(2 mean(x^2) + x^2) with it, tries 16 scales around max / 127 and max / -127
with a least-squares refit, and keeps the best by that weighted error. We compute ggml's
choice, search more scales for the weighted error itself, and keep the better per block.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import Format, f16_bytes, metric_weights, pack_nibbles, read_f16, unpack_nibbles
from nemoq.quant.formats.search import GROUP_MAX_EPS, Grid, divide, refine_on_grid, signed_absmax, wsum

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
GRID = Grid(KVALUES, 0.5)


def scale_search(xb, w, inverse_scales):
    """For each candidate inverse scale (per block): nearest table entries, least-squares d; keep the best.

    Returns (d, idx). Blocks whose values are all ~0 get d = 0.
    """
    max_ = signed_absmax(xb)
    zero = np.abs(max_) < GROUP_MAX_EPS
    max_ = np.where(zero, np.float32(1), max_)
    best = d = None
    for make_id in inverse_scales:
        q = GRID(make_id(max_)[..., None] * xb)
        sumqx, sumq2 = wsum(w, q, xb), wsum(w, q, q)
        if best is None:  # the first candidate is taken unconditionally, as in ggml
            d, best = divide(sumqx, sumq2), divide(sumqx, sumq2) * sumqx
            continue
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, divide(sumqx, sumq2), d)
        best = np.where(better, d * sumqx, best)
    d = np.where(zero, np.float32(0), d)
    return d, GRID.index(xb * divide(np.float32(1), d)[..., None])


class IQ4_NL(Format, ggml_type=GGMLQuantizationType.IQ4_NL):
    def quantize_rows(self, x, importance=None):
        xb = x.reshape(x.shape[0], -1, 32)
        w = metric_weights(x, importance).reshape(1, -1, 32)
        if importance is None:
            ggml_w = xb * xb
        else:
            sigma2 = 2 * (xb * xb).sum(axis=-1, keepdims=True) / 32
            ggml_w = w * np.sqrt(sigma2 + xb * xb)
        # ggml: d = max / 127 first, then id = (itry - 127) / max for itry in -7..7
        ggml_ids = [lambda m: 1 / (m / -KVALUES[0])] + [lambda m, t=t: (t + KVALUES[0]) / m for t in range(-7, 8)]
        candidates = [self.pack(*scale_search(xb, ggml_w, ggml_ids))]

        ours = [lambda m, t=t: (t + KVALUES[0]) / m for t in range(-12, 13)]
        ours += [lambda m, t=t: (KVALUES[-1] + t) / m for t in range(-12, 13)]
        d, _ = scale_search(xb, w, ours)
        candidates.append(self.pack(*refine_on_grid(xb, w, d, GRID)))
        return self.best_of(x, w, *candidates)

    def pack(self, d, idx):
        q = idx.astype(np.uint8)
        out = np.concatenate([f16_bytes(d), pack_nibbles(q[..., :16], q[..., 16:])], axis=-1)
        return out.reshape(d.shape[0], -1)

    def dequantize_blocks(self, blocks):
        d = read_f16(blocks[:, :2])
        lo, hi = unpack_nibbles(blocks[:, 2:])
        return d[:, None] * KVALUES[np.concatenate([lo, hi], axis=-1)]
