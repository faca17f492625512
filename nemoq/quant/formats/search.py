"""ggml's scale searches (ggml-quants.c), vectorised over groups, and the refinements we add.

Layout: the values of a group run down axis 0, x has shape (n, *groups) and x[:, g] is group g;
per-group results have shape `groups`. (With the short within-group axis first, numpy's
broadcasts and reductions run over long contiguous rows, several times faster than groups along
the last axis.) Weights broadcast against x. Arithmetic stays in float32 as in the C code, each
product rounded and each sum added in ggml's order, so the ports choose exactly what ggml chooses,
near-ties included.
"""

from __future__ import annotations

import numpy as np

GROUP_MAX_EPS = np.float32(1e-15)


def groups_first(x: np.ndarray, *sizes: int) -> np.ndarray:
    """(..., k * n) -> (n, ..., k): consecutive runs of n values become columns.

    With sizes (m, n) runs of m groups of n values (k-quant super-blocks) become (n, m, ..., k).
    """
    y = x.reshape(*x.shape[:-1], -1, *sizes)
    lead = y.ndim - len(sizes)
    return np.ascontiguousarray(y.transpose(*range(y.ndim - 1, lead - 1, -1), *range(lead)))


def groups_last(L: np.ndarray, depth: int = 1) -> np.ndarray:
    """Inverse of groups_first with `depth` sizes: (n, [m,] ..., k) -> (..., k * [m *] n)."""
    y = L.transpose(*range(depth, L.ndim), *range(depth - 1, -1, -1))
    return y.reshape(*y.shape[:-depth - 1], -1)


def full(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """w broadcast to shape as a contiguous array (per-column weights repeat for every row), so the
    many elementwise passes of a search run over long contiguous rows."""
    return np.ascontiguousarray(np.broadcast_to(w, shape))


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (its 1.5 * 2^23 trick), kept as float."""
    return np.rint(v)


def round_clip(t: np.ndarray, lo, hi) -> np.ndarray:
    """nearest_int, then clamp to [lo, hi]; in place."""
    np.rint(t, out=t)
    return np.clip(t, lo, hi, out=t)


def total(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 (each group), added in order from +0 in a's dtype: a[0] + a[1] + ...

    Spelt out because numpy's own orders depend on the layout (a reduction switches to pairwise
    summation when the other axes have length 1) and einsum fuses multiply-adds on some
    platforms (NEON, FMA builds); the C kernels add in exactly this order on every platform.
    """
    acc = np.zeros_like(a[0])
    for v in a:
        acc += v
    return acc


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum over each group of a * b: the products rounded, then added in order (see total)."""
    return total(a * b)


def divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b where b != 0, else 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / b, 0).astype(np.float32)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each group, with its sign (the first one on ties); +0 for a
    group of zeros, as ggml's running max starts from +0 (so Q4_0's d = max / -8 is -0 there)."""
    m = np.take_along_axis(x, np.abs(x).argmax(axis=0)[None], axis=0)[0]
    return np.where(m == 0, np.zeros_like(m), m)


def running_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each group's min and max as ggml's loops find them (`if (x[i] < min) min = x[i]`): of equal
    values the first stays, so a group's zero minimum keeps its first zero's sign (Q5_1 stores it)."""
    mn, mx = x[0].copy(), x[0].copy()
    for v in x[1:]:
        np.copyto(mn, v, where=v < mn)
        np.copyto(mx, v, where=v > mx)
    return mn, mx


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray, targets=None) -> tuple[np.ndarray, np.ndarray]:
    """Levels l in [-nmax, nmax-1] and a scale d with x ~ d * l (ggml's make_qx_quants with rmse_type 1).

    For each target t, maps the largest value to level -t (iscale = -t / max), rounds, fits d by
    weighted least squares and keeps the target with the largest sum(w x l)^2 / sum(w l^2), i.e.
    the lowest weighted error. ggml's targets are nmax, then nmax + 0.1 * step for step in +-1..9.
    """
    if targets is None:
        targets = [nmax + np.float32(0.1) * step for step in (0, *range(-9, 0), *range(1, 10))]
    w = full(w, x.shape)
    wx = w * x
    max_ = signed_absmax(x)
    zero = np.abs(max_) < GROUP_MAX_EPS
    max_ = np.where(zero, np.float32(1), max_)
    best = scale = L = None
    with np.errstate(divide="ignore", invalid="ignore"):
        for target in targets:
            l = round_clip((-target / max_) * x, -nmax, nmax - 1)
            sumlx, suml2 = dot(wx, l), dot(w * l, l)
            this_scale = np.where(suml2 > 0, sumlx / suml2, np.float32(0))
            if best is None:  # the first is taken unconditionally, as in ggml
                L, scale, best = l, this_scale, this_scale * sumlx
                continue
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            np.copyto(L, l, where=better)
            np.copyto(scale, this_scale, where=better)
            np.copyto(best, this_scale * sumlx, where=better)
    scale[zero] = 0
    L[:, zero] = -nmax
    return scale, L


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Levels L in [0, nmax], scale and min with x ~ scale * L - min (ggml's make_qkx2/qkx3_quants).

    Starts from the full range [min(x, 0), max(x)], then tries iscale = (nmax + rmin + rdelta * step)
    / range for step in 0..nstep, refitting scale and min by weighted least squares (keeping
    min <= 0), and keeps whichever gives the lowest weighted squared error. Returns (scale, -min, L).
    """
    w = full(w, x.shape)
    mn, mx = running_min_max(x)
    mn[mn > 0] = 0
    flat = mx <= mn
    sum_w, sum_x = total(w), dot(w, x)

    def levels(iscale, mn):
        t = x - mn
        t *= iscale
        return round_clip(t, 0, nmax)

    def error(scale, min_, l):
        diff = scale * l
        diff += min_
        diff -= x
        diff *= diff
        return dot(w, diff)  # w * diff^2, as ggml rounds it

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = nmax / np.where(flat, np.float32(1), mx - mn)
        scale = 1 / iscale
        L = levels(iscale, mn)
        best = error(scale, mn, L)
        for step in range(nstep + 1):
            # as in ggml, the range starts at the best min found so far
            rng = np.where(flat, np.float32(1), mx - mn)
            l = levels((np.float32(rmin) + np.float32(rdelta) * step + nmax) / rng, mn)
            wl = w * l
            sum_l, sum_l2, sum_xl = total(wl), dot(wl, l), dot(wl, x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            np.copyto(this_scale, sum_xl / sum_l2, where=positive)
            this_min[positive] = 0
            cur = error(this_scale, this_min, l)
            better = (D > 0) & (cur < best)
            np.copyto(L, l, where=better)
            np.copyto(best, cur, where=better)
            np.copyto(scale, this_scale, where=better)
            np.copyto(mn, this_min, where=better)
    scale[flat] = 0
    L[:, flat] = 0
    return scale, -mn, L


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels L in [0, nmax] and a scale for non-negative x (ggml's make_qp_quants).

    Stores the 8 group scales (or mins) of a k-quant super-block as 6-bit integers times one
    scale: a search over iscale = (nmax + 0.1 * step) / max, then up to five passes of coordinate
    descent that move one level at a time while the least-squares fit improves.
    """
    w = np.broadcast_to(w, x.shape)
    max_ = x.max(axis=0)
    zero = max_ < GROUP_MAX_EPS
    max_ = np.where(zero, np.float32(1), max_)

    def mse(scale, l):
        diff = x - scale * l
        return dot(w * diff, diff)

    iscale = nmax / max_
    best = mse(1 / iscale, nearest_int(iscale * x))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_step = (np.float32(0.1) * step + nmax) / max_
        err = mse(1 / iscale_step, np.minimum(nmax, nearest_int(iscale_step * x)))
        better = err < best
        np.copyto(best, err, where=better)
        np.copyto(iscale, iscale_step, where=better)

    L = np.minimum(nmax, nearest_int(iscale * x))
    sumlx, suml2 = dot(w * x, L), dot(w * L, L)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # large weights overflow as in ggml
        for _ in range(5):  # ggml stops early once a pass changes nothing; further passes would not either
            for i in range(x.shape[0]):
                wi, xi, li = w[i], x[i], L[i]  # li is a view: updating it updates L
                slx_rest = sumlx - wi * xi * li
                sl2_rest = suml2 - wi * li * li
                new_l = np.minimum(nmax, nearest_int(xi * sl2_rest / slx_rest))
                slx = slx_rest + wi * xi * new_l
                sl2 = sl2_rest + wi * new_l * new_l
                take = (slx_rest > 0) & (sl2_rest > 0) & (new_l != li)
                take &= slx * slx * suml2 > sumlx * sumlx * sl2
                np.copyto(li, new_l, where=take)
                np.copyto(sumlx, slx, where=take)
                np.copyto(suml2, sl2, where=take)
    scale = np.where(zero, np.float32(0), divide(sumlx, suml2))
    L[:, zero] = 0
    return scale, L


class Grid:
    """A sorted table of levels with a constant-time nearest lookup.

    All midpoints between neighbours must be multiples of `step`, so the nearest level is
    constant on each cell [k step, (k + 1) step) and a table gives it. Ties go to the larger
    level (as ggml's best_index_int8) or, with ties_down, to the smaller (as best_index_mxfp4).
    """

    def __init__(self, values, step: float):
        self.values = np.asarray(values, dtype=np.float32)
        self.step = np.float32(step)
        mid = (self.values[1:] + self.values[:-1]) / 2
        assert np.all(mid / self.step == np.round(mid / self.step)), "midpoints must lie on the step"
        self.lo = int(np.floor(self.values[0] / self.step)) - 1
        hi = int(np.ceil(self.values[-1] / self.step)) + 1
        self.lut = np.searchsorted(mid, np.arange(self.lo, hi + 1) * self.step, side="right").astype(np.uint8)
        assert hi - self.lo < 2**16

    def index(self, v: np.ndarray, ties_down: bool = False) -> np.ndarray:
        k = v * (1 / self.step)
        if ties_down:  # cells (k step, (k + 1) step]
            np.ceil(k, out=k)
            k -= self.lo + 1
        else:
            np.floor(k, out=k)
            k -= self.lo
        np.clip(k, 0, len(self.lut) - 1, out=k)
        return self.lut.take(k.astype(np.uint16))

    def __call__(self, v: np.ndarray) -> np.ndarray:
        """The nearest level itself."""
        return self.values[self.index(v)]


def refine_on_grid(x: np.ndarray, w: np.ndarray, d: np.ndarray, grid: Grid, iters: int = 2):
    """Improve a scale d for x ~ d * grid.values[idx]; returns (half-rounded d, idx).

    Alternates nearest grid points for a fixed d with the weighted least-squares d for fixed
    points (neither step can raise the error), then rounds d to half precision as it will be
    stored and picks the nearest points again for that d.
    """
    w = full(w, x.shape)
    for _ in range(iters):
        q = grid(x * divide(np.float32(1), d))
        fit = divide(dot(w * x, q), dot(w * q, q))
        d = np.where(fit != 0, fit, d)
    d = d.astype(np.float16).astype(np.float32)
    return d, grid.index(x * divide(np.float32(1), d))
