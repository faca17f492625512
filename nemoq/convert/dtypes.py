"""Float encodings of a tensor (F32, F16, BF16) and the checks done while streaming.

An `Encoding` turns whole rows of source data into the bytes of one GGUF type. The quant
package supplies more encodings (Q8_0, ...) on the same protocol, so the converter never needs
to know about block formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType


def to_float32(chunk: np.ndarray, source_dtype: str) -> np.ndarray:
    """Source storage (bf16 as uint16 bits, f16, f32, f64) -> float32 values."""
    if source_dtype == "BF16":
        return (chunk.astype(np.uint32) << 16).view(np.float32)
    return chunk.astype(np.float32, copy=False)


# The casts are numpy only (no torch on the convert path) and give torch's bits for every
# non-NaN value (tests/test_float_casts.py); NaNs come out quiet with their sign and top payload
# bits, as x86's conversion instructions and gguf-py write them, whichever loop numpy ran.
_cast_output = np.empty(0, dtype=np.uint8)
_cast_scratch = np.empty(0, dtype=np.uint8)


def _reused(buffer: np.ndarray, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(buffer, a view of it as `shape` in `dtype`), the buffer grown when too small: a fresh
    64 MiB array per chunk costs page faults. Safe because the converter writes each encoded
    chunk out before encoding the next."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if buffer.nbytes < nbytes:
        buffer = np.empty(nbytes, dtype=np.uint8)
    return buffer, buffer[:nbytes].view(dtype).reshape(shape)


def _reused_output(shape: tuple[int, ...], dtype) -> np.ndarray:
    global _cast_output
    _cast_output, out = _reused(_cast_output, shape, dtype)
    return out


# half type -> (float32 mantissa bits dropped, exponent bits, quiet bit)
HALF_NAN = {"F16": (13, 0x7C00, 0x0200), "BF16": (16, 0x7F80, 0x0040)}


def _quiet_nans(out_bits: np.ndarray, x: np.ndarray, half: str) -> None:
    """Rewrite the NaNs among float32 `x` in `out_bits` (its half precision bits, uint16)."""
    if not _has_non_finite(out_bits.reshape(-1), half):   # NaN and Inf alike: the rare case
        return
    dropped, exponent, quiet = HALF_NAN[half]
    bits = np.ascontiguousarray(x).view(np.uint32).reshape(-1)
    nan = np.flatnonzero((bits & 0x7FFFFFFF) > 0x7F800000)
    b = bits[nan]
    out_bits.reshape(-1)[nan] = ((b >> 16) & 0x8000) | exponent | quiet | ((b & 0x007FFFFF) >> dropped)


def _float32_rows(chunk: np.ndarray, source_dtype: str) -> np.ndarray:
    """float64 goes to float32 first, as in torch's casts: a double then rounds twice, the same way."""
    return np.ascontiguousarray(to_float32(chunk, source_dtype))


def to_float16(chunk: np.ndarray, source_dtype: str) -> np.ndarray:
    """Round to nearest even (values beyond f16's range become inf, as any f16 cast)."""
    x = _float32_rows(chunk, source_dtype)
    out = _reused_output(chunk.shape, np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(out, x, casting="same_kind")
    _quiet_nans(out.view(np.uint16), x, "F16")
    return out


def to_bf16_bits(chunk: np.ndarray, source_dtype: str) -> np.ndarray:
    """Round to nearest even on the float32 bits, as torch's .bfloat16() and gguf-py: add
    0x7FFF plus the lowest kept bit, keep the top 16 (a carry rounds up into the exponent, the
    largest floats to inf). Returned as uint16 bits."""
    global _cast_scratch
    u = _float32_rows(chunk, source_dtype).view(np.uint32)
    _cast_scratch, t = _reused(_cast_scratch, u.shape, np.uint32)
    np.right_shift(u, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(t, u, out=t)                   # wraps only for NaNs, which are rewritten below
    np.right_shift(t, 16, out=t)
    out = _reused_output(chunk.shape, np.uint16)
    np.copyto(out, t, casting="unsafe")
    _quiet_nans(out, u.view(np.float32), "BF16")
    return out


SCAN_ELEMENTS = 1 << 18   # a cache-sized scratch keeps the scan near memory speed


# Storage dtype -> (unsigned view, |bits| at and above which the exponent is all ones: Inf/NaN).
# Comparing bits is 3-4x faster than np.isfinite on half precision.
NON_FINITE_BITS = {
    "BF16": (np.uint16, 0x7F80),
    "F16": (np.uint16, 0x7C00),
    "F32": (np.uint32, 0x7F800000),
}


def _has_non_finite(flat: np.ndarray, source_dtype: str) -> bool:
    view, first = NON_FINITE_BITS.get(source_dtype, (None, 0))
    if view is None or flat.dtype.itemsize != np.dtype(view).itemsize:
        return not all(np.isfinite(flat[i:i + SCAN_ELEMENTS]).all() for i in range(0, flat.size, SCAN_ELEMENTS))
    bits = flat.view(view)
    magnitude = np.iinfo(view).max >> 1
    scratch = np.empty(min(flat.size, SCAN_ELEMENTS), dtype=view)
    for i in range(0, flat.size, SCAN_ELEMENTS):
        part = bits[i:i + SCAN_ELEMENTS]
        np.bitwise_and(part, magnitude, out=scratch[: part.size])
        if scratch[: part.size].max() >= first:
            return True
    return False


def count_non_finite(chunk: np.ndarray, source_dtype: str) -> int:
    """NaN/Inf count in source storage (bf16 as bits); a fast scan first, counting only if needed."""
    if chunk.dtype.kind not in "fu" or chunk.size == 0:
        return 0
    flat = chunk.reshape(-1)
    if not _has_non_finite(flat, source_dtype):
        return 0
    if source_dtype == "BF16":
        return int(np.count_nonzero((flat & 0x7F80) == 0x7F80))
    return int(flat.size - np.count_nonzero(np.isfinite(flat)))


@dataclass(frozen=True)
class Companion:
    """A small F32 tensor that belongs to a weight, such as llama.cpp's `<name>.scale` (one
    multiplier per matrix, applied to the matmul's output). Its values are known only once the
    weight has been encoded, so it is declared up front and written right after the weight."""
    name: str
    shape: tuple[int, ...]
    values: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape))


class Encoding(Protocol):
    """How one tensor's bytes are made; the GGUF writer (pipeline.write_gguf) asks nothing else.

    The writer gets a tensor's bytes in one of three ways: copied from the source file when
    `copies(source dtype)`, made by `chunks()` without reading the source when `makes_bytes`
    (calibrated quantization reads the weights layer by layer on its own), else `encode()` of the
    source rows chunk by chunk. encode() and chunks() may hand out views of a reused buffer: each
    is written before the next is asked for. EncodingBase gives every member but `ggml_type`,
    `encode` and `nbytes` its usual value."""
    ggml_type: GGMLQuantizationType
    makes_bytes: bool              # chunks() makes the tensor's bytes; the source is not read for it
    note: str                      # for the summary: how the tensor was written, if unusual
    warns: bool                    # the note is a warning
    rel_rms_error: float | None    # of a tensor that had to be re-quantized

    def nbytes(self, shape: tuple[int, ...]) -> int: ...

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray: ...

    def copies(self, source_dtype: str) -> bool: ...

    def chunks(self) -> Iterable[np.ndarray]: ...

    def companions(self, tensor) -> tuple[Companion, ...]:
        """Small tensors written right after this one (its `.scale`), declared before any is written."""


class EncodingBase:
    """The usual answers of an Encoding: source rows encoded, no companions, nothing to note."""
    makes_bytes = False
    note = ""
    warns = False
    rel_rms_error = None

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(self.ggml_type, shape)

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} makes its bytes itself (chunks()); it encodes no rows")

    def copies(self, source_dtype: str) -> bool:
        return False

    def chunks(self) -> Iterable[np.ndarray]:
        raise TypeError(f"{type(self).__name__} encodes the source's rows; it makes no bytes of its own")

    def companions(self, tensor) -> tuple[Companion, ...]:
        return ()


def ggml_type(type_name: str | GGMLQuantizationType) -> GGMLQuantizationType:
    """A ggml type from its name in any case ("q4_k", "Q4_K"), or the type itself."""
    return type_name if isinstance(type_name, GGMLQuantizationType) else GGMLQuantizationType[type_name.upper()]


def block_size(type_name: str | GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[ggml_type(type_name)][0]


def type_nbytes(type_name: str | GGMLQuantizationType, shape: tuple[int, ...] | int) -> int:
    """Bytes of a tensor of `shape` (or of n values) in a ggml type: the one place nemoq turns
    a block format into bytes, from gguf-py's GGML_QUANT_SIZES. Whole blocks only: a width that
    is not a multiple of the block counts what llama.cpp could not store (plans use it to price
    the type a tensor could not take)."""
    block, size = GGML_QUANT_SIZES[ggml_type(type_name)]
    n = shape if isinstance(shape, int) else int(np.prod(shape))
    return n // block * size


@dataclass(frozen=True)
class FloatEncoding(EncodingBase):
    ggml_type: GGMLQuantizationType
    convert: Callable[[np.ndarray, str], np.ndarray]   # (rows, source dtype) -> stored values

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(self.ggml_type, shape)

    def copies(self, source_dtype: str) -> bool:
        """True when the stored bytes are the source bytes (bf16 -> BF16, f16 -> F16, ...)."""
        return source_dtype == SOURCE_OF[self.ggml_type]

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        if source_dtype == SOURCE_OF[self.ggml_type]:
            return rows                # same type: the bytes are copied as they are
        return self.convert(rows, source_dtype)


SOURCE_OF = {T.F32: "F32", T.F16: "F16", T.BF16: "BF16"}

FLOAT_ENCODINGS: dict[str, FloatEncoding] = {
    "f32": FloatEncoding(T.F32, to_float32),
    "f16": FloatEncoding(T.F16, to_float16),
    "bf16": FloatEncoding(T.BF16, to_bf16_bits),
}
