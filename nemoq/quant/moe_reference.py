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
time, as the C kernel computes); `moe_matvec_oracle` is the float64 dequantize-then-matmul
the kernels are tested against.
"""

from __future__ import annotations

import numpy as np

from nemoq.quant.formats import FORMATS


def row_bytes(fmt: str, n: int) -> int:
    """Bytes of one row of n values in block format `fmt`."""
    f = FORMATS[fmt]
    if n % f.block_size:
        raise ValueError(f"{fmt}: row width {n} is not a multiple of the block size {f.block_size}")
    return n // f.block_size * f.type_size


def expert_shapes(x: np.ndarray, up: np.ndarray, down: np.ndarray, up_format: str, down_format: str):
    """(T, H, E, I) after checking that the stacks hold (E, I, H) and (E, H, I) in their formats."""
    if x.ndim != 2:
        raise ValueError(f"x must be (tokens, hidden), got shape {x.shape}")
    n_tokens, hidden = x.shape
    if up.dtype != np.uint8 or up.ndim != 3 or down.dtype != np.uint8 or down.ndim != 3:
        raise ValueError("up and down must be uint8 stacks (experts, rows, row bytes)")
    n_experts, n_ff = up.shape[:2]
    if up.shape[2] != row_bytes(up_format, hidden):
        raise ValueError(f"up: {up.shape[2]} bytes per row, expected {row_bytes(up_format, hidden)} "
                         f"for {hidden} {up_format} values")
    if down.shape != (n_experts, hidden, row_bytes(down_format, n_ff)):
        raise ValueError(f"down: shape {down.shape}, expected {(n_experts, hidden, row_bytes(down_format, n_ff))} "
                         f"for ({n_experts}, {hidden}, {n_ff}) {down_format} values")
    return n_tokens, hidden, n_experts, n_ff


def moe_matvec_reference(x, expert_ids, expert_weights, up, down, up_format, down_format,
                         up_scale=None, down_scale=None) -> np.ndarray:
    """(T, H) float32: the routed-expert output of each token, in float32 like the kernels.

    x: (T, H) float32; expert_ids: (T, k) int; expert_weights: (T, k) float32;
    up / down: the uint8 stacks described in the module docstring; up_scale / down_scale:
    optional (E,) per-expert scales. Experts with weight 0 are skipped (they add nothing).
    """
    x = np.asarray(x, dtype=np.float32)
    n_tokens, hidden, n_experts, n_ff = expert_shapes(x, up, down, up_format, down_format)
    out = np.zeros((n_tokens, hidden), np.float32)
    for t in range(n_tokens):
        for e, w in zip(expert_ids[t], np.float32(expert_weights[t])):
            if w == 0:
                continue
            up_e = FORMATS[up_format].dequantize(up[e])        # (I, H)
            down_e = FORMATS[down_format].dequantize(down[e])  # (H, I)
            h = up_e @ x[t] * np.float32(1 if up_scale is None else up_scale[e])
            h = np.maximum(h, 0) ** 2
            out[t] += w * (down_e @ h) * np.float32(1 if down_scale is None else down_scale[e])
    return out


def moe_matvec_oracle(x, expert_ids, expert_weights, up, down, up_format, down_format,
                      up_scale=None, down_scale=None) -> np.ndarray:
    """(T, H) float64: the same sum with both stacks dequantized and every product in float64."""
    x = np.asarray(x, dtype=np.float64)
    n_tokens, hidden, n_experts, n_ff = expert_shapes(x, up, down, up_format, down_format)
    used = np.unique(np.asarray(expert_ids))
    up_f = {e: FORMATS[up_format].dequantize(up[e]).astype(np.float64) for e in used}
    down_f = {e: FORMATS[down_format].dequantize(down[e]).astype(np.float64) for e in used}
    up_s = np.ones(n_experts) if up_scale is None else np.asarray(up_scale, np.float64)
    down_s = np.ones(n_experts) if down_scale is None else np.asarray(down_scale, np.float64)
    out = np.zeros((n_tokens, hidden), np.float64)
    for t in range(n_tokens):
        for e, w in zip(expert_ids[t], np.asarray(expert_weights[t], np.float64)):
            h = np.maximum(up_f[e] @ x[t] * up_s[e], 0) ** 2
            out[t] += w * (down_f[e] @ h) * down_s[e]
    return out
