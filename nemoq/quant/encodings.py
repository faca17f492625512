"""Quantized encodings with the converter's Encoding interface (nbytes, encode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from nemoq import kernels_c
from nemoq.convert.dtypes import EncodingBase, to_float32, type_nbytes
from nemoq.quant.formats import FORMATS


_widened = np.empty(0, dtype=np.float32)


def widen_to_float32(rows: np.ndarray, source_dtype: str) -> np.ndarray:
    """Source rows as float32: the C kernel for half precision (2x numpy's cast here), into one
    reused buffer that the caller quantizes before the next chunk arrives."""
    global _widened
    if source_dtype not in kernels_c.WIDEN_SOURCES or kernels_c.library() is None:
        return to_float32(rows, source_dtype)
    if _widened.size < rows.size:
        _widened = np.empty(rows.size, dtype=np.float32)
    return kernels_c.widen(rows, source_dtype, _widened)


@dataclass(frozen=True)
class BlockEncoding(EncodingBase):
    name: str
    ggml_type: GGMLQuantizationType
    reference: Callable[[np.ndarray], np.ndarray]   # the numpy quantizer, used without a C kernel

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(self.ggml_type, shape)

    def quantize(self, x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """float32 rows -> block bytes: the C kernel when built (same bytes), else numpy."""
        x = x.reshape(-1, x.shape[-1])
        if kernels_c.available(self.name):
            return kernels_c.quantize_rows(self.name, x, importance, threads=kernels_c.THREADS)
        return self.reference(x, importance)

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        """Block bytes -> float32 rows: the C kernel when built (same values), else numpy."""
        if kernels_c.available(self.name):
            return kernels_c.dequantize_rows(self.name, blocks)
        return FORMATS[self.name].dequantize(blocks)

    def quantize_source(self, rows: np.ndarray, source_dtype: str, importance: np.ndarray | None = None) -> np.ndarray:
        """Rows as stored (float32, F16, BF16, ...) -> block bytes (rows, -1); half-precision rows
        go to the C kernels unwidened, each thread widening its own rows."""
        rows = rows.reshape(-1, rows.shape[-1])
        if source_dtype in kernels_c.WIDEN_SOURCES and kernels_c.available(self.name):
            return kernels_c.quantize_half_rows(self.name, rows, source_dtype, importance, threads=kernels_c.THREADS)
        return self.quantize(widen_to_float32(rows, source_dtype), importance)

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        return self.quantize_source(rows, source_dtype).reshape(*rows.shape[:-1], -1)

    def with_importance(self, importance: np.ndarray, rows_per_matrix: int) -> "WeightedEncoding":
        return WeightedEncoding(self, importance, rows_per_matrix)


class WeightedEncoding(EncodingBase):
    """A block encoding for one tensor with its importance: one vector per matrix (per expert
    for stacked experts). Chunks arrive in order, so a row counter tells which matrix a row
    belongs to; a chunk that spans two experts is split at the boundary."""

    def __init__(self, base: BlockEncoding, importance: np.ndarray, rows_per_matrix: int):
        self.base, self.ggml_type = base, base.ggml_type
        self.importance = importance.reshape(-1, importance.shape[-1])
        self.rows_per_matrix = rows_per_matrix
        self.row = 0

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return self.base.nbytes(shape)

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        x = rows.reshape(-1, rows.shape[-1])
        pieces, start = [], 0
        while start < x.shape[0]:
            matrix = min(self.row // self.rows_per_matrix, self.importance.shape[0] - 1)
            take = min(x.shape[0] - start, self.rows_per_matrix - self.row % self.rows_per_matrix)
            pieces.append(self.base.quantize_source(x[start:start + take], source_dtype, self.importance[matrix]))
            start += take
            self.row += take
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


BLOCK_ENCODINGS = {name: BlockEncoding(name, fmt.ggml_type, fmt.quantize) for name, fmt in FORMATS.items()}
