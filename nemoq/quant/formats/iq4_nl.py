"""IQ4_NL: blocks of 32 values, one f16 scale d and 32 4-bit indices into a fixed non-linear table.

value = d * KVALUES[q]. Layout (18 bytes) as Q4_0: d, then byte j holds index j (low nibble)
and index j + 16 (high nibble).
ggml (quantize_iq4_nl, ntry = 7) weights each value by x^2 without importance and by
importance * sqrt(2 mean(x^2) + x^2) with it, tries d = max / 127 and 15 scales that map the
largest value near -127, refits d by least squares and keeps the best by that weighted error.
We compute ggml's choice, search more scales for the error itself, and keep the better per block.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import (
    Format, NibbleCodes, OneScale, metric_weights,
)
from nemoq.quant.formats.search import (
    GROUP_MAX_EPS, Grid, divide, dot, full, groups_first, groups_last, refine_on_grid, signed_absmax,
)

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
GRID = Grid(KVALUES, 0.5)


def scale_search(xt, w, inverse_scales):
    """For each candidate id = f(max): nearest table entries of id * x and their least-squares d.

    The first target is taken unconditionally, later ones when their fit is better (as ggml).
    Returns (d, idx); blocks whose values are all ~0 get d = 0.
    """
    max_ = signed_absmax(xt)
    zero = np.abs(max_) < GROUP_MAX_EPS
    max_ = np.where(zero, np.float32(1), max_)
    w = full(w, xt.shape)
    best = d = None
    with np.errstate(divide="ignore", invalid="ignore"):
        for inverse_scale in inverse_scales:
            q = GRID(inverse_scale(max_) * xt)
            wq = w * q
            sumqx, sumq2 = dot(wq, xt), dot(wq, q)  # (w q) x, as ggml rounds it
            this_d = np.where(sumq2 > 0, sumqx / sumq2, np.float32(0))
            if best is None:
                d, best = this_d, this_d * sumqx
                continue
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            np.copyto(d, this_d, where=better)
            np.copyto(best, this_d * sumqx, where=better)
    d[zero] = 0
    return d, GRID.index(xt * divide(np.float32(1), d))


class IQ4_NL(OneScale, NibbleCodes, Format, ggml_type=GGMLQuantizationType.IQ4_NL):
    code_values = KVALUES
    field_bytes, code_bytes = slice(0, 2), slice(2, 18)
    # ggml: d = max / 127 first, then id = (itry - 127) / max for itry in -7..7
    ggml_scales = [lambda m: 1 / (m / 127)] + [lambda m, t=t: (t - 127) / m for t in range(-7, 8)]
    # ours: the largest value mapped to either end of the table, times these factors (8 spaced
    # geometrically from 0.85 to 2.5, written out for the same bytes on every machine: see Q4_0)
    search_factors = np.array([
        0.85, 0.9916319451401975, 1.1568634289676842, 1.3496267439162157, 1.5745094038621978,
        1.8368633209334164, 2.1429321739928078, 2.5,
    ])
    # Without importance only the first three ever won on real weights (clipping the largest
    # value costs too much when every value weighs the same), so the others are not tried.
    plain_factors = 3

    def targets(self, weighted: bool = True) -> list[np.float32]:
        """Our search's targets t (inverse scales t / max), float32 so that the search stays in
        float32 as ggml's does (float64 targets would promote it, and halve the C kernel's lanes)."""
        factors = self.search_factors if weighted else self.search_factors[:self.plain_factors]
        return [np.float32(t * f) for t in (KVALUES[0], KVALUES[-1]) for f in factors]

    def search_rows(self, x, importance=None):
        xt = groups_first(x, 32)
        wt = full(groups_first(metric_weights(x, importance), 32), xt.shape)
        targets = self.targets(weighted=importance is not None)
        d, _ = scale_search(xt, wt, [lambda m, t=t: t / m for t in targets])
        return self.pack(*refine_on_grid(xt, wt, d, GRID))

    def ggml_rows(self, x, importance=None):
        xt = groups_first(x, 32)
        if importance is None:
            ggml_w = xt * xt
        else:
            sigma2 = 2 * dot(xt, xt) / 32
            ggml_w = groups_first(importance[None, :], 32) * np.sqrt(sigma2 + xt * xt)
        return self.pack(*scale_search(xt, ggml_w, self.ggml_scales))

    def pack(self, d, idx):
        q = groups_last(idx).astype(np.uint8).reshape(*d.shape, 32)
        out = np.concatenate([self.pack_fields(d), self.pack_codes(q)], axis=-1)
        return out.reshape(d.shape[0], -1)

    def dequantize_blocks(self, blocks):
        (d,) = self.fields(blocks)
        return d[:, None] * KVALUES[self.codes(blocks)]
