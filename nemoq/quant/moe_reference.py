"""Routed experts of a Nemotron-H MoE layer, straight from the quantized GGUF stacks, in numpy.

For token t with routed experts e_1..e_k and router weights w_1..w_k (top-k, already
normalised and scaled by the caller):

    y_t = sum_j  w_j * down[e_j] @ relu(up[e_j] @ x_t)^2

Nemotron-H's experts have no gate: squared ReLU between up and down. The stacks are what the
GGUF holds: `up` is ffn_up_exps, numpy shape (E, I, H) stored as E * I rows of H values in a
block format, i.e. uint8 (E, I, H / block * bytes); `down` is ffn_down_exps, (E, H, I) stored as
uint8 (E, H, I / block * bytes). Optional per-expert float scales multiply each expert's
output (llama.cpp's `<name>.scale` vector beside NVFP4 stacks converted from ModelOpt).

`moe_matvec_reference` is the readable definition (float32 math, one expert dequantized at a
time); `moe_matvec_oracle` is the float64 dequantize-then-matmul that it, the C reference kernel
(nemoq.kernels_c.moe) and its CUDA twin (nemoq.kernels_c.cuda) are tested against.
"""

from __future__ import annotations

import numpy as np

from nemoq.kernels_c.moe import expert_shapes
from nemoq.quant.formats import FORMATS


def _expert_scale(scale, e) -> float:
    return 1.0 if scale is None else scale[e]


def moe_matvec_reference(x, expert_ids, expert_weights, up, down, up_format, down_format,
                         up_scale=None, down_scale=None) -> np.ndarray:
    """(T, H) float32: the routed-expert output of each token, in float32 like the kernels.

    x: (T, H) float32; expert_ids: (T, k) int; expert_weights: (T, k) float32;
    up / down: the uint8 stacks described in the module docstring; up_scale / down_scale:
    optional (E,) per-expert scales. Experts with weight 0 are skipped (they add nothing).
    """
    x = np.asarray(x, dtype=np.float32)
    n_tokens, hidden, _, _ = expert_shapes(x, up, down, up_format, down_format)
    out = np.zeros((n_tokens, hidden), np.float32)
    for t in range(n_tokens):
        for e, w in zip(expert_ids[t], np.float32(expert_weights[t])):
            if w == 0:
                continue
            up_e = FORMATS[up_format].dequantize(up[e])        # (I, H)
            down_e = FORMATS[down_format].dequantize(down[e])  # (H, I)
            h = np.maximum(up_e @ x[t] * np.float32(_expert_scale(up_scale, e)), 0) ** 2
            out[t] += w * (down_e @ h) * np.float32(_expert_scale(down_scale, e))
    return out


def moe_matvec_oracle(x, expert_ids, expert_weights, up, down, up_format, down_format,
                      up_scale=None, down_scale=None) -> np.ndarray:
    """(T, H) float64: the same sum with both stacks dequantized and every product in float64."""
    x = np.asarray(x, dtype=np.float64)
    expert_shapes(x, up, down, up_format, down_format)
    used = np.unique(np.asarray(expert_ids))
    up_f = {e: FORMATS[up_format].dequantize(up[e]).astype(np.float64) for e in used}
    down_f = {e: FORMATS[down_format].dequantize(down[e]).astype(np.float64) for e in used}
    out = np.zeros((x.shape[0], down.shape[1]), np.float64)
    for t in range(x.shape[0]):
        for e, w in zip(expert_ids[t], np.asarray(expert_weights[t], np.float64)):
            h = np.maximum(up_f[e] @ x[t] * _expert_scale(up_scale, e), 0) ** 2
            out[t] += w * (down_f[e] @ h) * _expert_scale(down_scale, e)
    return out
