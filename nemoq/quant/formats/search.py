"""ggml's scale searches (ggml-quants.c), vectorised over groups, plus the refinements we add.

Every function works on groups along the last axis: x (..., n), weights broadcastable to x;
per-group results have shape (...). Arithmetic stays in float32 as in the C code, so the ports
pick what ggml picks except where the C sums round differently (near-ties).
"""

from __future__ import annotations

import numpy as np

GROUP_MAX_EPS = np.float32(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (its 1.5 * 2^23 trick), kept as float."""
    return np.rint(v)


def wsum(w: np.ndarray, a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """sum_i w_i a_i (b_i) over the last axis."""
    wa = np.broadcast_to(w, a.shape) * a
    return wa.sum(axis=-1) if b is None else np.einsum("...i,...i->...", wa, b)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each group, with its sign (the first one on ties)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]


def divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b where b != 0, else 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0).astype(np.float32)


def round_clip(t: np.ndarray, lo, hi) -> np.ndarray:
    """nearest_int then clamp to [lo, hi], in place."""
    np.rint(t, out=t)
    np.maximum(t, lo, out=t)
    return np.minimum(t, hi, out=t)


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray, steps=range(-9, 10)) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric levels l in [-nmax, nmax-1] and a scale d with x ~ d * l (ggml's make_qx_quants, rmse_type 1).

    Tries iscale = -(nmax + 0.1 * step) / max for each step, rounds, fits d by weighted least
    squares and keeps the step with the largest sum(w x l)^2 / sum(w l^2), i.e. the lowest error.
    """
    w = np.broadcast_to(w, x.shape)
    wx = w * x
    max_ = signed_absmax(x)
    zero = np.abs(max_) < GROUP_MAX_EPS
    max_ = np.where(zero, np.float32(1), max_)[..., None]
    best = scale = L = None
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in (0, *[s for s in steps if s != 0]):
            l = round_clip((-(nmax + np.float32(0.1) * step) / max_) * x, -nmax, nmax - 1)
            sumlx = np.einsum("...i,...i->...", wx, l)
            suml2 = np.einsum("...i,...i->...", w * l, l)
            this_scale = np.where(suml2 > 0, sumlx / suml2, np.float32(0))
            if best is None:  # the first (step 0) is taken unconditionally, as in ggml
                L, scale, best = l, this_scale, this_scale * sumlx
                continue
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[..., None], l, L)
            scale = np.where(better, this_scale, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero, 0, scale).astype(np.float32), np.where(zero[..., None], -nmax, L)


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Levels L in [0, nmax], scale and min with x ~ scale * L - min (ggml's make_qkx2/qkx3_quants).

    Starts from the full range [min(x, 0), max(x)], then tries iscale = (nmax + rmin + rdelta * step)
    / range for step in 0..nstep, refitting scale and min by weighted least squares (min <= 0 kept),
    and keeps whichever gives the lowest weighted squared error. Returns (scale, -min, L).
    The error of a candidate comes from its weighted sums (in float64) rather than a pass over x.
    """
    w = np.broadcast_to(w, x.shape)
    mn = np.minimum(x.min(axis=-1), 0)
    mx = x.max(axis=-1)
    flat = mx <= mn
    sums = [s.astype(np.float64) for s in (w.sum(axis=-1), wsum(w, x), wsum(w, x, x))]

    def error(scale, min_, sum_l, sum_l2, sum_xl):
        """sum w (scale * l + min - x)^2, expanded."""
        s, m = scale.astype(np.float64), min_.astype(np.float64)
        sum_w, sum_x, sum_x2 = sums
        return s * s * sum_l2 + 2 * s * m * sum_l + m * m * sum_w - 2 * s * sum_xl - 2 * m * sum_x + sum_x2

    def levels(iscale, mn):
        return round_clip((x - mn[..., None]) * iscale[..., None], 0, nmax)

    def weighted_sums(l):
        wl = w * l
        return [s.astype(np.float64) for s in (wl.sum(axis=-1), np.einsum("...i,...i->...", wl, l),
                                               np.einsum("...i,...i->...", wl, x))]

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = nmax / np.where(flat, np.float32(1), mx - mn)
        scale = 1 / iscale
        L = levels(iscale, mn)
        best = error(scale, mn, *weighted_sums(L))
        for step in range(nstep + 1):
            # as in ggml, the range starts at the best min found so far
            iscale = (np.float32(rmin) + np.float32(rdelta) * step + nmax) / np.where(flat, np.float32(1), mx - mn)
            l = levels(iscale, mn)
            sum_l, sum_l2, sum_xl = weighted_sums(l)
            sum_w, sum_x, _ = sums
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = ((sum_w * sum_xl - sum_x * sum_l) / D).astype(np.float32)
            this_min = ((sum_l2 * sum_x - sum_l * sum_xl) / D).astype(np.float32)
            positive = this_min > 0
            this_scale = np.where(positive, (sum_xl / sum_l2).astype(np.float32), this_scale)
            this_min = np.where(positive, np.float32(0), this_min)
            cur = error(this_scale, this_min, sum_l, sum_l2, sum_xl)
            better = (D > 0) & (cur < best)
            L = np.where(better[..., None], l, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    scale = np.where(flat, np.float32(0), scale)
    return scale, -mn, np.where(flat[..., None], 0, L)


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels L in [0, nmax] and a scale for non-negative x (ggml's make_qp_quants).

    Used to store the 8 sub-block scales (or mins) of a k-quant super-block as 6-bit integers
    times one half-precision scale: a search over iscale = (nmax + 0.1 * step) / max, then up to
    five passes of coordinate descent that move one level at a time while the fit improves.
    """
    w = np.broadcast_to(w, x.shape)
    max_ = x.max(axis=-1)
    zero = max_ < GROUP_MAX_EPS
    max_ = np.where(zero, np.float32(1), max_)

    def mse(scale, l):
        diff = x - scale[..., None] * l
        return wsum(w, diff, diff)

    iscale = nmax / max_
    best = mse(1 / iscale, nearest_int(iscale[..., None] * x))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_step = (np.float32(0.1) * step + nmax) / max_
        err = mse(1 / iscale_step, np.minimum(nmax, nearest_int(iscale_step[..., None] * x)))
        better = err < best
        best = np.where(better, err, best)
        iscale = np.where(better, iscale_step, iscale)

    L = np.minimum(nmax, nearest_int(iscale[..., None] * x))
    sumlx, suml2 = wsum(w, x, L), wsum(w, L, L)
    for _ in range(5):
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i], x[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(nmax, nearest_int(divide(xi * sl2, slx)))
            slx = slx + wi * xi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[..., i] = np.where(take, new_l, li)
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(zero, np.float32(0), divide(sumlx, suml2))
    return scale, np.where(zero[..., None], 0, L)


class Grid:
    """A sorted table of levels with a constant-time nearest lookup (ties go to the larger level,
    as in ggml's best_index_int8). All midpoints between neighbours must be multiples of `step`,
    so the nearest level is constant on each cell [k step, (k + 1) step) and a table gives it."""

    def __init__(self, values, step: float):
        self.values = np.asarray(values, dtype=np.float32)
        self.step = np.float32(step)
        mid = (self.values[1:] + self.values[:-1]) / 2
        assert np.all(mid / self.step == np.round(mid / self.step)), "midpoints must lie on the step"
        self.lo = int(np.floor(self.values[0] / self.step)) - 1
        hi = int(np.ceil(self.values[-1] / self.step)) + 1
        self.lut = np.searchsorted(mid, np.arange(self.lo, hi + 1) * self.step, side="right")

    def index(self, v: np.ndarray) -> np.ndarray:
        k = np.clip(np.floor(v * (1 / self.step)), self.lo, self.lo + len(self.lut) - 1)
        return self.lut[k.astype(np.intp) - self.lo]

    def __call__(self, v: np.ndarray) -> np.ndarray:
        """The nearest level itself."""
        return self.values[self.index(v)]


def refine_on_grid(x: np.ndarray, w: np.ndarray, d: np.ndarray, grid: Grid, iters: int = 2):
    """Improve a scale d for x ~ d * grid.values[idx]; returns (half-rounded d, idx).

    Alternates nearest grid points for a fixed d with the weighted least-squares d for fixed
    points (neither step can raise the error), then rounds d to half precision as it will be
    stored and picks the nearest points again for that d.
    """
    for _ in range(iters):
        q = grid(divide(x, d[..., None]))
        fit = divide(wsum(w, x, q), wsum(w, q, q))
        d = np.where(fit != 0, fit, d)
    d = d.astype(np.float16).astype(np.float32)
    return d, grid.index(divide(x, d[..., None]))
