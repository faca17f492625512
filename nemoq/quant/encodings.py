"""Quantized encodings with the converter's Encoding interface (nbytes, encode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.convert.dtypes import to_float32, type_nbytes
from nemoq.quant import q8_0


@dataclass(frozen=True)
class BlockEncoding:
    ggml_type: GGMLQuantizationType
    quantize: Callable[[np.ndarray], np.ndarray]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(self.ggml_type, shape)

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        return self.quantize(to_float32(rows, source_dtype))


BLOCK_ENCODINGS = {
    "q8_0": BlockEncoding(GGMLQuantizationType.Q8_0, q8_0.quantize),
}
