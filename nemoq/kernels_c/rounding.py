"""The column loops of compensated rounding (round_on_grid.c) through ctypes: the codes of
nemoq.quant.compensate.round_on_grid and of refine's coordinate descent, rows in C instead of
columns in numpy (tests/test_compensate_fast.py pairs them)."""

from __future__ import annotations

import ctypes

import numpy as np

from nemoq.kernels_c.build import library

_P, _N = ctypes.c_void_p, ctypes.c_int64
_ARGS = [_P, _N, _P, _P, _N, _N, _P, _N, _P, _P, _N, _P, _P, _P, _P]
_DESCEND_ARGS = [_P, _P, _P, _P, _P, _P, _N, _N, _P, _N, _P, _P, _N, _P]


def available() -> bool:
    return library() is not None


def round_on_grid(w: np.ndarray, a: np.ndarray, b: np.ndarray, u: np.ndarray, levels: np.ndarray,
                  level_codes: np.ndarray, code_values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w: float64 (rows, bs), a view whose rows are contiguous (updated in place, as the numpy
    loop does); a, b: the grid (rows, bs); u: float64 (bs, bs), rows contiguous; levels and
    level_codes: Format.written_levels(); keep: the codes where a = 0.
    Returns the codes uint8 (rows, bs) and the scaled errors float64 (rows, bs)."""
    rows, bs = w.shape
    if w.dtype != np.float64 or w.strides[1] != 8 or u.dtype != np.float64 or u.strides[1] != 8:
        raise ValueError("round_on_grid: w and u must be float64 with contiguous rows")
    a, b = (np.ascontiguousarray(x, np.float32) for x in (a, b))
    levels, code_values = (np.ascontiguousarray(x, np.float32) for x in (levels, code_values))
    level_codes, keep = (np.ascontiguousarray(x, np.uint8) for x in (level_codes, keep))
    codes, err = np.empty((rows, bs), np.uint8), np.empty((rows, bs), np.float64)
    fn = library().nemoq_round_on_grid
    fn.argtypes, fn.restype = _ARGS, None
    fn(w.ctypes.data, w.strides[0] // 8, a.ctypes.data, b.ctypes.data, rows, bs, u.ctypes.data, u.strides[0] // 8,
       levels.ctypes.data, level_codes.ctypes.data, len(levels), code_values.ctypes.data, keep.ctypes.data,
       codes.ctypes.data, err.ctypes.data)
    return codes, err


def descend_codes(w: np.ndarray, d: np.ndarray, r: np.ndarray, a: np.ndarray, b: np.ndarray, codes: np.ndarray,
                  h: np.ndarray, levels: np.ndarray, level_codes: np.ndarray, code_values: np.ndarray) -> None:
    """One coordinate-descent pass over m columns: w, d = W - Q and r = D H float64 (rows, m),
    C-contiguous, d and r updated in place (r only where a later column reads it); a, b the grid
    and codes uint8 (rows, m), updated in place; h float64 (m, m) with contiguous rows: H's rows
    and columns of these columns."""
    rows, m = w.shape
    for x, dtype in ((w, np.float64), (d, np.float64), (r, np.float64), (codes, np.uint8)):
        if x.dtype != dtype or not x.flags.c_contiguous or x.shape != (rows, m):
            raise ValueError("descend_codes: w, d, r (float64) and codes (uint8) must be C-contiguous (rows, m)")
    if h.dtype != np.float64 or h.strides[1] != 8:
        raise ValueError("descend_codes: h must be float64 with contiguous rows")
    a, b = (np.ascontiguousarray(x, np.float32) for x in (a, b))
    levels, code_values = (np.ascontiguousarray(x, np.float32) for x in (levels, code_values))
    level_codes = np.ascontiguousarray(level_codes, np.uint8)
    fn = library().nemoq_descend_codes
    fn.argtypes, fn.restype = _DESCEND_ARGS, None
    fn(w.ctypes.data, d.ctypes.data, r.ctypes.data, a.ctypes.data, b.ctypes.data, codes.ctypes.data, rows, m,
       h.ctypes.data, h.strides[0] // 8, levels.ctypes.data, level_codes.ctypes.data, len(levels),
       code_values.ctypes.data)
