"""Q5_K: Q4_K with 5-bit levels q in 0..31; value = d * sc[g] * q - dmin * m[g].

Layout (176 bytes): d, dmin, the 12 scale bytes of Q4_K, qh (32 bytes: bit g of qh[l] is the
fifth bit of value 32g + l), then the low nibbles exactly as Q4_K's 128 bytes.
The quantizer is Q4_K's with nmax 31 (ggml: make_qkx2_quants(-0.5, 0.1, 15) without importance).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.quant.formats.q4_k import Q4_K


class Q5_K(Q4_K, ggml_type=GGMLQuantizationType.Q5_K):
    nmax = 31
    code_values = np.arange(nmax + 1, dtype=np.float32)
    code_bytes = slice(16, 176)
    ref_search = (-0.5, 0.1, 15)
    our_search = (-3.0, 0.8, 15)

    def pack_codes(self, q):
        """Levels (..., 256) -> qh (32 bytes) + Q4_K's nibbles of the low 4 bits (128 bytes)."""
        groups = q.reshape(*q.shape[:-1], 8, 32)
        qh = np.packbits(groups >> 4, axis=-2, bitorder="little")[..., 0, :]
        return np.concatenate([qh, super().pack_codes(q & 0x0F)], axis=-1)

    def unpack_codes(self, b):
        lead = b.shape[:-1]
        high = np.unpackbits(b[..., :32].reshape(*lead, 1, 32), axis=-2, bitorder="little")  # (..., 8, 32)
        low = super().unpack_codes(b[..., 32:]).reshape(*lead, 8, 32)
        return (low | (high << 4)).reshape(*lead, 256)
