"""C kernels for the block formats, compiled on first use and called through ctypes.

Rows are split across threads in Python: ctypes releases the GIL for the duration of
each foreign call, so `threads` C calls run in parallel without pthreads in the C code.
Every kernel is bit-identical to its numpy reference in nemoq.quant.formats, with and
without an importance vector (tests/test_kernels_c.py).
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from nemoq.kernels_c.build import KernelStatus, library, status

__all__ = ["KernelStatus", "status", "quantize_rows", "dequantize_rows", "available", "KERNEL_FORMATS"]

# format name -> (block size, bytes per block), gguf-py's sizes: the formats with a C kernel
KERNEL_FORMATS = {name: GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
                  for name in ("q8_0", "q5_1", "q5_0", "q4_0", "iq4_nl", "q4_k", "q5_k", "q6_k", "mxfp4", "nvfp4")}

# Threads for quantizing (None: all cores): set for one command with quantize_threads().
THREADS: int | None = None


@contextmanager
def quantize_threads(threads: int | None) -> Iterator[None]:
    """The quantizers use `threads` (None: all cores) inside the block, the previous count after."""
    global THREADS
    before, THREADS = THREADS, threads
    try:
        yield
    finally:
        THREADS = before

# (src, dst, nrows, n_per_row[, importance or NULL])
_DEQUANT_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
_QUANT_ARGS = _DEQUANT_ARGS + [ctypes.c_void_p]


def _kernel(name: str, argtypes):
    fn = getattr(library(), name)
    fn.argtypes, fn.restype = argtypes, None
    return fn


def available(fmt: str) -> bool:
    return fmt in KERNEL_FORMATS and library() is not None


def _row_chunks(nrows: int, threads: int) -> list[tuple[int, int]]:
    step = max(1, -(-nrows // max(1, threads)))
    return [(r, min(r + step, nrows)) for r in range(0, nrows, step)]


def _run(fn, src: np.ndarray, dst: np.ndarray, n_per_row: int, threads: int | None, *extra) -> None:
    threads = threads or os.cpu_count() or 1
    chunks = _row_chunks(src.shape[0], threads)

    def call(lo_hi):
        lo, hi = lo_hi
        fn(src[lo:hi].ctypes.data, dst[lo:hi].ctypes.data, hi - lo, n_per_row, *extra)
    _on_threads(call, chunks)


def _on_threads(call, ranges: list) -> None:
    """call(r) for every range: on the calling thread when there is one, else on the pool."""
    if len(ranges) == 1:
        call(ranges[0])
    elif ranges:
        list(_pool(len(ranges)).map(call, ranges))


_POOL: ThreadPoolExecutor | None = None


def _pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool (a new one per call costs thread starts on every 64 MB chunk)."""
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        _POOL = ThreadPoolExecutor(max_workers=max(workers, os.cpu_count() or 1), thread_name_prefix="nemoq-kernel")
    return _POOL


def quantizer_inputs(fmt: str, block: int, x: np.ndarray, importance: np.ndarray | None):
    """Rows as contiguous float32 (rows, n) and the importance as float32 (n,), checked."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[1]
    if n % block:
        raise ValueError(f"{fmt}: row length {n} is not a multiple of the block size {block}")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (n,):
            raise ValueError(f"{fmt}: importance has shape {importance.shape}, expected ({n},)")
    return x, importance


def quantize_rows(fmt: str, x: np.ndarray, importance: np.ndarray | None = None,
                  threads: int | None = None) -> np.ndarray:
    """float32 (rows, n) -> uint8 (rows, n / block * bytes) with the C kernel of `fmt`.

    importance: one non-negative weight per column (llama.cpp's imatrix) or None; the bytes
    equal nemoq.quant.formats.FORMATS[fmt].quantize(x, importance). Q8_0 ignores it, as ggml.
    """
    block, size = KERNEL_FORMATS[fmt]
    x, importance = quantizer_inputs(fmt, block, x, importance)
    n = x.shape[1]
    out = np.empty((x.shape[0], n // block * size), dtype=np.uint8)
    if x.shape[0]:
        imp = None if importance is None else importance.ctypes.data
        _run(_kernel(f"nemoq_quantize_{fmt}", _QUANT_ARGS), x, out, n, threads, imp)
    return out


WIDEN_PIECE_BYTES = 256 << 10   # float32 rows widened at a time per thread: stays in L2 until quantized


def quantize_half_rows(fmt: str, rows: np.ndarray, source_dtype: str, importance: np.ndarray | None = None,
                       threads: int | None = None) -> np.ndarray:
    """F16 / BF16 rows (as stored) -> block bytes, equal to quantize_rows(fmt, widen(rows)).

    Each thread widens its own rows a few at a time into its own float32 buffer and quantizes
    them while they are still in cache: the widening is spread over the threads, and no whole
    float32 copy of the chunk is written and read back.
    """
    block, size = KERNEL_FORMATS[fmt]
    src = np.ascontiguousarray(rows).reshape(-1, rows.shape[-1])
    n = src.shape[1]
    _, importance = quantizer_inputs(fmt, block, np.empty((0, n), np.float32), importance)
    out = np.empty((src.shape[0], n // block * size), dtype=np.uint8)
    quantize = _kernel(f"nemoq_quantize_{fmt}", _QUANT_ARGS)
    widen_fn = _kernel(WIDEN_SOURCES[source_dtype], _WIDEN_ARGS)
    imp = None if importance is None else importance.ctypes.data
    piece = max(1, WIDEN_PIECE_BYTES // (4 * n))

    def call(lo_hi):
        lo, hi = lo_hi
        buffer = np.empty((min(piece, hi - lo), n), np.float32)
        for r in range(lo, hi, piece):
            m = min(piece, hi - r)
            widen_fn(src[r].ctypes.data, buffer.ctypes.data, m * n)
            quantize(buffer.ctypes.data, out[r].ctypes.data, m, n, imp)
    _on_threads(call, _row_chunks(src.shape[0], threads or os.cpu_count() or 1))
    return out


def dequantize_rows(fmt: str, data: np.ndarray, threads: int | None = None) -> np.ndarray:
    block, size = KERNEL_FORMATS[fmt]
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, data.shape[-1])
    if data.shape[1] % size:
        raise ValueError(f"{fmt}: {data.shape[1]} bytes per row is not a multiple of {size}")
    n = data.shape[1] // size * block
    out = np.empty((data.shape[0], n), dtype=np.float32)
    if data.shape[0]:
        _run(_kernel(f"nemoq_dequantize_{fmt}", _DEQUANT_ARGS), data, out, n, threads)
    return out


# nemoq_scale_errors' formats; the C function takes the ggml type id
SCALE_SEARCH_FORMATS = {name: int(GGMLQuantizationType[name.upper()]) for name in ("mxfp4", "nvfp4")}


def scale_errors(fmt: str, rows: np.ndarray, scales: np.ndarray, importance: np.ndarray | None = None,
                 threads: int | None = None) -> np.ndarray:
    """float64 (rows, candidates): sum_j w_j (deq(quant(row_j / s)) * s - row_j)^2 for each row and
    candidate scale s, w the importance (or ones): quants_fp4.c's nemoq_scale_errors, for
    nemoq.quant.tensor_scale.best_scale. Each row's errors come from one thread, so the sums do
    not depend on `threads`."""
    block, _ = KERNEL_FORMATS[fmt]
    x, importance = quantizer_inputs(fmt, block, rows, importance)
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    errors = np.empty((x.shape[0], len(scales)), np.float64)
    fn = getattr(library(), "nemoq_scale_errors")
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    imp = None if importance is None else importance.ctypes.data

    def call(lo_hi):
        lo, hi = lo_hi
        code = fn(SCALE_SEARCH_FORMATS[fmt], x[lo].ctypes.data, hi - lo, x.shape[1], scales.ctypes.data,
                  len(scales), imp, errors[lo].ctypes.data)
        if code:
            raise RuntimeError(f"nemoq_scale_errors({fmt}) failed with code {code}")
    if len(x):
        _on_threads(call, _row_chunks(len(x), threads or os.cpu_count() or 1))
    return errors


_WIDEN_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
WIDEN_SOURCES = {"F16": "nemoq_widen_f16", "BF16": "nemoq_widen_bf16"}


def widen(rows: np.ndarray, source_dtype: str, out: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """F16 / BF16 storage (uint16 bits for bf16) -> float32, equal to numpy's cast; into `out`
    (float32, at least as many elements) when given, to spare fresh pages."""
    src = np.ascontiguousarray(rows)
    out = np.empty(src.shape, dtype=np.float32) if out is None else out.reshape(-1)[: src.size].reshape(src.shape)
    flat_src, flat_out = src.reshape(-1), out.reshape(-1)
    fn = _kernel(WIDEN_SOURCES[source_dtype], _WIDEN_ARGS)

    def call(lo_hi):
        lo, hi = lo_hi
        fn(flat_src[lo:].ctypes.data, flat_out[lo:].ctypes.data, hi - lo)
    # a large input (a whole expert matrix) is split over the threads, at multiples of 16 values
    workers = (threads or os.cpu_count() or 1) if src.size >= 1 << 20 else 1
    _on_threads(call, [(16 * lo, min(16 * hi, src.size)) for lo, hi in _row_chunks(-(-src.size // 16), workers)])
    return out
