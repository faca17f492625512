"""NVFP4: blocks of 64 values in 4 groups of 16; each group has its own UE4M3 scale, values E2M1.

Layout (36 bytes): 4 scale bytes (UE4M3: unsigned, 4 exponent bits with bias 7, 3 mantissa
bits; 0x7F and 0 mean zero), then 4 x 8 bytes: in group g, byte j holds value j (low nibble) and
value j + 8 (high nibble). Nibbles are E2M1 as in MXFP4. (ModelOpt checkpoints pack neighbours
2i, 2i+1 instead; a repack must reorder.) NVFP4 has no per-tensor scale inside the block.
ggml picks the scale nearest to max|x| / 6 and rounds to nearest. We try that scale and the
valid scales below and just above it, and keep per group the one with the lowest
(importance-weighted) error, as NVIDIA ModelOpt's MSE calibration does.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import Format, metric_weights, pack_nibbles, unpack_nibbles
from nemoq.quant.formats.mxfp4 import KVALUES, e2m1_decode, e2m1_encode
from nemoq.quant.formats.search import wsum


def _ue4m3(code: int) -> float:
    exp, man = (code >> 3) & 0xF, code & 7
    if code in (0, 0x7F):
        return 0.0
    return float(np.ldexp(man, -9)) if exp == 0 else float(np.ldexp(1 + man / 8, exp - 7))


UE4M3 = np.array([_ue4m3(c) for c in range(256)], dtype=np.float32)  # scale of each code (as ggml decodes it)
MAX_CODE = 0x7E  # 448


def fp32_to_ue4m3(x: np.ndarray) -> np.ndarray:
    """ggml_fp32_to_ue4m3: round to nearest (ties away) on the 3 mantissa bits, saturating to 0x7E."""
    x = np.minimum(np.asarray(x, dtype=np.float32), np.float32(448))
    bits = x.view(np.uint32).astype(np.int64)
    exp = ((bits >> 23) & 0xFF) - 127 + 7
    man = ((bits >> 20) & 7) + ((bits >> 19) & 1)
    exp, man = np.where(man > 7, exp + 1, exp), np.where(man > 7, 0, man)
    normal = np.where(exp >= 15, MAX_CODE, (exp << 3) | man)
    sub = np.clip((x * np.float32(512) + np.float32(0.5)).astype(np.int64), 0, 7)
    return np.where(~(x > 0), 0, np.where(exp <= 0, sub, normal)).astype(np.uint8)


class NVFP4(Format, ggml_type=GGMLQuantizationType.NVFP4):
    steps = range(-8, 2)  # codes tried around ggml's: one octave below to one step above

    def quantize_rows(self, x, importance=None):
        xg = x.reshape(x.shape[0], -1, 4, 16)
        w = metric_weights(x, importance).reshape(1, -1, 4, 16)
        ggml_code = fp32_to_ue4m3(np.abs(xg).max(axis=-1) / np.float32(6)).astype(np.int64)
        best_code, best_err = None, None
        for step in (0, *[s for s in self.steps if s != 0]):
            code = np.where(ggml_code > 0, np.clip(ggml_code + step, 1, MAX_CODE), 0)
            scale = UE4M3[code][..., None]
            diff = xg - scale * e2m1_decode(e2m1_encode(xg, scale))
            err = wsum(w, diff, diff)
            if best_code is None:
                best_code, best_err = code, err
            else:
                better = err < best_err
                best_code, best_err = np.where(better, code, best_code), np.where(better, err, best_err)
        return self.pack(best_code, xg)

    def pack(self, code, xg):
        q = e2m1_encode(xg, UE4M3[code][..., None])
        qs = pack_nibbles(q[..., :8], q[..., 8:]).reshape(*code.shape[:-1], 32)
        return np.concatenate([code.astype(np.uint8), qs], axis=-1).reshape(xg.shape[0], -1)

    def dequantize_blocks(self, blocks):
        d = UE4M3[blocks[:, :4]] / 2  # halved, for the doubled E2M1 table, as in ggml
        lo, hi = unpack_nibbles(blocks[:, 4:].reshape(-1, 4, 8))
        q = KVALUES[np.concatenate([lo, hi], axis=-1)]
        return (d[..., None] * q).reshape(-1, 64)
