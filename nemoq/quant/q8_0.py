"""Q8_0: blocks of 32 values, one f16 scale and 32 int8, exactly as ggml's quantize_row_q8_0_ref."""

from __future__ import annotations

import numpy as np

BLOCK = 32
BLOCK_BYTES = 2 + BLOCK


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (ties away from zero); numpy's rint rounds ties to even."""
    a = np.abs(x)
    floor = np.floor(a)
    return np.sign(x) * (floor + np.floor(2 * (a - floor)))


def quantize(x: np.ndarray) -> np.ndarray:
    """float32 rows (..., n) with n % 32 == 0 -> uint8 rows of n / 32 blocks."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    blocks = x.reshape(-1, BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    qs = round_half_away(blocks * inv).astype(np.int8)
    out = np.empty((blocks.shape[0], BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = qs.view(np.uint8)
    return out.reshape(*x.shape[:-1], x.shape[-1] // BLOCK * BLOCK_BYTES)


def dequantize(data: np.ndarray) -> np.ndarray:
    """uint8 rows of Q8_0 blocks -> float32 rows."""
    blocks = np.ascontiguousarray(data).reshape(-1, BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:].view(np.int8).astype(np.float32)
    n = data.shape[-1] // BLOCK_BYTES * BLOCK
    return (d * qs).reshape(*data.shape[:-1], n)
