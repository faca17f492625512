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

from nemoq.quant.formats.base import Format, metric_weights, pack_halves, per_value, unpack_halves
from nemoq.quant.formats.mxfp4 import KVALUES, best_e2m1_scale, e2m1_encode
from nemoq.quant.formats.search import full, groups_first, groups_last


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
    rounded_exp, man = np.where(man > 7, exp + 1, exp), np.where(man > 7, 0, man)
    normal = np.where(rounded_exp >= 15, MAX_CODE, (rounded_exp << 3) | man)
    sub = np.clip((x * np.float32(512) + np.float32(0.5)).astype(np.int64), 0, 7)  # never rounds up to 8
    return np.where(~(x > 0), 0, np.where(exp <= 0, sub, normal)).astype(np.uint8)


class NVFP4(Format, ggml_type=GGMLQuantizationType.NVFP4):
    code_values = KVALUES  # times half the group's scale
    field_bytes, code_bytes = slice(0, 4), slice(4, 36)
    steps = (0, *range(-8, 0), 1)  # codes tried relative to ggml's (first): an octave below to a step above

    def search_rows(self, x, importance=None):
        """ggml's scale code and the codes an octave below to a step above, the best per group."""
        xt = groups_first(x, 16)  # (16, rows, groups)
        wt = full(groups_first(metric_weights(x, importance), 16), xt.shape)
        amax = np.abs(xt).max(axis=0)
        ggml_code = fp32_to_ue4m3(amax / np.float32(6)).astype(np.int64)
        codes = [np.where(amax > 0, np.clip(ggml_code + step, 1, MAX_CODE), 0) for step in self.steps]
        codes[0] = ggml_code
        pick = best_e2m1_scale(xt, wt, [UE4M3[c] for c in codes])
        return self.pack(np.choose(pick, codes), xt)

    quantize_rows = search_rows   # ggml's scale code is the search's first candidate

    def ggml_rows(self, x, importance=None):
        """quantize_row_nvfp4_ref: the scale code nearest to max|x| / 6, values rounded to nearest."""
        xt = groups_first(x, 16)
        return self.pack(fp32_to_ue4m3(np.abs(xt).max(axis=0) / np.float32(6)), xt)

    def pack(self, code, xt):
        """Scale codes (rows, groups) and values (16, rows, groups) -> (rows, groups / 4 * 36) bytes."""
        rows = code.shape[0]
        q = groups_last(e2m1_encode(xt, UE4M3[code])).reshape(rows, -1, 64)
        out = np.concatenate([self.pack_fields(code.reshape(rows, -1, 4)), self.pack_codes(q)], axis=-1)
        return out.reshape(rows, -1)

    def pack_codes(self, q):
        """Codes (..., 64) -> (..., 32): in group g, byte j holds code j (low) and code j + 8 (high)."""
        return pack_halves(q.reshape(*q.shape[:-1], 4, 16)).reshape(*q.shape[:-1], 32)

    def unpack_codes(self, b):
        return unpack_halves(b.reshape(*b.shape[:-1], 4, 8)).reshape(*b.shape[:-1], 64)

    def pack_fields(self, code):
        return np.asarray(code, dtype=np.uint8)

    def unpack_fields(self, b):
        return (b,)

    def grid_of(self, code):
        return per_value(UE4M3[code] / 2, 16), np.zeros((code.shape[0], 64), np.float32)

    def dequantize_blocks(self, blocks):
        (code,) = self.fields(blocks)
        d = UE4M3[code] / 2  # halved, for the doubled E2M1 table, as in ggml
        q = KVALUES[self.codes(blocks)].reshape(-1, 4, 16)
        return (d[..., None] * q).reshape(-1, 64)
