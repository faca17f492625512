"""Q5_0: blocks of 32 values, one f16 scale d and 32 5-bit levels q in 0..31, value = d * (q - 16).

Layout (22 bytes): d, qh (4 bytes, little-endian uint32: bit j is the fifth bit of value j), then
16 bytes of low nibbles as in Q4_0 (byte j: value j low, value j + 16 high).
The quantizer is Q4_0's with 16 in place of 8 (ggml's quantize_row_q5_0_ref / quantize_row_q5_0_impl).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import f16_bytes, pack_nibbles, read_f16, unpack_nibbles
from nemoq.quant.formats.q4_0 import Q4_0
from nemoq.quant.formats.search import groups_last


class Q5_0(Q4_0, ggml_type=GGMLQuantizationType.Q5_0):
    nmax = 16

    def pack(self, d, l):
        q = groups_last(l + self.nmax).astype(np.uint8).reshape(*d.shape, 32)
        qh = np.packbits(q >> 4, axis=-1, bitorder="little")
        out = np.concatenate([f16_bytes(d), qh, pack_nibbles(q[..., :16], q[..., 16:])], axis=-1)
        return out.reshape(d.shape[0], -1)

    def dequantize_blocks(self, blocks):
        d = read_f16(blocks[:, :2])
        high = np.unpackbits(blocks[:, 2:6], axis=-1, bitorder="little")
        lo, hi = unpack_nibbles(blocks[:, 6:])
        q = (np.concatenate([lo, hi], axis=-1) | (high << 4)).astype(np.int8) - np.int8(self.nmax)
        return d[:, None] * q.astype(np.float32)
