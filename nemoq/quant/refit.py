"""Step 3 of error-compensating rounding (compensate.py): a block's scale fields refitted for
its codes under the block's true error metric.

A block's error, given that later columns compensate it, is ||(w_b - q_b) v||^2 per row with
v v^T the block's share of H (compensate.sweep: v = U_bb^-1; compensate.refine: the Cholesky
factor of H_bb, towards a shifted target). For the linear formats q_b is linear in the scale
parameters, so least squares gives them; stored fields are rounded (f16, 6-bit or int8
integers), so each candidate is kept only in the blocks where it lowers that error. FP4 scales
are codes: a search over neighbouring codes instead.
"""

from __future__ import annotations

import numpy as np

from nemoq.quant.formats import Format


def values(f: Format, blocks: np.ndarray) -> np.ndarray:
    """The dequantized values of blocks (rows, type_size), from their grid (as dequantize)."""
    a, b = f.grid(blocks)
    return (a * f.code_values[f.codes(blocks)] + b).astype(np.float64)


def block_error(f: Format, blocks, w_b, v) -> np.ndarray:
    """Per row, ||(w_b - q) v||^2: what the block adds to the output error."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (((w_b - values(f, blocks)) @ v) ** 2).sum(axis=1)


def keep_better(f: Format, blocks, candidate, w_b, v) -> np.ndarray:
    """Per row, whichever of blocks and candidate has the lower block error (blocks on ties)."""
    better = block_error(f, candidate, w_b, v) < block_error(f, blocks, w_b, v)
    return np.where(better[:, None], candidate, blocks)


def least_squares(target: np.ndarray, basis: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per row, coefficients c (rows, p) minimising ||(target - c @ basis) v||^2.

    target (rows, bs), basis (rows, p, bs). A small ridge keeps rows with an empty basis vector
    (a group whose codes are all zero) solvable; their coefficient comes out 0.
    """
    rows, p, bs = basis.shape
    tv = target @ v
    bv = (basis.reshape(-1, bs) @ v).reshape(rows, p, bs)
    g = bv @ bv.transpose(0, 2, 1)
    r = (bv @ tv[..., None])[..., 0]
    ridge = 1e-12 * np.trace(g, axis1=1, axis2=2)[:, None, None] / p + 1e-300
    return np.linalg.solve(g + ridge * np.eye(p), r[..., None])[..., 0]


def group_masks(groups: int, size: int) -> np.ndarray:
    """(groups, groups * size): row g is 1 on the values of group g."""
    return np.kron(np.eye(groups), np.ones(size))


def refit_scales(f: Format, blocks, w_b, v) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return REFITS[f.name](f, blocks, w_b, v)


def refit_d(f, blocks, w_b, v):
    """Formats with one scale per block, value = d * level (Q8_0, Q5_0, Q4_0, IQ4_NL)."""
    level = f.code_values[f.codes(blocks)][:, None, :].astype(np.float64)
    (d,) = least_squares(w_b, level, v).T
    return keep_better(f, blocks, f.with_fields(blocks, d), w_b, v)


def refit_dm(f, blocks, w_b, v):
    """Q5_1: value = d * level + m: d and m by least squares."""
    level = f.code_values[f.codes(blocks)].astype(np.float64)
    d, m = least_squares(w_b, np.stack([level, np.ones_like(level)], axis=1), v).T
    return keep_better(f, blocks, f.with_fields(blocks, d, m), w_b, v)


def refit_q6_k(f, blocks, w_b, v):
    """value = d * sc[g] * level: the 16 group scales s_g = d * sc[g] by least squares, stored as
    int8 multiples of d; then d itself for those integers."""
    d, sc = f.fields(blocks)
    level = f.code_values[f.codes(blocks)].astype(np.float64)
    s = least_squares(w_b, group_masks(16, 16)[None] * level[:, None, :], v)
    sc_new = np.clip(np.rint(s / d[:, None]), -128, 127)
    sc_new = np.where(np.isfinite(sc_new), sc_new, sc)
    blocks = keep_better(f, blocks, f.with_fields(blocks, d, sc_new), w_b, v)
    d, sc = f.fields(blocks)
    (d_new,) = least_squares(w_b, (level * np.repeat(sc.astype(np.float64), 16, axis=1))[:, None, :], v).T
    return keep_better(f, blocks, f.with_fields(blocks, d_new, sc), w_b, v)


def refit_k_quant(f, blocks, w_b, v):
    """Q4_K, Q5_K: value = d * sc[g] * level - dmin * m[g]. The 8 group scales and 8 group mins by
    least squares, stored as 6-bit multiples of d and dmin; then d and dmin for those integers."""
    d, dmin, sc, m = f.fields(blocks)
    level = f.code_values[f.codes(blocks)].astype(np.float64)
    mask = group_masks(8, 32)
    mins = np.broadcast_to(-mask, (len(level), 8, 256))
    basis = np.concatenate([mask[None] * level[:, None, :], mins], axis=1)
    c = least_squares(w_b, basis, v)
    sc_new = np.clip(np.rint(c[:, :8] / d[:, None]), 0, 63)
    m_new = np.clip(np.rint(c[:, 8:] / dmin[:, None]), 0, 63)
    sc_new, m_new = np.where(np.isfinite(sc_new), sc_new, sc), np.where(np.isfinite(m_new), m_new, m)
    blocks = keep_better(f, blocks, f.with_fields(blocks, d, dmin, sc_new, m_new), w_b, v)
    d, dmin, sc, m = f.fields(blocks)
    scaled = level * np.repeat(sc.astype(np.float64), 32, axis=1)
    offset = -np.repeat(m.astype(np.float64), 32, axis=1)
    d_new, dmin_new = least_squares(w_b, np.stack([scaled, offset], axis=1), v).T
    return keep_better(f, blocks, f.with_fields(blocks, d_new, dmin_new, sc, m), w_b, v)


def search_mxfp4(f, blocks, w_b, v):
    """E8M0 is a power of two: try the exponents next to the chosen one for the same codes."""
    for step in (-1, 1):
        (e,) = f.fields(blocks)
        candidate = f.with_fields(blocks, np.clip(e.astype(np.int64) + step, 0, 254))
        blocks = keep_better(f, blocks, candidate, w_b, v)
    return blocks


def search_nvfp4(f, blocks, w_b, v):
    """Each group's UE4M3 scale code and its neighbours (codes are ordered like their values),
    one group at a time, for the same E2M1 codes."""
    for g in range(4):
        for step in (-1, 1):
            (code,) = f.fields(blocks)
            code = code.astype(np.int64)
            code[:, g] = np.clip(code[:, g] + step, 1, 0x7E)
            blocks = keep_better(f, blocks, f.with_fields(blocks, code), w_b, v)
    return blocks


REFITS = {
    "q8_0": refit_d, "q5_0": refit_d, "q4_0": refit_d, "iq4_nl": refit_d, "q5_1": refit_dm,
    "q4_k": refit_k_quant, "q5_k": refit_k_quant, "q6_k": refit_q6_k,
    "mxfp4": search_mxfp4, "nvfp4": search_nvfp4,
}
