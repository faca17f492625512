"""Float encodings of a tensor (F32, F16, BF16) and the checks done while streaming.

An `Encoding` turns whole rows of source data into the bytes of one GGUF type. The quant
package supplies more encodings (Q8_0, ...) with the same two methods, so the converter
never needs to know about block formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType


def to_float32(chunk: np.ndarray, source_dtype: str) -> np.ndarray:
    """Source storage (bf16 as uint16 bits, f16, f32, f64) -> float32 values."""
    if source_dtype == "BF16":
        return (chunk.astype(np.uint32) << 16).view(np.float32)
    return chunk.astype(np.float32, copy=False)


# numpy's float16 casts are scalar loops (~0.3 GB/s here); torch's are vectorised (>4 GB/s).
TORCH_SOURCE = {"BF16": (torch.bfloat16, np.uint16), "F16": (torch.float16, np.float16),
                "F32": (torch.float32, np.float32), "F64": (torch.float64, np.float64)}


def _as_torch(chunk: np.ndarray, source_dtype: str) -> torch.Tensor:
    torch_dtype, storage = TORCH_SOURCE[source_dtype]
    return torch.from_numpy(np.ascontiguousarray(chunk).view(storage)).view(torch_dtype)


def to_float16(chunk: np.ndarray, source_dtype: str) -> np.ndarray:
    """Round to nearest even (values beyond f16's range become inf, as any f16 cast)."""
    return _as_torch(chunk, source_dtype).to(torch.float16).numpy()


def to_bf16_bits(chunk: np.ndarray, source_dtype: str) -> np.ndarray:
    """Round to nearest even, as torch's .bfloat16(); returned as uint16 bits."""
    return _as_torch(chunk, source_dtype).to(torch.bfloat16).view(torch.uint16).numpy()


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
    convert: Callable[[np.ndarray, str], np.ndarray]   # (rows, source dtype) -> stored values

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(self.ggml_type, shape)

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        if rows.dtype == np.float32:   # transformed values arrive as float32 whatever the source
            source_dtype = "F32"
        if source_dtype == SOURCE_OF[self.ggml_type]:
            return rows                # same type: the bytes are copied as they are
        return self.convert(rows, source_dtype)


SOURCE_OF = {T.F32: "F32", T.F16: "F16", T.BF16: "BF16"}

FLOAT_ENCODINGS: dict[str, FloatEncoding] = {
    "f32": FloatEncoding(T.F32, to_float32),
    "f16": FloatEncoding(T.F16, to_float16),
    "bf16": FloatEncoding(T.BF16, to_bf16_bits),
}
