"""MXFP4 (OCP microscaling FP4): blocks of 32 E2M1 values sharing one E8M0 power-of-two scale.

Layout (17 bytes): e (E8M0: scale 2^(e - 127)), then 16 bytes where byte j holds value j (low
nibble) and value j + 16 (high nibble). A nibble is an E2M1 number: bit 3 the sign, bits 0-2
index 0, 0.5, 1, 1.5, 2, 3, 4, 6. ggml stores E2M1 doubled as integers (KVALUES) and multiplies by
half the scale; we dequantize the same way so the floats match ggml bit for bit.
ggml picks e = floor(log2(max|x|)) - 2 + 127 and rounds to nearest, ignoring importance. We
also try the neighbouring exponents and keep per block the one with the lowest (weighted) error.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import Format, metric_weights, pack_nibbles, unpack_nibbles
from nemoq.quant.formats.search import Grid

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
E2M1_GRID = Grid(E2M1, 0.25)
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def e2m1_encode(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Nearest E2M1 nibble (sign in bit 3) of x / scale; scale broadcasts against x."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = E2M1_GRID.index(np.where(scale > 0, np.abs(x) / scale, 0))
    return (mag + 8 * ((x < 0) & (mag > 0))).astype(np.uint8)


def e2m1_decode(nibbles: np.ndarray) -> np.ndarray:
    """E2M1 values of nibbles (sign in bit 3)."""
    return KVALUES[nibbles] / 2


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """Half the E8M0 scale, 2^(e - 128), built from bits as ggml_e8m0_to_fp32_half (denormal for e < 2)."""
    e = np.asarray(e, dtype=np.uint32)
    return np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32).view(np.float32)


class MXFP4(Format, ggml_type=GGMLQuantizationType.MXFP4):
    def quantize_rows(self, x, importance=None):
        xb = x.reshape(x.shape[0], -1, 32)
        amax = np.abs(xb).max(axis=-1)
        with np.errstate(divide="ignore"):
            e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0)
        candidates = [self.pack(np.clip(e + k, 0, 254), xb) for k in (0, -2, -1, 1)]
        return self.best_of(x, metric_weights(x, importance), *candidates)

    def pack(self, e, xb):
        e = e.astype(np.uint8)
        q = e2m1_encode(xb, 2 * e8m0_half(e)[..., None])
        out = np.concatenate([e[..., None], pack_nibbles(q[..., :16], q[..., 16:])], axis=-1)
        return out.reshape(xb.shape[0], -1)

    def dequantize_blocks(self, blocks):
        lo, hi = unpack_nibbles(blocks[:, 1:])
        return e8m0_half(blocks[:, 0])[:, None] * KVALUES[np.concatenate([lo, hi], axis=-1)]
