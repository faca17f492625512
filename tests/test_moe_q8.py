"""moe_matvec(activations="q8"): llama.cpp's CPU numerics, checked against float64 oracles.

The activations (x for the up phase, each slot's hidden vector for the down phase) are rounded
by the kernel to what ggml pairs with the weights: Q8_0, or Q8_K for the k-quants; the oracles
round the same vectors with nemoq's numpy (equal to ggml's, checked here through libggml too)
and multiply the dequantized stacks in float64.

- Up phase and down phase (fed with given hidden vectors) alone: within 1e-5 of the oracle, as
  the float32 mode. Only the float rounding of the block scales and running sums differs.
- Against llama.cpp itself: for every format each phase equals ggml's own row dots
  (libggml-cpu's vec_dot) on the same activations to 1e-5 (Q8_K made by ggml's own from_float).
- Whole call: the kernel rounds the hidden vectors it computed in float32, the oracle its own
  float64 ones (as float32); where a value sits within float32 noise of a rounding tie (or a
  block's f16 scale of an f16 tie; a Q8_K block's float32 scale follows its max) the two round
  differently. So y may differ by exactly what those different roundings of h make through the
  down matrices: the test computes that bound from the kernel's own hidden vectors
  (moe_hidden), checks that few values change level, and checks y against oracle + bound.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from nemoq.kernels_c import moe
from nemoq.kernels_c.moe import moe_down, moe_hidden, moe_matvec
from nemoq.quant.formats import FORMATS
from nemoq.quant.moe_reference import (Q8_K_WEIGHTS, moe_down_oracle, moe_matvec_oracle, moe_matvec_reference,
                                       moe_up_oracle, quantize_activations)
from tests.ggml_oracle import ggml_quantize
from tests.test_moe_matvec import (N_EXPERTS, RECIPE_PAIRS, TOLERANCE, experts, rel_error, routing, stack, tokens,
                                   with_random_scales)

Q8 = "q8"   # the activations mode
pytestmark = pytest.mark.skipif(not moe.available(), reason="C kernels unavailable")


def q8_blocks(fns: dict, x: np.ndarray) -> np.ndarray:
    """The kernel's quantization of x (rows, n) as ggml Q8_0 blocks: f16 d, 32 int8 q."""
    q, d, *_ = moe._q8(fns, np.ascontiguousarray(x, dtype=np.float32), "q8_0")
    d16 = d.astype(np.float16)
    assert np.array_equal(d16.astype(np.float32), d)   # the scale the kernel uses is the f16 one
    blocks = np.concatenate([d16.reshape(-1, 1).view(np.uint8), q.reshape(-1, 32).view(np.uint8)], axis=1)
    return blocks.reshape(len(x), -1)


def awkward_rows(n: int = 256) -> np.ndarray:
    """Rows with exact rounding ties (max 127 -> d = 1, values k + 0.5), zeros, huge and tiny values."""
    rng = np.random.default_rng(4)
    ties = rng.integers(-126, 126, (2, n)) + np.float32(0.5)
    ties[:, ::32] = 127
    return np.concatenate([ties, np.zeros((1, n)), rng.standard_normal((4, n)) * [[1], [1e-3], [3e4], [1e-6]],
                           rng.standard_t(2, (3, n))]).astype(np.float32)


def test_activations_quantize_as_ggml():
    x = awkward_rows()
    ours = q8_blocks(moe._functions(), x)
    np.testing.assert_array_equal(ours, FORMATS["q8_0"].quantize(x))
    np.testing.assert_array_equal(ours, ggml_quantize(x, GGMLQuantizationType.Q8_0))
    np.testing.assert_array_equal(quantize_activations(x, Q8, "q8_0"), FORMATS["q8_0"].dequantize(ours))


def test_k_quant_activations_quantize_as_ggml_q8_k():
    """Against k-quant weights the kernel's activations are ggml's Q8_K (its from_float, which on
    x86 is quantize_row_q8_K_ref), bit for bit, ties and zero rows included, and so is the numpy."""
    x = awkward_rows(512)
    q, d, ds, s16 = moe._q8(moe._functions(), x, "q4_k")
    blocks = np.stack([ggml_vec_dot("q4_k")[1](row) for row in x]).reshape(-1, Q8_K_BLOCK_BYTES)
    np.testing.assert_array_equal(q.reshape(-1, 256), blocks[:, 4:260].view(np.int8))
    np.testing.assert_array_equal(d.reshape(-1, 8), np.repeat(blocks[:, :4].copy().view(np.float32), 8, axis=1))
    bsums = blocks[:, 260:].copy().view(np.int16).astype(np.float32)
    written = blocks[:, :4].copy().view(np.float32)[:, 0] != 0   # ggml leaves an all-zero block's bsums unset
    assert written.sum() >= len(written) - 2
    np.testing.assert_array_equal(s16.reshape(-1, 16)[written], bsums[written])
    dequantized = (q.reshape(-1, 32) * d.reshape(-1, 1)).reshape(x.shape)
    np.testing.assert_array_equal(quantize_activations(x, Q8, "q4_k"), dequantized)


def weight_rows(up: np.ndarray, down: np.ndarray, pair, ids) -> tuple[dict, dict]:
    return ({e: FORMATS[pair[0]].dequantize(up[e]).astype(np.float64) for e in np.unique(ids)},
            {e: FORMATS[pair[1]].dequantize(down[e]).astype(np.float64) for e in np.unique(ids)})


def tie_flip_bound(h_kernel, h_oracle, ids, w, down_f, down_format: str) -> tuple[np.ndarray, float]:
    """(T, H): |y| the different 8-bit roundings of the two hidden vectors can make, and the share
    of hidden values they round to another level (a Q8_K block's float scale follows its max, so
    there every value may move a little; a level flip moves it by a step)."""
    oracle = quantize_activations(h_oracle.astype(np.float32), Q8, down_format)
    diff = np.abs(quantize_activations(h_kernel, Q8, down_format).astype(np.float64) - oracle)
    block = 256 if down_format in Q8_K_WEIGHTS else 32
    step = np.abs(oracle).reshape(-1, block).max(axis=1, keepdims=True) / 127
    bound = np.stack([sum(abs(wj) * (np.abs(down_f[e]) @ diff[t, j]) for j, (e, wj) in enumerate(zip(ids[t], w[t])))
                      for t in range(len(ids))])
    return bound, float((diff.reshape(-1, block) > step / 2).mean())


def check_against_oracles(pair, n_tokens: int, k: int, threads: int = 2, up=None, down=None, x_scale=1.0):
    if up is None:
        up, down, _ = experts(pair)
    hidden = down.shape[1]
    x, (ids, w) = tokens(n_tokens, hidden) * np.float32(x_scale), routing(n_tokens, k)
    h_oracle = moe_up_oracle(x, ids, up, pair[0], activations=Q8)
    h = moe_hidden(x, ids, w, up, pair[0], threads=threads, activations=Q8)
    assert rel_error(h, h_oracle) <= TOLERANCE                                   # up phase
    y_down = moe_down(h_oracle, ids, w, down, pair[1], threads=threads, activations=Q8)
    assert rel_error(y_down, moe_down_oracle(h_oracle, ids, w, down, pair[1], activations=Q8)) <= TOLERANCE
    y = moe_matvec(x, ids, w, up, down, *pair, threads=threads, activations=Q8)  # whole call
    ref = moe_matvec_oracle(x, ids, w, up, down, *pair, activations=Q8)
    bound, flipped = tie_flip_bound(h, h_oracle, ids, w, weight_rows(up, down, pair, ids)[1], pair[1])
    assert flipped <= 1e-2
    assert np.all(np.abs(y - ref) <= TOLERANCE * np.abs(ref).max() + bound)
    return y, ref


@pytest.mark.parametrize("n_tokens,k", [(1, 6), (16, 6), (3, 2)])
@pytest.mark.parametrize("pair", RECIPE_PAIRS, ids="/".join)
def test_q8_activations_match_float64_oracle(pair, n_tokens, k):
    y, ref = check_against_oracles(pair, n_tokens, k)
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(n_tokens, hidden), routing(n_tokens, k)
    assert rel_error(y, moe_matvec_oracle(x, ids, w, up, down, *pair)) > 1e-4   # not the float32 mode


def test_q8_0_levels_of_minus_128():
    """Q8_0 weights may hold -128 (not ggml's quantizer, but a valid byte): |w| = 128 is fine as
    maddubs' unsigned operand; with the sign moved onto w instead it would wrap."""
    up, down, _ = experts(("q8_0", "q8_0"))
    rng = np.random.default_rng(6)
    up, down = up.copy(), down.copy()
    for stack in (up, down):
        blocks = stack.reshape(-1, 34)
        blocks[:, 2:] = rng.choice(np.array([-128, -127, 127, 0, 5], np.int8), blocks[:, 2:].shape).view(np.uint8)
    check_against_oracles(("q8_0", "q8_0"), 4, 6, up=up, down=down)


@pytest.mark.parametrize("fmt", ["nvfp4", "q4_k", "q5_k", "mxfp4"])
def test_every_scale_code(fmt):
    """Random scale bytes make weights up to ~1000x larger: x is scaled down so that the hidden
    vectors stay within Q8_0's range (block scale max|h| / 127 must fit an f16, as in ggml). Long
    rows where the AVX2 dots decode eight or more scales at once."""
    up, down = long_experts(fmt) if FORMATS[fmt].block_size in LONG_WIDTHS else experts((fmt, fmt))[:2]
    check_against_oracles((fmt, fmt), 3, 6, up=with_random_scales(up, fmt, 11), down=with_random_scales(down, fmt, 12),
                          x_scale=1e-2)


@pytest.mark.parametrize("build_kind", ["native", "portable"])
@pytest.mark.parametrize("activations", ["f32", Q8])
def test_mxfp4_subnormal_scales(portable_moe_functions, monkeypatch, build_kind, activations):
    """E8M0 codes 0 and 1 halve to subnormal floats (2^-128, 2^-127: the AVX2 dots' slower exact
    paths), beside 2: the down phase alone, so that the tiny products are not squared away."""
    if build_kind == "portable":
        monkeypatch.setattr(moe, "_functions", lambda: portable_moe_functions)
    down = long_experts("mxfp4")[1].copy()
    blocks = down.reshape(-1, 17)
    blocks[:, 0] = np.random.default_rng(13).choice(np.array([0, 1, 2], np.uint8), len(blocks))
    hidden = down.shape[1]
    h = np.random.default_rng(14).standard_normal((2, 6, down.shape[2] // 17 * 32)).astype(np.float32) * 1e3
    ids, w = routing(2, 6)
    y = moe_down(h, ids, w, down, "mxfp4", threads=3, activations=activations)
    ref = moe_down_oracle(h, ids, w, down, "mxfp4", activations=activations)
    assert y.shape == (2, hidden) and 1e-37 < np.abs(ref).max() < 1e-30
    assert rel_error(y, ref) <= TOLERANCE


def test_threads_do_not_change_the_result():
    for pair in (("q4_k", "q6_k"), ("nvfp4", "nvfp4"), ("iq4_nl", "q8_0")):
        up, down, hidden = experts(pair)
        x, (ids, w) = tokens(5, hidden), routing(5, 6)
        y1 = moe_matvec(x, ids, w, up, down, *pair, threads=1, activations=Q8)
        for threads in (2, 3, 7):
            np.testing.assert_array_equal(moe_matvec(x, ids, w, up, down, *pair, threads=threads, activations=Q8), y1)


def test_zero_tokens_and_zero_weights():
    pair = ("mxfp4", "mxfp4")
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(4, hidden), routing(4, 3)
    x[1] = 0
    w[2, :] = 0
    y = moe_matvec(x, ids, w, up, down, *pair, activations=Q8)
    assert not y[1].any() and not y[2].any()
    assert not moe_hidden(x, ids, w, up, "mxfp4", activations=Q8)[2].any()


def test_rejects_unknown_activations():
    up, down, hidden = experts(("q8_0", "q8_0"))
    x, (ids, w) = tokens(2, hidden), routing(2, 2)
    with pytest.raises(ValueError, match="activations"):
        moe_matvec(x, ids, w, up, down, "q8_0", "q8_0", activations="q4_0")
    with pytest.raises(ValueError, match="hidden must be"):
        moe_down(np.zeros((2, 3, 5), np.float32), ids, w, down, "q8_0", activations=Q8)


def test_without_the_c_library_falls_back_to_numpy(monkeypatch):
    pair = ("iq4_nl", "q5_0")
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(2, hidden), routing(2, 2)
    monkeypatch.setattr(moe, "_functions", lambda: None)
    y = moe_matvec(x, ids, w, up, down, *pair, activations=Q8)
    np.testing.assert_array_equal(y, moe_matvec_reference(x, ids, w, up, down, *pair, activations=Q8))
    assert rel_error(y, moe_matvec_oracle(x, ids, w, up, down, *pair, activations=Q8)) <= 1e-3


# ---- the plain C (-DNEMOQ_MOE_PORTABLE): same oracles, and the AVX2 build's results ----

@pytest.mark.parametrize("pair", [("q8_0", "q5_0"), ("iq4_nl", "mxfp4"), ("nvfp4", "nvfp4"), ("q4_k", "q5_k"),
                                  ("q6_k", "q6_k")], ids="/".join)
def test_portable_c_matches_oracle_and_avx2(portable_moe_functions, monkeypatch, pair):
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(16, hidden), routing(16, 6)
    h_native = moe_hidden(x, ids, w, up, pair[0], activations=Q8)
    y_native = moe_down(h_native, ids, w, down, pair[1], activations=Q8)
    monkeypatch.setattr(moe, "_functions", lambda: portable_moe_functions)
    check_against_oracles(pair, 16, 6)
    h = moe_hidden(x, ids, w, up, pair[0], activations=Q8)
    # The same integer sums, other float order (the AVX2 k-quant dots also sum a super-block's
    # groups in int32 first): each build is within ~1e-6 of float64 where the Q4_K / Q5_K mins
    # cancel much of the sum, so the two may differ by twice that; a wrong level or scale is >1e-3.
    assert rel_error(h, h_native) <= 3e-6
    assert rel_error(moe_down(h_native, ids, w, down, pair[1], activations=Q8), y_native) <= 3e-6


def test_q8_0_weights_with_minus_128_in_the_portable_build(portable_moe_functions, monkeypatch):
    monkeypatch.setattr(moe, "_functions", lambda: portable_moe_functions)
    test_q8_0_levels_of_minus_128()


def test_scales_apply_per_expert():
    pair = ("nvfp4", "nvfp4")
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(3, hidden), routing(3, 6)
    rng = np.random.default_rng(9)
    up_scale, down_scale = rng.uniform(0.5, 2, N_EXPERTS), rng.uniform(0.5, 2, N_EXPERTS)
    h = moe_hidden(x, ids, w, up, "nvfp4", up_scale=up_scale, activations=Q8)
    assert rel_error(h, moe_up_oracle(x, ids, up, "nvfp4", up_scale, activations=Q8)) <= TOLERANCE
    y = moe_down(h, ids, w, down, "nvfp4", down_scale=down_scale, activations=Q8)
    assert rel_error(y, moe_down_oracle(h, ids, w, down, "nvfp4", down_scale, activations=Q8)) <= TOLERANCE


# ---- llama.cpp's own row dots: ggml-cpu's vec_dot of a weight row with its Q8_0 / Q8_K activations ----

class _CpuTraits(ctypes.Structure):   # ggml-cpu.h: struct ggml_type_traits_cpu
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
Q8_K_BLOCK_BYTES = 4 + 256 + 2 * 16   # block_q8_K: float d, int8 qs[256], int16 bsums[16]


@functools.cache
def ggml_vec_dot(fmt: str):
    """ggml's CPU dot of one `fmt` row with activations as its CPU backend pairs them: Q8_0 rounded
    by nemoq's numpy (ggml's reference rounding; its AVX2 quantizer differs at ties), or Q8_K by
    ggml's own from_float (the reference one on x86). (dot(row, activations, n), quantize(v))."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_cpu_init()
    traits = lib.ggml_get_type_traits_cpu(int(GGMLQuantizationType[fmt.upper()])).contents
    fn = _VEC_DOT(traits.vec_dot)

    def dot(row: np.ndarray, xq: np.ndarray, n: int) -> float:
        s = ctypes.c_float()
        fn(n, ctypes.byref(s), 0, row.ctypes.data, 0, xq.ctypes.data, 0, 1)
        return s.value

    if traits.vec_dot_type == GGMLQuantizationType.Q8_0:
        return dot, lambda v: FORMATS["q8_0"].quantize(v[None])[0]
    assert traits.vec_dot_type == GGMLQuantizationType.Q8_K, traits.vec_dot_type
    from_float = _FROM_FLOAT(lib.ggml_get_type_traits_cpu(int(GGMLQuantizationType.Q8_K)).contents.from_float)

    def quantize_q8_k(v: np.ndarray) -> np.ndarray:
        out = np.empty(len(v) // 256 * Q8_K_BLOCK_BYTES, np.uint8)
        from_float(np.ascontiguousarray(v).ctypes.data, out.ctypes.data, len(v))
        return out
    return dot, quantize_q8_k


def ggml_rows(stack_e: np.ndarray, fmt: str, v: np.ndarray) -> np.ndarray:
    """ggml's dots of every row of one expert with its 8-bit rounding of v (float32)."""
    dot, quantize = ggml_vec_dot(fmt)
    xq = quantize(v.astype(np.float32))
    return np.array([dot(np.ascontiguousarray(row), xq, len(v)) for row in stack_e], np.float32)


def check_against_ggml(fmt: str, up: np.ndarray, down: np.ndarray, hidden: int, threads: int = 2):
    x, (ids, w) = tokens(3, hidden), routing(3, 6)
    h_ggml = np.stack([[np.maximum(ggml_rows(up[e], fmt, x[t]), 0) ** 2 for e in ids[t]] for t in range(3)])
    assert rel_error(moe_hidden(x, ids, w, up, fmt, threads=threads, activations=Q8), h_ggml) <= TOLERANCE
    y_ggml = np.stack([sum(np.float64(wj) * ggml_rows(down[e], fmt, h_ggml[t, j])
                           for j, (e, wj) in enumerate(zip(ids[t], w[t]))) for t in range(3)])
    assert rel_error(moe_down(h_ggml, ids, w, down, fmt, threads=threads, activations=Q8), y_ggml) <= TOLERANCE


@pytest.mark.parametrize("fmt", moe.MOE_FORMATS)
def test_phases_equal_ggml_row_dots(fmt):
    check_against_ggml(fmt, *experts((fmt, fmt)))


# Rows long enough for the AVX2 row dots' wide paths, with what is left over: 32-value blocks eight
# at a time (25 = 3 x 8 + 1, 11 = 8 + 3), MXFP4 in pairs (11 = 8 + a pair + 1), NVFP4 two blocks at
# a time (13 = 6 x 2 + 1, 7); 64-value chunks of the activations split across 3 threads. (The
# k-quants' super-blocks go one at a time: experts() rows of 2 and 1 already cover them.)
LONG_WIDTHS = {32: (800, 352), 64: (832, 448)}


def long_experts(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    hidden, n_ff = LONG_WIDTHS[FORMATS[fmt].block_size]
    return stack(fmt, n_ff, hidden, 3), stack(fmt, hidden, n_ff, 4)


@pytest.mark.parametrize("fmt", [f for f in moe.MOE_FORMATS if FORMATS[f].block_size in LONG_WIDTHS])
def test_long_rows_match_oracles_and_ggml(fmt):
    up, down = long_experts(fmt)
    hidden = down.shape[1]
    check_against_oracles((fmt, fmt), 2, 6, threads=3, up=up, down=down)
    check_against_ggml(fmt, up, down, hidden, threads=3)
    x, (ids, w) = tokens(2, hidden), routing(2, 6)
    y = moe_matvec(x, ids, w, up, down, fmt, fmt, threads=3)    # the float32 mode
    assert rel_error(y, moe_matvec_oracle(x, ids, w, up, down, fmt, fmt)) <= TOLERANCE
