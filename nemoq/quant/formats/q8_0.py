"""Q8_0: blocks of 32 values, one f16 scale d and 32 int8 q, value = d * q.

Quantization is ggml's quantize_row_q8_0_ref, bit for bit: d = max|x| / 127, q = roundf(x / d).
ggml ignores the importance vector for Q8_0 and so do we, to stay byte-identical.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import Format, OneScale


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (ties away from zero); numpy's rint rounds ties to even."""
    a = np.abs(x)
    floor = np.floor(a)
    return np.sign(x) * (floor + np.floor(2 * (a - floor)))


class Q8_0(OneScale, Format, ggml_type=GGMLQuantizationType.Q8_0):
    code_values = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32)  # code: the int8's byte
    field_bytes, code_bytes = slice(0, 2), slice(2, 34)

    def quantize_rows(self, x, importance=None):
        blocks = x.reshape(-1, 32)
        d = np.abs(blocks).max(axis=1) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        qs = round_half_away(blocks * inv[:, None]).astype(np.int8)
        out = np.concatenate([self.pack_fields(d), self.pack_codes(qs.view(np.uint8))], axis=1)
        return out.reshape(x.shape[0], -1)

    ggml_rows = quantize_rows

    def written_levels(self):
        """-127..127: ggml never writes -128 (|x / d| <= 127), and runtimes' int8 dot products
        may count on |q| <= 127 (x86's sign trick negates q), so no quantizer of ours does."""
        levels, codes = super().written_levels()
        return levels[1:], codes[1:]

    def pack_codes(self, q):
        return q

    def unpack_codes(self, b):
        return b

    def dequantize_blocks(self, blocks):
        (d,) = self.fields(blocks)
        return d[:, None] * self.codes(blocks).view(np.int8).astype(np.float32)
