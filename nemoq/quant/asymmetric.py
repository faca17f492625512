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
"""

from __future__ import annotations

import numpy as np


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
