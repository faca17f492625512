"""ggml's own quantizers through ctypes: the bytes llama-quantize would write for a matrix.

Loads libggml-base.so from the installed llama-cpp-python wheel and calls
`ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`, the function
llama.cpp's quantize tool uses (imatrix: one weight per column, or NULL).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@functools.cache
def libggml() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def ggml_quantize(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None,
                  ) -> np.ndarray:
    """float32 (rows, n_per_row) -> uint8 (rows, row bytes), exactly as ggml quantizes it."""
    lib = libggml()
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n_per_row = x.shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block_size:
        raise ValueError(f"{qtype.name}: row length {n_per_row} is not a multiple of {block_size}")
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    assert row_bytes == n_per_row // block_size * type_size
    if imatrix is None and lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} needs an imatrix")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (n_per_row,)
    out = np.zeros((nrows, row_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row,
        None if imatrix is None else imatrix.ctypes.data,
    )
    assert written == out.nbytes, (written, out.nbytes)
    return out
