"""Float encodings of a tensor (F32, F16, BF16) and the checks done while streaming.

An `Encoding` turns whole rows of source data into the bytes of one GGUF type. The quant
package supplies more encodings (Q8_0, ...) with the same two methods, so the converter
never needs to know about block formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType


def to_float32(chunk: np.ndarray, source_dtype: str) -> np.ndarray:
    """Source storage (bf16 as uint16 bits, f16, f32, f64) -> float32 values."""
    if source_dtype == "BF16":
        return (chunk.astype(np.uint32) << 16).view(np.float32)
    return chunk.astype(np.float32, copy=False)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, keep NaN a (quiet) NaN: what torch's .bfloat16() does."""
    bits = x.astype(np.float32, copy=False).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def count_non_finite(chunk: np.ndarray, source_dtype: str) -> int:
    """NaN/Inf count in source storage, without converting bf16."""
    if source_dtype == "BF16":
        return int(np.count_nonzero((chunk & 0x7F80) == 0x7F80))
    if chunk.dtype.kind == "f":
        return int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
    return 0


class Encoding(Protocol):
    ggml_type: GGMLQuantizationType

    def nbytes(self, shape: tuple[int, ...]) -> int: ...

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray: ...


def type_nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    n = int(np.prod(shape))
    return n // block * size


@dataclass(frozen=True)
class FloatEncoding:
    ggml_type: GGMLQuantizationType
    passthrough: str                                   # source dtype copied byte for byte
    from_float32: Callable[[np.ndarray], np.ndarray]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(self.ggml_type, shape)

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        if source_dtype == self.passthrough and rows.dtype != np.float32:
            return rows
        return self.from_float32(to_float32(rows, source_dtype))


FLOAT_ENCODINGS: dict[str, FloatEncoding] = {
    "f32": FloatEncoding(T.F32, "F32", lambda x: x.astype(np.float32, copy=False)),
    "f16": FloatEncoding(T.F16, "F16", lambda x: x.astype(np.float16)),
    "bf16": FloatEncoding(T.BF16, "BF16", float32_to_bf16_bits),
}
