"""Q5_0: blocks of 32 values, one f16 scale d and 32 5-bit levels q in 0..31, value = d * (q - 16).

Layout (22 bytes): d, qh (4 bytes, little-endian uint32: bit j is the fifth bit of value j), then
16 bytes of low nibbles as in Q4_0 (byte j: value j low, value j + 16 high).
The quantizer is Q4_0's with 16 in place of 8 (ggml's quantize_row_q5_0_ref / quantize_row_q5_0_impl).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.base import pack_five_bits, unpack_five_bits
from nemoq.quant.formats.q4_0 import Q4_0


class Q5_0(Q4_0, ggml_type=GGMLQuantizationType.Q5_0):
    nmax = 16
    code_values = np.arange(-nmax, nmax, dtype=np.float32)
    code_bytes = slice(2, 22)

    def pack_codes(self, q):
        return pack_five_bits(q)

    def unpack_codes(self, b):
        return unpack_five_bits(b)
