"""Quantized encodings with the converter's Encoding interface (nbytes, encode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from nemoq import kernels_c
from nemoq.convert.dtypes import to_float32, type_nbytes
from nemoq.quant.formats import FORMATS


@dataclass(frozen=True)
class BlockEncoding:
    name: str
    ggml_type: GGMLQuantizationType
    reference: Callable[[np.ndarray], np.ndarray]   # the numpy quantizer, used without a C kernel

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(self.ggml_type, shape)

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        x = to_float32(rows, source_dtype)
        if kernels_c.available(self.name):
            return kernels_c.quantize_rows(self.name, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        return self.reference(x)


BLOCK_ENCODINGS = {name: BlockEncoding(name, fmt.ggml_type, fmt.quantize) for name, fmt in FORMATS.items()}
