"""convert's F16 / BF16 casts (numpy) give torch's bits on the values where casts go wrong:
ties, subnormals, overflow, infinities; NaNs stay NaN, quiet, with their sign."""

from __future__ import annotations

import numpy as np
import pytest

from nemoq.convert.dtypes import to_bf16_bits, to_float16

torch = pytest.importorskip("torch")

EDGE_BITS = [
    0x00000000, 0x80000000, 0x3F800000, 0xBF800000,
    0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,   # BF16 ties to even (down, up), either side
    0x3F801000, 0x3F803000, 0x3F801001, 0x3F800FFF,   # F16 ties to even (down, up), either side
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000,   # largest floats: BF16 overflow to inf, or not
    0x00000001, 0x80000001, 0x007FFFFF, 0x00008000, 0x00018000, 0x00800000,   # float32 subnormals
    0x7F800000, 0xFF800000,                           # infinities
]
EDGE_VALUES = [
    65504.0, 65519.996, 65520.0, -65520.0, 1e6,       # F16: largest, rounds down to it, overflows
    6.1035156e-05, 6.1035152e-05, 5.9604645e-08, -5.9604645e-08,   # F16: smallest normal, subnormal
    2.9802322e-08, 2.9802326e-08, 8.940697e-08, 1.4901161e-07,     # F16 subnormal ties, either side
    1e-10, -1e-10,                                    # F16 underflow to signed zero
]
NAN_BITS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FC00001, 0xFFFFFFFF, 0x7FA00000]


def edge_values() -> np.ndarray:
    x = np.concatenate([np.array(EDGE_BITS, dtype=np.uint32).view(np.float32),
                        np.array(EDGE_VALUES, dtype=np.float32)])
    rng = np.random.default_rng(0)   # and any bit pattern but NaN, ties among them
    random = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    random[::3] &= 0xFFFF8000         # BF16 ties and near-ties
    random[1::3] &= 0xFFFFF000        # F16 ties and near-ties
    random = random[(random & 0x7FFFFFFF) <= 0x7F800000].view(np.float32)
    return np.concatenate([x, random, np.tile(x, 40)])   # short and long: torch's scalar and vector loops


def torch_bits(x: np.ndarray, dtype) -> np.ndarray:
    return torch.from_numpy(x.copy()).to(dtype).view(torch.int16).numpy().view(np.uint16)


def as_source(x: np.ndarray, source_dtype: str) -> np.ndarray:
    """float32 values stored as `source_dtype` (rounded by torch where it narrows)."""
    if source_dtype == "BF16":
        return torch_bits(x, torch.bfloat16)
    return x.astype({"F32": np.float32, "F16": np.float16, "F64": np.float64}[source_dtype])


def from_source(stored: np.ndarray, source_dtype: str):
    if source_dtype == "BF16":
        return torch.from_numpy(stored.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(stored.copy())


@pytest.mark.parametrize("source_dtype", ["F32", "BF16", "F64"])
def test_f16_cast_equals_torch(source_dtype):
    with np.errstate(over="ignore"):
        stored = as_source(edge_values(), source_dtype)
    ours = to_float16(stored, source_dtype).view(np.uint16)
    theirs = from_source(stored, source_dtype).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("source_dtype", ["F32", "F16", "F64"])
def test_bf16_cast_equals_torch(source_dtype):
    with np.errstate(over="ignore"):
        stored = as_source(edge_values(), source_dtype)
    ours = to_bf16_bits(stored, source_dtype)
    theirs = from_source(stored, source_dtype).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


def test_f64_rounds_through_float32_as_torch():
    """1 + 2^-11 + 2^-40 rounds up to 1 + 2^-10 in one step, to 1.0 through float32 (a tie then)."""
    x = np.full(40, 1 + 2**-11 + 2**-40)
    assert np.all(to_float16(x, "F64") == 1.0)
    assert np.array_equal(to_float16(x, "F64").view(np.uint16), torch_bits(x, torch.float16))


@pytest.mark.parametrize("cast,half,quiet", [(to_float16, "F16", 0x0200), (to_bf16_bits, "BF16", 0x0040)])
def test_nans_stay_quiet_nans_with_their_sign(cast, half, quiet):
    """torch writes some NaNs as 0xFFFF (its vector BF16 loop), so NaNs are checked by rule:
    a NaN, the quiet bit set, the sign and the top payload bits kept (gguf-py's BF16 rule)."""
    bits = np.array(NAN_BITS * 20, dtype=np.uint32)
    out = cast(bits.view(np.float32), "F32").view(np.uint16)
    dropped, exponent = {"F16": (13, 0x7C00), "BF16": (16, 0x7F80)}[half]
    assert np.all(out & exponent == exponent) and np.all(out & quiet)
    assert np.array_equal(out >> 15, bits >> 31)
    below_quiet = np.uint32(quiet - 1)   # the payload bits under the quiet bit: the input's top ones
    assert np.array_equal(out.astype(np.uint32) & below_quiet, ((bits & 0x007FFFFF) >> dropped) & below_quiet)
    assert np.array_equal(torch_bits(bits.view(np.float32), {"F16": torch.float16, "BF16": torch.bfloat16}[half])
                          & exponent, np.full(bits.size, exponent, dtype=np.uint16))   # torch: NaN too
