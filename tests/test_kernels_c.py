"""The C kernels build, load, and equal the numpy references bit for bit."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest

from nemoq import kernels_c
from nemoq.quant.formats import FORMATS

ROWS, N = 12, 1024   # 4 super-blocks or 32 blocks a row: all of numpy's paths, fast
RNG = np.random.default_rng(1)


def _outlier_columns() -> np.ndarray:
    x = RNG.standard_normal((ROWS, N)).astype(np.float32)
    x[:, RNG.choice(N, 24, replace=False)] *= 50
    return x


def _sparse() -> np.ndarray:
    x = RNG.standard_normal((ROWS, N)).astype(np.float32)
    x[:, ::3] = 0
    x[:3, :256] = 0          # whole blocks and groups of zeros among non-zero ones
    x[3, :512:2] = -0.0
    return x


def _half_way() -> np.ndarray:
    """Blocks of 32 whose largest |x| is 127 and the rest k + 1/2: Q8_0's x / d lands exactly
    half-way between levels (rounded away from zero, as C's roundf)."""
    x = RNG.choice(np.arange(-127, 127) + np.float32(0.5), (4, N)).astype(np.float32)
    x[:, ::32] = RNG.choice([-127.0, 127.0], (4, N // 32))
    return x


INPUTS = {
    "gaussian": RNG.standard_normal((ROWS, N)).astype(np.float32),
    "heavy-tailed": RNG.standard_t(2, (ROWS, N)).astype(np.float32),
    "outlier-columns": _outlier_columns(),
    "zeros": np.zeros((3, N), np.float32),
    "tiny": (RNG.standard_normal((4, N)) * 1e-6).astype(np.float32),
    "sparse": _sparse(),
    "positive": RNG.random((4, N)).astype(np.float32),
    "large": (RNG.standard_normal((4, N)) * 3e3).astype(np.float32),
    "half-way": _half_way(),
}


def _importance() -> np.ndarray:
    w = (RNG.random(N) ** 8 * 1e3).astype(np.float32)   # spans many orders of magnitude
    w[RNG.random(N) < 0.2] = 0                         # and ignores some columns outright
    w[:32] = 0                                         # a whole block without weight
    return w


IMPORTANCE = {"none": None, "imatrix": _importance()}


@functools.cache
def numpy_quantize(fmt: str, case: str, imp: str) -> np.ndarray:
    with np.errstate(over="ignore"):   # "large" overflows a float32 comparison, in C alike
        return FORMATS[fmt].quantize(INPUTS[case], IMPORTANCE[imp])


def test_kernels_build_here():
    status = kernels_c.status()
    assert status.available, status.message
    assert status.library is not None and status.library.exists()


def test_every_format_has_a_kernel_with_the_numpy_layout():
    assert set(kernels_c.KERNEL_FORMATS) == set(FORMATS)
    for name, (block, size) in kernels_c.KERNEL_FORMATS.items():
        assert (block, size) == (FORMATS[name].block_size, FORMATS[name].type_size)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("imp", IMPORTANCE)
@pytest.mark.parametrize("case", INPUTS)
@pytest.mark.parametrize("fmt", sorted(kernels_c.KERNEL_FORMATS))
def test_kernel_equals_numpy(fmt, case, imp, threads):
    ref = numpy_quantize(fmt, case, imp)
    ours = kernels_c.quantize_rows(fmt, INPUTS[case], IMPORTANCE[imp], threads=threads)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(kernels_c.dequantize_rows(fmt, ours, threads=threads),
                                  FORMATS[fmt].dequantize(ours))


@pytest.mark.parametrize("fmt", sorted(kernels_c.KERNEL_FORMATS))
def test_short_rows_equal_numpy(fmt):
    """Rows of 1 to 9 blocks (the C searches 8 blocks at a time, so the last lanes go unused),
    and single rows of one block, where numpy's reductions change order unless spelt out."""
    block = FORMATS[fmt].block_size
    rng = np.random.default_rng(2)
    for trial in range(36):
        k = 1 + trial % 9
        x = rng.standard_t(3, (1 if trial % 4 < 2 else 5, block * k)).astype(np.float32)
        imp = None if trial % 2 else (rng.random(block * k) ** 4).astype(np.float32)
        np.testing.assert_array_equal(kernels_c.quantize_rows(fmt, x, imp, threads=1),
                                      FORMATS[fmt].quantize(x, imp), err_msg=f"trial {trial}")


@pytest.mark.parametrize("fmt", sorted(kernels_c.KERNEL_FORMATS))
def test_dequantize_any_bytes_equals_numpy(fmt):
    """Bytes the quantizers never write (NaN scales, E8M0 255, UE4M3 codes above 0x7E) too."""
    size = FORMATS[fmt].type_size
    data = np.random.default_rng(3).integers(0, 256, (5, 8 * size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = FORMATS[fmt].dequantize(data)
    np.testing.assert_array_equal(kernels_c.dequantize_rows(fmt, data, threads=2), ref)


def test_tables_in_the_c_source_match_the_numpy_modules():
    from nemoq.quant.formats import iq4_nl, mxfp4, q4_0, q6_k

    folder = Path(kernels_c.__file__).parent
    source = "\n".join(p.read_text() for p in sorted([*folder.glob("quants*.c"), *folder.glob("*.h")]))

    def table(name):
        body = re.search(rf"\b{name}\[\d+\] = \{{(.*?)\}};", source, re.S).group(1)
        return [float.fromhex(v) if "0x" in v else float(v) for v in body.replace("\n", " ").split(",")]

    assert table("KVALUES_IQ4_NL") == iq4_nl.KVALUES.tolist()
    assert table("KVALUES_FP4") == mxfp4.KVALUES.tolist()
    for name, grid in {"MIDS_IQ4_NL": iq4_nl.GRID, "MIDS_E2M1": mxfp4.E2M1_GRID}.items():
        mids = (grid.values[1:] + grid.values[:-1]) / 2 / grid.step
        assert table(name) == mids.tolist(), name
        # the count of midpoints is the table's level, cell by cell (and ties_down for E2M1)
        cells = np.arange(grid.lo, grid.lo + len(grid.lut))
        np.testing.assert_array_equal((mids[None, :] <= cells[:, None]).sum(axis=1), grid.lut)
    targets = {
        "TARGETS_Q4_0": q4_0.Q4_0.nmax * q4_0.Q4_0.search_factors,
        "TARGETS_Q5_0": FORMATS["q5_0"].nmax * FORMATS["q5_0"].search_factors,
        "TARGETS_IQ4_NL": iq4_nl.IQ4_NL().targets(),
        "TARGETS_Q6_K": 32 * q6_k.Q6_K.search_factors,
    }
    for name, values in targets.items():
        assert table(name) == [float(v) for v in values], name


def test_importance_is_checked():
    x = INPUTS["gaussian"]
    with pytest.raises(ValueError, match="importance"):
        kernels_c.quantize_rows("q4_k", x, np.ones(N - 1, np.float32))
    with pytest.raises(ValueError, match="multiple"):
        kernels_c.quantize_rows("q4_k", x[:, :N - 32])
    assert kernels_c.quantize_rows("q6_k", x[:0]).shape == (0, N // 256 * 210)


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    from nemoq.kernels_c import build
    build._load.cache_clear()
    monkeypatch.setattr(build, "compiler", lambda: None)
    monkeypatch.delattr(build.library, "_warned", raising=False)
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert build.library() is None
        assert not build.status().available
    finally:
        build._load.cache_clear()


def test_info_kernels_reports_the_library():
    from tests.conftest import run_cli
    result = run_cli("info", "--kernels")
    assert result.exit_code == 0, result.output
    assert "built" in result.output and "q8_0" in result.output
    from nemoq.kernels_c import moe
    out = " ".join(result.output.split())
    assert f"MoE reference matvec: {', '.join(moe.MOE_FORMATS)} ({moe.row_dots()})" in out


def test_widen_equals_numpy_for_every_half_and_bfloat16_value():
    bits = np.arange(1 << 16, dtype=np.uint16)
    f16 = kernels_c.widen(bits.view(np.float16), "F16")
    ref = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(f16.view(np.uint32), ref.view(np.uint32))
    bf16 = kernels_c.widen(bits, "BF16")
    np.testing.assert_array_equal(bf16.view(np.uint32), bits.astype(np.uint32) << 16)
    # above 1M values the work is split over threads, at multiples of 16: an odd length, 3 threads
    many = np.resize(bits, (1 << 20) + 37)
    np.testing.assert_array_equal(kernels_c.widen(many, "BF16", threads=3).view(np.uint32), many.astype(np.uint32) << 16)


def test_iq4_nl_every_table_cell_equals_numpy():
    """IQ4_NL looks its levels up in a table of cells floor(2 v); blocks whose values sweep the
    whole range relative to their largest (and far past the table in the refits) hit every cell."""
    rng = np.random.default_rng(4)
    sweep = np.linspace(-1, 1, 31, dtype=np.float32)
    x = np.concatenate([sweep[None, :] * rng.uniform(0.5, 2, (256, 1)).astype(np.float32),
                        rng.standard_normal((256, 1)).astype(np.float32)], axis=1)   # 32 per block
    x[::7, 5] = 1e4                                                                  # lone outliers
    x = x.reshape(16, -1)
    for imp in (None, (rng.random(x.shape[1]) ** 4).astype(np.float32)):
        np.testing.assert_array_equal(kernels_c.quantize_rows("iq4_nl", x, imp, threads=1),
                                      FORMATS["iq4_nl"].quantize(x, imp))


@pytest.mark.parametrize("source", ["F16", "BF16"])
@pytest.mark.parametrize("fmt", ["q8_0", "q5_0", "iq4_nl", "q4_k"])
def test_quantizing_half_rows_equals_widening_first(fmt, source, monkeypatch):
    """Threads that widen their own rows a few at a time make the bytes of widen-then-quantize."""
    monkeypatch.setattr(kernels_c, "WIDEN_PIECE_BYTES", 3 * 4 * N)   # 3 rows a piece: pieces end mid-chunk
    x = INPUTS["heavy-tailed"][:11]
    stored = x.astype(np.float16) if source == "F16" else (x.view(np.uint32) >> 16).astype(np.uint16)
    for imp in IMPORTANCE.values():
        expected = kernels_c.quantize_rows(fmt, kernels_c.widen(stored, source), imp, threads=1)
        for threads in (1, 3):
            np.testing.assert_array_equal(kernels_c.quantize_half_rows(fmt, stored, source, imp, threads), expected)


def test_portable_build_drops_the_native_flags(monkeypatch):
    from nemoq.kernels_c import build
    monkeypatch.setenv("NEMOQ_PORTABLE_KERNELS", "1")
    assert not any("native" in f for f in build.flags())
    monkeypatch.delenv("NEMOQ_PORTABLE_KERNELS")
    native = build.NATIVE_FLAGS.get((build.platform.system(), build.platform.machine()), [])
    assert all(f in build.flags() for f in native)
