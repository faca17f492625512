"""C kernels for the block formats, compiled on first use and called through ctypes.

Rows are split across threads in Python: ctypes releases the GIL for the duration of
each foreign call, so `threads` C calls run in parallel without pthreads in the C code.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nemoq.kernels_c.build import KernelStatus, library, status

__all__ = ["KernelStatus", "status", "quantize_rows", "dequantize_rows", "available", "KERNEL_FORMATS"]

# format name -> (block size, bytes per block): the formats with a C kernel
KERNEL_FORMATS = {"q8_0": (32, 34)}

_ROW_KERNEL_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]


def _kernel(name: str):
    fn = getattr(library(), name)
    fn.argtypes, fn.restype = _ROW_KERNEL_ARGS, None
    return fn


def available(fmt: str) -> bool:
    return fmt in KERNEL_FORMATS and library() is not None


def _row_chunks(nrows: int, threads: int) -> list[tuple[int, int]]:
    step = max(1, -(-nrows // max(1, threads)))
    return [(r, min(r + step, nrows)) for r in range(0, nrows, step)]


def _run(fn, src: np.ndarray, dst: np.ndarray, n_per_row: int, threads: int | None) -> None:
    threads = threads or os.cpu_count() or 1
    chunks = _row_chunks(src.shape[0], threads)

    def call(lo_hi):
        lo, hi = lo_hi
        fn(src[lo:hi].ctypes.data, dst[lo:hi].ctypes.data, hi - lo, n_per_row)
    if len(chunks) == 1:
        call(chunks[0])
        return
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        list(pool.map(call, chunks))


def quantize_rows(fmt: str, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """float32 (rows, n) -> uint8 (rows, n / block * bytes) with the C kernel of `fmt`."""
    block, size = KERNEL_FORMATS[fmt]
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
    _run(_kernel(f"nemoq_quantize_{fmt}"), x, out, x.shape[1], threads)
    return out


def dequantize_rows(fmt: str, data: np.ndarray, threads: int | None = None) -> np.ndarray:
    block, size = KERNEL_FORMATS[fmt]
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, data.shape[-1])
    n = data.shape[1] // size * block
    out = np.empty((data.shape[0], n), dtype=np.float32)
    _run(_kernel(f"nemoq_dequantize_{fmt}"), data, out, n, threads)
    return out
