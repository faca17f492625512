"""Asymmetric targets (GPTAQ, Li et al. 2025): round W for the quantized model's inputs, aimed at
the full-precision model's outputs.

A matrix of the quantized model sees inputs x~ that the layers below it have already bent
(x~ = x + error). Rounding W against H~ = sum x~ x~^T alone (sequential GPTQ) reproduces W x~,
not W x; rounding it against the full-precision H (GPTQ's default) ignores what it will be fed.
Asking for both, min over Q of sum over tokens ||W x - Q x~||^2, is ordinary compensated rounding
of a moved target:

    sum ||W x - Q x~||^2 = sum ||W' x~ - Q x~||^2 + const,   W' = W + W D H~^-1,
    D = sum over tokens (x - x~) x~^T  (the shift),  W' the least-squares fit of W x through x~,

so the walk hands W' and H~ to compensated_quantize: the error the layers below left in x~ is
corrected by this matrix as far as its own weights can.

H~ is damped as compensation damps it (lambda * mean diag H~). With fewer tokens than columns the
fit W' is not determined by the tokens (it would fit them, not the model): W is kept.

`asymmetric_target` is the numpy reference; the walk uses `asymmetric_target_torch`, the same
on its device through a Cholesky factor (H~ + lambda I is positive definite), tested against it.
Halving the correction (W + 0.5 W D H~^-1) gave the same KLD as the full one on the w256 model
(Q4_K_M, 0.999 +- 0.023), so the least-squares target is used as it is.
"""

from __future__ import annotations

import numpy as np
import torch


# Rows per float64 product of the fast path: a Nano-sized head (131072 x 2688) at once took 7 GB
# beside its weights
CHUNK_ROWS = 4096


def asymmetric_target(w: np.ndarray, h: np.ndarray, shift: np.ndarray, damping: float, tokens: int) -> np.ndarray:
    """W' = W + W D (H~ + lambda I)^-1, float32 like w; w itself with fewer tokens than columns.

    w (rows, n); h = sum x~ x~^T and shift = sum (x - x~) x~^T over the same tokens, both (n, n).
    """
    n = w.shape[1]
    if tokens < n:
        return w
    h = np.asarray(h, np.float64)
    lam = damping * float(np.mean(np.diag(h)))
    if not lam > 0:
        return w
    wd = np.asarray(w, np.float64) @ np.asarray(shift, np.float64)
    # H~ is symmetric: W D (H~ + lam I)^-1 = ((H~ + lam I)^-1 (W D)^T)^T
    correction = np.linalg.solve(h + lam * np.eye(n), wd.T).T
    return (w + correction).astype(np.float32)


def asymmetric_target_torch(w: np.ndarray, h: torch.Tensor, shift: torch.Tensor, damping: float,
                            tokens: int) -> np.ndarray:
    """asymmetric_target with H~ and the shift as the walk's Grams hold them (float64 on its device)."""
    n = w.shape[1]
    if tokens < n:
        return w
    lam = damping * float(h.diagonal().mean())
    if not lam > 0:
        return w
    wide = h.dtype
    damped = h + lam * torch.eye(n, dtype=wide, device=h.device)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info):   # not positive definite in floating point: the general solve
        return asymmetric_target(w, h.cpu().numpy(), shift.cpu().numpy(), damping, tokens)
    out = np.empty(w.shape, np.float32)
    shift = shift.to(wide)
    for start in range(0, w.shape[0], CHUNK_ROWS):   # the head's 131072 rows: float64 a chunk at a time
        rows = np.asarray(w[start:start + CHUNK_ROWS])
        wd = torch.from_numpy(rows).to(h.device, wide) @ shift
        correction = torch.cholesky_solve(wd.T, factor).T
        out[start:start + CHUNK_ROWS] = rows + correction.cpu().numpy()
    return out
