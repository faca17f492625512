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
the kernels are tested against, and `moe_up_oracle` / `moe_down_oracle` its two halves.

activations="q8" is llama.cpp's CPU numerics: each vector a matrix multiplies (x for the up
phase, each slot's hidden vector relu(...)^2 for the down phase) is first rounded to the 8-bit
activations ggml's CPU backend pairs with that matrix's format (`quantize_activations`): Q8_0
(quantize_row_q8_0_ref, per 32 values) for Q8_0, Q5_0, IQ4_NL, MXFP4 and NVFP4, Q8_K
(quantize_row_q8_K_ref, per 256 values) for Q4_K, Q5_K and Q6_K; "f32" (the default) uses it
as it is.
"""

from __future__ import annotations

import numpy as np

from nemoq.convert.dtypes import block_size, type_nbytes
from nemoq.quant.formats import FORMATS

ACTIVATIONS = ("f32", "q8")   # what the matrices multiply: the float32 vector or its 8-bit rounding
Q8_K_WEIGHTS = ("q4_k", "q5_k", "q6_k")   # the formats ggml multiplies with Q8_K activations


def row_bytes(fmt: str, n: int) -> int:
    """Bytes of one row of n values in block format `fmt` (a whole number of blocks)."""
    if n % block_size(fmt):
        raise ValueError(f"{fmt}: row width {n} is not a multiple of the block size {block_size(fmt)}")
    return type_nbytes(fmt, n)


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


def quantize_activations(v, activations: str, weights: str) -> np.ndarray:
    """float32 (..., n): the vectors as matrices in format `weights` see them: unchanged for
    "f32"; for "q8" rounded to Q8_0 (per 32 values) or, for the k-quants, Q8_K (per 256), bit for
    bit ggml's, and dequantized."""
    v = np.asarray(v, dtype=np.float32)
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations {activations!r}: expected one of {', '.join(ACTIVATIONS)}")
    if activations == "f32":
        return v
    rows = v.reshape(-1, v.shape[-1])
    if weights in Q8_K_WEIGHTS:
        return q8_k_round(rows).reshape(v.shape)
    q8 = FORMATS["q8_0"]
    return q8.dequantize(q8.quantize(rows)).reshape(v.shape)


def q8_k_round(rows: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_K_ref then dequantized, float32 (rows, n), n a multiple of 256: per
    256 values the signed value of largest magnitude (the first) maps to -127, levels are
    round-half-to-even of x * (-127 / max) capped at 127, the scale is 1 / (-127 / max)."""
    blocks = np.asarray(rows, dtype=np.float32).reshape(-1, 256)
    peak = blocks[np.arange(len(blocks)), np.argmax(np.abs(blocks), axis=1)]
    nonzero = peak != 0
    iscale = np.zeros(len(blocks), np.float32)
    iscale[nonzero] = np.float32(-127) / peak[nonzero]
    levels = np.minimum(np.rint(blocks * iscale[:, None]), np.float32(127))
    scale = np.zeros(len(blocks), np.float32)
    scale[nonzero] = np.float32(1) / iscale[nonzero]
    return (levels * scale[:, None]).astype(np.float32).reshape(np.shape(rows))


def _expert_scale(scale, e) -> np.float32:
    return np.float32(1 if scale is None else scale[e])


def moe_matvec_reference(x, expert_ids, expert_weights, up, down, up_format, down_format,
                         up_scale=None, down_scale=None, activations="f32") -> np.ndarray:
    """(T, H) float32: the routed-expert output of each token, in float32 like the kernels.

    x: (T, H) float32; expert_ids: (T, k) int; expert_weights: (T, k) float32;
    up / down: the uint8 stacks described in the module docstring; up_scale / down_scale:
    optional (E,) per-expert scales. Experts with weight 0 are skipped (they add nothing).
    """
    x = np.asarray(x, dtype=np.float32)
    n_tokens, hidden, n_experts, n_ff = expert_shapes(x, up, down, up_format, down_format)
    out = np.zeros((n_tokens, hidden), np.float32)
    for t in range(n_tokens):
        xt = quantize_activations(x[t], activations, up_format)
        for e, w in zip(expert_ids[t], np.float32(expert_weights[t])):
            if w == 0:
                continue
            up_e = FORMATS[up_format].dequantize(up[e])        # (I, H)
            down_e = FORMATS[down_format].dequantize(down[e])  # (H, I)
            h = np.maximum(up_e @ xt * _expert_scale(up_scale, e), 0) ** 2
            out[t] += w * (down_e @ quantize_activations(h, activations, down_format)) * _expert_scale(down_scale, e)
    return out


def _dequantized(stack, fmt: str, expert_ids) -> dict:
    return {e: FORMATS[fmt].dequantize(stack[e]).astype(np.float64) for e in np.unique(np.asarray(expert_ids))}


def moe_up_oracle(x, expert_ids, up, up_format, up_scale=None, activations="f32") -> np.ndarray:
    """(T, k, I) float64: each slot's hidden vector relu(up_scale[e] * up[e] @ x_t)^2, with x
    (rounded as ggml does for activations="q8") and the dequantized stack in float64."""
    x = quantize_activations(x, activations, up_format).astype(np.float64)
    up_f = _dequantized(up, up_format, expert_ids)
    return np.stack([np.stack([np.maximum(up_f[e] @ x[t] * (1.0 if up_scale is None else up_scale[e]), 0) ** 2
                               for e in expert_ids[t]]) for t in range(len(x))])


def moe_down_oracle(h, expert_ids, expert_weights, down, down_format, down_scale=None,
                    activations="f32") -> np.ndarray:
    """(T, H) float64: sum_j w_j * down_scale[e_j] * down[e_j] @ h[t, j]: the hidden vectors as
    given (T, k, I), or for activations="q8" taken as float32 and rounded as ggml does."""
    if activations == "f32":
        h = np.asarray(h, dtype=np.float64)
    else:
        h = quantize_activations(np.asarray(h, dtype=np.float32), activations, down_format).astype(np.float64)
    down_f = _dequantized(down, down_format, expert_ids)
    out = np.zeros((h.shape[0], down.shape[1]), np.float64)
    for t in range(h.shape[0]):
        for j, (e, w) in enumerate(zip(expert_ids[t], np.asarray(expert_weights[t], np.float64))):
            out[t] += w * (down_f[e] @ h[t, j]) * (1.0 if down_scale is None else down_scale[e])
    return out


def moe_matvec_oracle(x, expert_ids, expert_weights, up, down, up_format, down_format,
                      up_scale=None, down_scale=None, activations="f32") -> np.ndarray:
    """(T, H) float64: the same sum with both stacks dequantized and every product in float64.

    With activations="f32" the hidden vectors stay float64; with "q8" the oracle rounds its
    own hidden vectors (as float32) to Q8_0, as the kernel rounds the ones it computed: where a
    value sits on a rounding tie the two roundings may differ by one step (see tests/test_moe_q8.py).
    """
    expert_shapes(np.asarray(x), up, down, up_format, down_format)
    h = moe_up_oracle(x, expert_ids, up, up_format, up_scale, activations)
    return moe_down_oracle(h, expert_ids, expert_weights, down, down_format, down_scale, activations)
