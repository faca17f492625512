"""The fast path of compensate.refine: coordinate descent on the codes after the sweep.

compensate.refine moves each column, in turn, to the code nearest its best value given all the
others, which needs R = D H' (D = W - Q, H' the damped H) kept current as codes move, then
refits every block's scales with the other blocks fixed. Here both go by batches of BATCH
columns, left-looking: a batch's columns of D H' come from one product with the current D at
the batch's start, the batch's own columns then move in C (kernels_c.rounding.descend_codes) or
numpy, in float64. The same codes as the reference, up to float rounding
(tests/test_compensate_fast.py).

D H' comes from a metric: H' itself (n x n on the device), or, for an expert with fewer tokens
than half its columns, the tokens X (H' = X^T X + diag(shift)) through S = D X^T (rows,
tokens): a pass then costs products of rows x tokens x n instead of rows x n x n.
"""

from __future__ import annotations

import numpy as np
import torch

from nemoq.kernels_c import rounding
from nemoq.quant import compensate as ref
from nemoq.quant.formats import Format

BATCH = 128   # columns per product (GPTQ's lazy batch; a k-quant's 256 where larger), the sweep's too


def host(t: torch.Tensor) -> np.ndarray:
    """A device tensor as a float64 C-contiguous numpy array of its own."""
    return np.array(t.to("cpu", torch.float64).numpy(), order="C")


class DenseMetric:
    """D H' through H' (n, n) on the device."""

    def __init__(self, hd: torch.Tensor):
        self.hd = hd

    def start(self, d: np.ndarray) -> None:
        self.d = torch.from_numpy(d).to(self.hd.device, self.hd.dtype, copy=True)

    def columns(self, K: slice) -> np.ndarray:
        """(D H')[:, K] for the current D."""
        return host(self.d @ self.hd[:, K])

    def block(self, K: slice) -> np.ndarray:
        return host(self.hd[K, K])

    def update(self, K: slice, d_k: np.ndarray) -> None:
        self.d[:, K] = torch.from_numpy(d_k).to(self.d.device, self.d.dtype)


class TokenMetric:
    """D H' with H' = X^T X + diag(shift), through S = D X^T: x (tokens, n) on the device."""

    def __init__(self, x: torch.Tensor, shift: torch.Tensor):
        self.x, self.shift = x, shift

    def start(self, d: np.ndarray) -> None:
        self.d = torch.from_numpy(d).to(self.x.device, self.x.dtype, copy=True)   # not a view of refine's d
        self.s = self.d @ self.x.T

    def columns(self, K: slice) -> np.ndarray:
        return host(self.s @ self.x[:, K] + self.d[:, K] * self.shift[K])

    def block(self, K: slice) -> np.ndarray:
        return host(self.x[:, K].T @ self.x[:, K] + torch.diag(self.shift[K]))

    def update(self, K: slice, d_k: np.ndarray) -> None:
        d_k = torch.from_numpy(d_k).to(self.d.device, self.d.dtype)
        self.s += (d_k - self.d[:, K]) @ self.x[:, K].T
        self.d[:, K] = d_k


def refine(f: Format, w: np.ndarray, blocks: np.ndarray, metric, passes: int, *, refit: bool = True) -> np.ndarray:
    """compensate.refine on blocks (rows, n / block_size * type_size) of w (rows, n)."""
    rows, n = w.shape
    bs, step = f.block_size, max(BATCH, f.block_size)
    w = w.astype(np.float64)
    blocks = blocks.reshape(rows, n // bs, f.type_size).copy()
    levels, level_codes = f.written_levels()
    for _ in range(passes):
        a, b = (x.reshape(rows, n) for x in f.grid(blocks.reshape(-1, f.type_size)))
        codes = f.codes(blocks.reshape(-1, f.type_size)).reshape(rows, n)
        d = w - (a * f.code_values[codes] + b).astype(np.float64)
        metric.start(d)
        for k0 in range(0, n, step):
            K = slice(k0, min(k0 + step, n))
            r_k, h_k = metric.columns(K), metric.block(K)
            d_k, codes_k = np.ascontiguousarray(d[:, K]), np.ascontiguousarray(codes[:, K])
            descend(f, np.ascontiguousarray(w[:, K]), d_k, r_k, a[:, K], b[:, K], codes_k, h_k, levels, level_codes)
            d[:, K], codes[:, K] = d_k, codes_k
            metric.update(K, d_k)
        blocks = f.with_codes(blocks.reshape(-1, f.type_size), codes.reshape(-1, bs)).reshape(rows, n // bs, -1)
        if refit:
            refit_in_place(f, w, blocks, metric, d)
    return blocks.reshape(rows, -1)


def descend(f: Format, w, d, r, a, b, codes, h, levels, level_codes) -> None:
    """The coordinate descent over one batch's columns, in place on d, r and codes: C where the
    kernels are built, else compensate.refine's loop restricted to the batch."""
    if rounding.available():
        rounding.descend_codes(w, d, r, a, b, codes, h, levels, level_codes, f.code_values)
        return
    ref.descend_columns(f, w, d, r, a, b, codes, h, levels, level_codes)


def refit_in_place(f: Format, w: np.ndarray, blocks: np.ndarray, metric, d: np.ndarray) -> None:
    """compensate.refit_in_place by batches: D H's batch columns from the metric at the batch's
    start, kept current within the batch as its blocks change. blocks (rows, n / bs, type_size)
    and d = W - Q updated in place (the metric's D with them)."""
    rows, n = w.shape
    bs, step = f.block_size, max(BATCH, f.block_size)
    for k0 in range(0, n, step):
        K = slice(k0, min(k0 + step, n))
        dh, h_k = metric.columns(K), metric.block(K)
        for k in range(0, dh.shape[1], bs):
            B, G = slice(k, k + bs), slice(k0 + k, k0 + k + bs)
            h_bb = h_k[B, B]
            cross = dh[:, B] - d[:, G] @ h_bb                     # D_rest H_rest,b
            t_b = w[:, G] + np.linalg.solve(h_bb, cross.T).T
            new = ref.refit_scales(f, blocks[:, (k0 + k) // bs], t_b, np.linalg.cholesky(h_bb))
            blocks[:, (k0 + k) // bs] = new
            change = (w[:, G] - ref.values(f, new)) - d[:, G]
            d[:, G] += change
            dh += change @ h_k[B]
        metric.update(K, np.ascontiguousarray(d[:, K]))
