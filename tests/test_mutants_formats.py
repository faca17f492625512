"""The block formats' contracts that mutation testing (docs/mutation.md) found untested.

Against outside oracles where one exists: ggml's bytes (tests/ggml_oracle.py) on blocks at the
edges of each quantizer's arithmetic, gguf-py's E8M0 / UE4M3 decoders and encoder. Otherwise the
documented interface of nemoq/quant/formats/base.py: quantizers return uint8 rows, the grid
reproduces dequantize, codes and fields unpack with any leading dimensions, and degenerate blocks
(all zero, a scale of exactly 1, tiny or huge values) quantize without numpy warnings, which would
reach the user as stray RuntimeWarnings or, on a cast of NaN, as platform-dependent bytes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from nemoq.quant.formats import FORMATS, Format
from nemoq.quant.formats import mxfp4, nvfp4
from nemoq.quant.formats.base import f16_bytes, f16_round, read_f16
from nemoq.quant.formats.q4_k import Q4_K
from nemoq.quant.formats.q6_k import Q6_K
from nemoq.quant.formats.iq4_nl import KVALUES
from nemoq.quant.formats.search import GROUP_MAX_EPS, Grid
from tests.ggml_oracle import ggml_quantize
from tests.test_formats import NAMES, case_matrix, importance_for

N = 512


def edge_rows() -> np.ndarray:
    """Rows of 512 whose 32-value blocks sit where a quantizer's arithmetic has its edges: scales of
    exactly 1 (Q8_0's max 127, Q4_0's max -8, Q5_0's -16, Q5_1's range 0..31, Q6_K's ...),
    constant blocks, one non-zero value, zero blocks of either sign, and E2M1 midpoints."""
    rng = np.random.default_rng(3)
    ramps = [np.arange(-127, 128, 8.0), np.arange(-8, 8.0), np.arange(-16, 16.0), np.arange(0, 32.0),
             np.arange(-32, 32.0, 2), np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])]
    blocks = []
    for r in ramps:
        b = np.resize(rng.permutation(r), 32)
        b[0] = r[0] if abs(r[0]) >= abs(r[-1]) else r[-1]   # the value of largest magnitude present
        blocks += [b, -b]
    blocks += [np.full(32, 0.75), np.full(32, -3.0), np.eye(32)[5] * 2.5, np.zeros(32), -np.zeros(32)]
    x = np.concatenate(blocks)
    x = np.resize(x, 4 * N).reshape(4, N)
    x[1] *= 1e-3
    x[2] = x[0][::-1] * 64.0
    # blocks whose largest value is ggml's GROUP_MAX_EPS exactly (not "all zero": ggml tests < 1e-15)
    x[3, :64] = np.resize(np.float32(GROUP_MAX_EPS) * np.array([1, -0.5, 0.25, 0], np.float32), 64)
    return np.ascontiguousarray(x, dtype=np.float32)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("name", NAMES)
def test_ggml_port_equals_ggml_on_edge_blocks(name, weighted):
    fmt, x = FORMATS[name], edge_rows()
    imp = importance_for(N) if weighted else None
    ours = fmt.ggml_rows(x, imp)
    ggml = ggml_quantize(x, fmt.ggml_type, imp)
    assert (ours == ggml).all(), f"{name}: {(ours != ggml).any(axis=-1).sum()} rows differ from ggml"


def degenerate_rows() -> np.ndarray:
    x = edge_rows()
    return np.concatenate([x, np.zeros((1, N), np.float32), -np.zeros((1, N), np.float32),
                           np.full((1, N), 1e-30, np.float32), np.full((1, N), 3e4, np.float32)])


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("name", NAMES)
def test_quantizers_return_uint8_rows_and_raise_no_numpy_warnings(name, weighted):
    fmt, x = FORMATS[name], degenerate_rows()
    imp = importance_for(N) if weighted else None
    methods = [fmt.quantize_rows, fmt.ggml_rows] + ([fmt.search_rows] if name != "q8_0" else [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in methods:
            out = method(x, imp)
            assert out.dtype == np.uint8, (method.__name__, out.dtype)
            assert out.shape == (x.shape[0], N // fmt.block_size * fmt.type_size), method.__name__
            y = fmt.dequantize(out)
            assert y.dtype == np.float32 and np.isfinite(y).all(), method.__name__
        assert (fmt.dequantize(fmt.quantize(x[-4:-2], imp)) == 0).all()   # zero rows stay zero


@pytest.mark.parametrize("name", NAMES)
def test_grid_codes_and_fields_describe_the_blocks(name):
    """base.py's anatomy: value = a * code_values[code] + b exactly as dequantize computes it; codes
    and fields read back what with_codes / with_fields write; written levels sorted and unique."""
    fmt = FORMATS[name]
    x = case_matrix("heavy-tailed", 256)[:4, :N]
    blocks = fmt.quantize(x, importance_for(N)).reshape(-1, fmt.type_size)
    a, b = fmt.grid(blocks)
    codes = fmt.codes(blocks)
    assert a.dtype == b.dtype == np.float32
    assert (a * fmt.code_values[codes] + b == fmt.dequantize_blocks(blocks)).all()
    assert (fmt.with_codes(blocks, codes) == blocks).all()
    assert (fmt.with_fields(blocks, *fmt.fields(blocks)) == blocks).all()
    levels, level_codes = fmt.written_levels()
    assert (np.diff(levels) > 0).all() and (fmt.code_values[level_codes] == levels).all()
    other = np.random.default_rng(1).choice(level_codes, codes.shape).astype(np.uint8)
    moved = fmt.with_codes(blocks, other)
    assert (fmt.codes(moved) == other).all()
    assert all((f == g).all() for f, g in zip(fmt.fields(moved), fmt.fields(blocks)))
    # codes and fields of (..., bytes) arrays, whatever the leading dimensions
    lead = blocks.reshape(2, -1, fmt.type_size)
    assert (fmt.unpack_codes(lead[..., fmt.code_bytes]) == codes.reshape(2, -1, fmt.block_size)).all()
    assert (fmt.pack_codes(codes.reshape(2, -1, fmt.block_size)) == lead[..., fmt.code_bytes]).all()


def test_q8_0_never_writes_minus_128():
    levels, _ = FORMATS["q8_0"].written_levels()
    assert levels[0] == -127 and levels[-1] == 127 and len(levels) == 255


def test_e8m0_half_is_gguf_pys_for_every_exponent():
    e = np.arange(256, dtype=np.uint8)
    with np.errstate(over="ignore"):
        ours = mxfp4.e8m0_half(e)
    theirs = quants.MXFP4.e8m0_to_fp32_half(e.astype(np.uint32))
    assert (ours.view(np.uint32) == theirs.view(np.uint32)).all()
    assert (ours[1:255] == np.ldexp(np.float32(1), e[1:255].astype(int) - 128)).all()


def test_ue4m3_decoding_is_gguf_pys_for_every_code():
    codes = np.arange(256, dtype=np.uint8)
    theirs = 2 * quants.NVFP4.ue4m3_to_fp32(codes)   # gguf-py's is halved, for the doubled E2M1 table
    ours = np.array([nvfp4._ue4m3(int(c)) for c in codes], np.float32)
    assert (ours == theirs).all()
    assert (nvfp4.UE4M3 == ours).all()


def test_fp32_to_ue4m3_is_gguf_pys_on_every_code_and_midpoint():
    values = nvfp4.UE4M3[1:0x7F].astype(np.float64)
    mids = (values[1:] + values[:-1]) / 2
    x = np.concatenate([values, mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf),
                        [0, -0.0, -1, 1e-9, 449, 1e6, np.inf]]).astype(np.float32)
    with np.errstate(invalid="ignore"):   # inf and NaN take a discarded branch through a cast
        assert (nvfp4.fp32_to_ue4m3(x) == quants.NVFP4.fp32_to_ue4m3(x)).all()
        assert (nvfp4.fp32_to_ue4m3(x.astype(np.float64)) == nvfp4.fp32_to_ue4m3(x)).all()   # any float input
        assert nvfp4.fp32_to_ue4m3(np.float32(np.nan)) == 0     # ggml: !(x > 0) -> 0


def test_mxfp4_exponent_is_clamped_to_e8m0_for_tiny_blocks():
    """Blocks below 2^-125 need an exponent under 0: E8M0's smallest (0) is written, not a wrapped
    byte (ggml's cast of a negative float there is undefined), and the values stay representable."""
    x = np.full((1, 32), 1e-38, np.float32)
    x[0, ::2] = 6e-39
    for method in (FORMATS["mxfp4"].ggml_rows, FORMATS["mxfp4"].quantize_rows):
        blocks = method(x)
        assert blocks[0, 0] == 0
        y = FORMATS["mxfp4"].dequantize(blocks)
        assert np.abs(y - x).max() < 0.3 * np.abs(x).max()


def test_q6_k_refit_saturates_the_int8_group_scales():
    """Q6_K's group scales are int8: a least-squares refit beyond +-127 / -128 saturates there."""
    L = np.tile(np.arange(-16, 16, dtype=np.float32), 2)[:16, None, None, None] * np.ones((16, 2, 1, 1), np.float32)
    xt = L * np.array([300, -300], np.float32)[None, :, None, None]
    d = np.ones((1, 1), np.float32)
    sc = np.zeros((2, 1, 1), np.float32)
    _, sc, _ = Q6_K.refit(xt, np.ones_like(xt), d, sc, L)
    assert sc[:, 0, 0].tolist() == [127, -128]


def test_iq4_nl_plain_targets_are_the_first_factors_at_each_end():
    """Without importance only plain_factors factors per table end are tried (test_formats.py
    measures that the others never win); with it, all of them."""
    fmt = FORMATS["iq4_nl"]
    assert len(fmt.targets()) == 2 * len(fmt.search_factors)
    assert len(fmt.targets(weighted=False)) == 2 * fmt.plain_factors
    assert fmt.targets(weighted=False) == fmt.targets()[:3] + fmt.targets()[8:11]


def test_a_format_subclass_takes_its_sizes_from_gguf_py():
    class Probe(Format, ggml_type=GGMLQuantizationType.Q4_1):
        pass
    assert Probe.ggml_type == GGMLQuantizationType.Q4_1
    assert (Probe.block_size, Probe.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType.Q4_1]
    assert Probe().name == "q4_1"


@pytest.mark.parametrize("values, step", [(KVALUES, 0.5), (mxfp4.E2M1, 0.25), (np.arange(-8, 8), 0.5)],
                         ids=["iq4_nl", "e2m1", "q4_0"])
def test_grid_lookup_is_the_nearest_level(values, step):
    """Grid's table lookup against a brute-force nearest level, ties up (ggml's best_index_int8)
    or down (best_index_mxfp4), inside and beyond the table's ends."""
    grid = Grid(values, step)
    levels = np.asarray(values, np.float64)
    v = np.concatenate([np.linspace(levels[0] - 20, levels[-1] + 20, 20001), (levels[1:] + levels[:-1]) / 2])
    v = v.astype(np.float32)
    dist = np.abs(v[:, None] - levels[None, :])
    up = dist.shape[1] - 1 - np.argmin(dist[:, ::-1], axis=1)   # the last (largest) of equal distances
    down = np.argmin(dist, axis=1)
    assert (grid.index(v.copy()) == up).all()
    assert (grid.index(v.copy(), ties_down=True) == down).all()
    assert grid(v.copy()).dtype == np.float32 and (grid(v.copy()) == levels[up]).all()


def test_grid_refuses_levels_off_its_step_and_tables_too_large():
    with pytest.raises(AssertionError, match="^midpoints must lie on the step$"):
        Grid([0, 1, 2.5], 0.5)
    Grid([0, 2**16 - 4], 1.0)            # a table of 2^16 - 1 cells: index() takes uint16
    with pytest.raises(AssertionError):
        Grid([0, 2**16 - 2], 1.0)        # 2^16 + 1 cells


def test_mxfp4_largest_exponent_dequantizes_to_inf_quietly_as_gguf_py():
    """E8M0 255 times the largest E2M1 code overflows float32: inf, as ggml and gguf-py give."""
    block = np.array([[255] + [0x77] * 16], np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = FORMATS["mxfp4"].dequantize(block)
    with np.errstate(over="ignore"):
        theirs = quants.dequantize(block, GGMLQuantizationType.MXFP4)
    assert np.isinf(ours).all() and (ours == theirs).all()


# Found by the full run of the formats group (docs/mutation.md).

@pytest.mark.parametrize("name", NAMES)
def test_quantize_reads_any_float_rows_as_float32(name):
    """quantize casts its input to float32 first: float16 and float64 rows give the bytes of their
    float32 values (computing in the input's own precision would round differently from ggml)."""
    fmt = FORMATS[name]
    x16 = case_matrix("heavy-tailed", 256)[:4, :N].astype(np.float16)
    x32 = x16.astype(np.float32)
    for imp in (None, importance_for(N)):
        want = fmt.quantize(x32, imp)
        assert (fmt.quantize(x16, imp) == want).all(), "float16 input"
        assert (fmt.quantize(x32.astype(np.float64), imp) == want).all(), "float64 input"
    assert (fmt.quantize(x32, importance_for(N).astype(np.float64)) == want).all(), "float64 importance"


@pytest.mark.parametrize("name", NAMES)
def test_quantizers_do_not_depend_on_the_importance_scale(name):
    """Scaling the importance by a power of two scales every weighted sum exactly, so every choice
    and every byte stays the same, however small the sums get (K-quant refits test D > 0, not D > 1)."""
    fmt, x, imp = FORMATS[name], case_matrix("heavy-tailed", 256)[:4, :N], importance_for(N)
    methods = [fmt.quantize_rows] + ([fmt.search_rows] if name != "q8_0" else [])
    for method in methods:
        want = method(x, imp)
        for s in (2.0**-10, 2.0**10):
            assert (method(x, imp * np.float32(s)) == want).all(), (method.__name__, s)


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_rejects_a_partial_block_naming_the_row_length(name):
    fmt = FORMATS[name]
    data = np.zeros((2, 3, fmt.type_size + 1), np.uint8)
    message = f"^{name}: {fmt.type_size + 1} bytes per row is not a multiple of {fmt.type_size}$"
    with pytest.raises(ValueError, match=message):
        fmt.dequantize(data)


def test_f16_round_is_the_value_f16_bytes_stores():
    """As float32, whatever the input type: a float64 just above a half-precision tie rounds to the
    tie in float32 first, then to even, as ggml's float32 scales do (not up, as a direct cast would)."""
    d = np.array([1 + 2.0**-11 + 2.0**-40, 3e-8, 0.1, -65504.0, 1e-3], np.float64)
    for v in (d, d.astype(np.float32)):
        r = f16_round(v)
        assert r.dtype == np.float32
        assert (r == read_f16(f16_bytes(v))).all()
    assert f16_round(d)[0] == 1.0


def test_best_of_takes_weights_per_row():
    """best_of's weights may differ per row (rows, n): each row's pick follows its own weights."""
    fmt = FORMATS["q8_0"]
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    left, right = x.copy(), x.copy()
    left[:, 16:32] = left[:, 48:] = 0     # exact on the first half of each block
    right[:, :16] = right[:, 32:48] = 0   # ... on the second half
    a, b = fmt.quantize_rows(left, None), fmt.quantize_rows(right, None)
    halves = np.tile(np.repeat(np.eye(2, dtype=np.float32), 16, axis=1), 2)   # row 0: first halves
    best = fmt.best_of(x, halves, a, b)
    assert (best[0] == a[0]).all() and (best[1] == b[1]).all()
    assert (fmt.best_of(x, halves[::-1], a, b) == np.stack([b[0], a[1]])).all()


def test_q4_k_refit_keeps_scales_and_mins_in_six_bits():
    """Q4_K's refit rounds the least-squares group scales and mins to the 6-bit fields 0..63: levels
    that fall as x rises fit a negative scale, which is stored as 0."""
    v = np.arange(32, dtype=np.float32)
    xt = np.broadcast_to(v[:, None, None, None], (32, 8, 1, 1)).copy()
    falling = np.broadcast_to(((31 - v) // 2)[:, None, None, None], xt.shape).copy()
    d, dmin = np.full((1, 1), 0.01, np.float32), np.ones((1, 1), np.float32)
    sc, m = np.ones((8, 1, 1), np.float32), np.zeros((8, 1, 1), np.float32)
    _, _, sc, m, _ = Q4_K().refit(xt, np.ones_like(xt), d, dmin, sc, m, falling, iters=1)
    assert (sc == 0).all() and ((0 <= m) & (m <= 63)).all(), (sc.ravel(), m.ravel())
    # rising levels under an offset of +-100: the fitted -min is -100 (stored 0) or 100 (stored 63)
    rising = falling[::-1].copy()
    for offset, want in ((100, 0), (-100, 63)):
        _, _, _, m2, _ = Q4_K().refit(xt + offset, np.ones_like(xt), d, dmin, sc, m, rising, iters=1)
        assert (m2 == want).all(), (offset, m2.ravel())


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
def test_q6_k_largest_group_scale_of_exactly_group_max_eps_is_ggmls(weighted):
    """ggml zeroes a Q6_K super-block whose largest group scale is below GROUP_MAX_EPS (strictly),
    whatever its values. One value of 32 GROUP_MAX_EPS: with weights 1 its group scale is exactly
    GROUP_MAX_EPS, and the scales and levels are kept (d rounds to +-0 in half); with ggml's plain
    weights x^2 the fit's products lose bits and the scale falls just below, zeroing the block."""
    x = np.zeros((2, 256), np.float32)
    x[0, 0], x[1, 100] = 32 * GROUP_MAX_EPS, -32 * GROUP_MAX_EPS   # one value: group scale -x / 32
    imp = np.ones(256, np.float32) if weighted else None
    ours = FORMATS["q6_k"].ggml_rows(x, imp)
    assert (ours == ggml_quantize(x, GGMLQuantizationType.Q6_K, imp)).all()


@pytest.mark.parametrize("name", ["q4_k", "q5_k"])
def test_k_quants_with_a_tiny_imatrix_are_ggmls(name):
    """make_qp_quants' coordinate descent moves a level whenever the rest of the super-block has any
    weight, however small: an imatrix of magnitude 1e-9 still gives ggml's bytes."""
    fmt, x = FORMATS[name], case_matrix("heavy-tailed", 256)[:4, :N]
    imp = importance_for(N) * np.float32(1e-9)
    assert (fmt.ggml_rows(x, imp) == ggml_quantize(x, fmt.ggml_type, imp)).all()


def test_q5_1_search_levels_are_the_nearest_for_the_stored_scale_and_min():
    """Q5_1's search re-rounds its levels for d and m as stored in half precision, a stored d of
    exactly 1.0 included: blocks of unit-spaced values where the search's d rounds to 1."""
    rng = np.random.default_rng(35)
    x = np.arange(32) + rng.uniform(-0.49, 0.49, (64, 32)) + rng.uniform(-3, 3, (64, 1))
    x = x.astype(np.float32)
    fmt = FORMATS["q5_1"]
    blocks = fmt.search_rows(x, None).reshape(-1, fmt.type_size)
    d, m = fmt.fields(blocks)
    assert (d == 1).any()   # row 23
    nearest = np.clip(np.rint((x - m[:, None]) / d[:, None]), 0, 31)
    assert (fmt.codes(blocks) == nearest).all()


def nearly_flat_rows() -> np.ndarray:
    """Rows whose groups of 32 hold one value, some of them a few ulps apart: the levels come out
    all equal, and D = sum(w) sum(w l^2) - sum(w l)^2 of the scale-and-min fit is 0."""
    rng = np.random.default_rng(0)
    c = rng.uniform(0.1, 10, (64, 1, 1)) * rng.choice([-1, 1], (64, 1, 1))
    ulps = rng.integers(0, 3, (64, 8, 32)) * rng.integers(0, 2, (64, 8, 1)) * 2.0**-23
    return (c * (1 + ulps)).reshape(64, 256).astype(np.float32)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q5_1"])
def test_scale_and_min_fits_of_nearly_flat_groups_are_ggmls(name, weighted):
    """make_qkx_quants takes a refit only where D > 0 (ggml's test): at D = 0 its min is a division
    by zero whose sign decides whether the min is clamped to 0."""
    fmt, x = FORMATS[name], nearly_flat_rows()
    imp = importance_for(256) if weighted else None
    assert (fmt.ggml_rows(x, imp) == ggml_quantize(x, fmt.ggml_type, imp)).all()
