"""ModelOpt's NVFP4 and FP8 storage as numpy: dequantize, and repack NVFP4 into ggml's blocks.

NVFP4 (ModelOpt): `weight` uint8 (out, in/2), two E2M1 values per byte, element 2i in the low
nibble and 2i+1 in the high one; `weight_scale` float8_e4m3fn (out, in/16), one per 16-value
group; `weight_scale_2` a float32 scalar. Value = e2m1 * weight_scale * weight_scale_2.

ggml's NVFP4 block (64 values, 36 bytes): 4 UE4M3 scale bytes (E4M3 without the sign bit),
then per 16-value group 8 bytes where byte j holds value j (low nibble) and j + 8 (high).
The nibble codes (sign bit + 3-bit magnitude index) are the same in both, so the repack only
moves nibbles and strips the scales' (always clear) sign bit: the values are kept bit for bit.

FP8 (ModelOpt): `weight` float8_e4m3fn (out, in), `weight_scale` float32, one per tensor or
one per output row. Value = float32(fp8) * weight_scale.
"""

from __future__ import annotations

import numpy as np

from nemoq.errors import NemoqError

GROUP = 16
GGML_BLOCK, GGML_BLOCK_BYTES = 64, 36
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def _e4m3fn(code: int) -> float:
    """float8_e4m3fn: 4 exponent bits (bias 7), 3 mantissa bits, no infinities, S.1111.111 is NaN."""
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 7
    if exp == 15 and man == 7:
        return float("nan")
    return sign * (man * 2.0**-9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))


E4M3 = np.array([_e4m3fn(c) for c in range(256)], dtype=np.float32)
# The UE4M3 scales ggml can hold (codes 0..0x7E; ggml reads 0x7F as zero), increasing with the code.
UE4M3_CODES = np.arange(0x7F, dtype=np.uint8)
UE4M3_VALUES = E4M3[:0x7F].astype(np.float64)
BAD_SCALE = 0x80   # sign bit: a negative scale (or -0) has no UE4M3 code


def dequantize_nvfp4(packed: np.ndarray, scale_codes: np.ndarray, scale_2: float) -> np.ndarray:
    """(rows, in/2) uint8, (rows, in/16) E4M3 bits, scalar -> (rows, in) float32, in ModelOpt's order
    of operations: (e2m1 * weight_scale) * weight_scale_2."""
    rows = packed.shape[0]
    values = np.empty((rows, packed.shape[1] * 2), dtype=np.float32)
    values[:, 0::2] = E2M1[packed & 0xF]
    values[:, 1::2] = E2M1[packed >> 4]
    scaled = values.reshape(rows, -1, GROUP) * E4M3[scale_codes][..., None]
    return (scaled * np.float32(scale_2)).reshape(rows, -1)


def dequantize_fp8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(rows, in) E4M3 bits times a per-tensor () / (1,) or per-row (rows,) / (rows, 1) scale."""
    scale = np.asarray(scale, dtype=np.float32)
    per_row = scale.reshape(-1, 1) if scale.size > 1 else scale.reshape(1, 1)
    return E4M3[codes] * per_row


def check_scales(scale_codes: np.ndarray, what: str, path) -> None:
    """A NaN or negative block scale cannot be kept in UE4M3 (ggml would read it as another value)."""
    bad = (scale_codes & 0x7F) == 0x7F
    if bad.any():
        raise NemoqError(f"{what}: {int(bad.sum())} NaN block scale(s)", path)
    negative = (scale_codes & BAD_SCALE) != 0
    if negative.any():
        raise NemoqError(f"{what}: {int(negative.sum())} negative block scale(s); ModelOpt's are >= 0", path)


def fold_scale_2(scale_codes: np.ndarray, scale_2: float) -> np.ndarray | None:
    """A lookup table code -> UE4M3 code of (scale * scale_2), or None unless every scale present
    times scale_2 is exactly a UE4M3 value (e.g. scale_2 a power of two and nothing over- or
    underflowing). Exact products keep every dequantized value bit for bit."""
    used = np.unique(scale_codes)
    product = E4M3[used].astype(np.float64) * float(np.float32(scale_2))  # exact: 4 x 24 significant bits
    at = np.clip(np.searchsorted(UE4M3_VALUES, product), 0, len(UE4M3_VALUES) - 1)
    if not np.array_equal(UE4M3_VALUES[at], product):
        return None
    table = np.zeros(256, dtype=np.uint8)
    table[used] = UE4M3_CODES[at]
    return table


def repack_nvfp4(packed: np.ndarray, scale_codes: np.ndarray) -> np.ndarray:
    """ModelOpt (rows, in/2) nibbles and (rows, in/16) scale codes -> ggml NVFP4 rows (rows, in/64*36)."""
    rows = packed.shape[0]
    # Per 16-value group, ModelOpt byte k holds values 2k, 2k+1; ggml byte j holds values j and
    # j + 8, which sit in ModelOpt bytes j // 2 and 4 + j // 2, in the same nibble. Four bytes
    # at a time (little-endian uint32s): the first and second half of each group's 8 bytes.
    halves = np.ascontiguousarray(packed).reshape(rows, -1, 2, 4).view("<u4")[..., 0]
    first, second = halves[..., 0], halves[..., 1]
    even = (first & 0x0F0F0F0F) | ((second & 0x0F0F0F0F) << 4)    # ggml bytes 0, 2, 4, 6
    odd = ((first >> 4) & 0x0F0F0F0F) | (second & 0xF0F0F0F0)     # ggml bytes 1, 3, 5, 7
    as_bytes = [h.astype("<u4", copy=False).view(np.uint8).reshape(*h.shape, 4) for h in (even, odd)]
    qs = np.stack(as_bytes, axis=-1).reshape(rows, -1, 32)
    scales = (scale_codes & 0x7F).reshape(rows, -1, 4)
    return np.concatenate([scales, qs], axis=-1).reshape(rows, -1)
