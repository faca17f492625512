"""The MoE reference kernel (moe.c) and its CUDA twin (moe.cu) against the numpy reference.

Expert stacks are quantized with nemoq's numpy formats, in every format the kernel reads and in
the (up, down) pairs nemoq's recipes give routed experts, at widths where those formats fit:
multiples of 256 for k-quants, of 64 but not 256 for NVFP4, of 32 but not 256 for the 32-value
blocks. The C kernel must be within float32 rounding of the float64 oracle and of the float32
numpy reference (nemoq/quant/moe_reference.py); moe.cu does moe.c's float32 operations in moe.c's
order, so on the CPU (emulated) and on a GPU it must give moe.c's bits.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from nemoq.convert.plan import TensorSpec
from nemoq.kernels_c import cuda, moe
from nemoq.kernels_c.moe import MOE_FORMATS, TYPE_IDS, moe_matvec
from nemoq.quant.formats import FORMATS
from nemoq.quant.moe_reference import moe_matvec_oracle, moe_matvec_reference
from nemoq.quant.recipes import RECIPES, plan_types

pytestmark = pytest.mark.skipif(not moe.available(), reason="C kernels unavailable")

N_EXPERTS = 8
TOLERANCE = 1e-5   # max |kernel - oracle| / max |oracle|

# Nemotron 3 Nano's layer pattern, for the recipes' layer predicates.
PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
KINDS = tuple({"M": "mamba", "E": "moe", "*": "attention"}[c] for c in PATTERN)
FLOAT_TYPES = {"f32", "f16", "bf16"}


def recipe_expert_pairs(hidden: int, n_ff: int) -> set[tuple[str, str]]:
    """(ffn_up_exps type, ffn_down_exps type) of every MoE layer under every recipe, at these widths."""
    pairs = set()
    for recipe in RECIPES.values():
        specs = [TensorSpec(f"blk.{i}.ffn_{part}_exps.weight", shape, False, i, "moe", None, (), ())
                 for i, kind in enumerate(KINDS) if kind == "moe"
                 for part, shape in (("up", (128, n_ff, hidden)), ("down", (128, hidden, n_ff)))]
        typed = plan_types(specs, recipe, KINDS)
        pairs |= {(up.type, down.type) for up, down in zip(typed[::2], typed[1::2])}
    return pairs


# Nemotron 3 Nano's widths (k-quants fall back) and k-quant-friendly ones.
RECIPE_PAIRS = sorted(p for p in recipe_expert_pairs(2688, 1856) | recipe_expert_pairs(4096, 2048)
                      if not set(p) & FLOAT_TYPES)
PAIRS = sorted(set(RECIPE_PAIRS) | {(f, f) for f in MOE_FORMATS})


def widths(pair: tuple[str, str]) -> tuple[int, int]:
    """(H, I) that both formats fit: multiples of 256 with a k-quant, else of 64 / 32 but not 256."""
    blocks = {FORMATS[f].block_size for f in pair}
    return {256: (512, 256), 64: (192, 320), 32: (160, 96)}[max(blocks)]


@lru_cache(maxsize=None)
def stack(fmt: str, rows: int, width: int, seed: int) -> np.ndarray:
    """N_EXPERTS experts of rows x width N(0, 0.05) weights, quantized: uint8 (E, rows, row bytes)."""
    w = np.random.default_rng(seed).standard_normal((N_EXPERTS * rows, width)).astype(np.float32) * 0.05
    return FORMATS[fmt].quantize(w).reshape(N_EXPERTS, rows, -1)


def experts(pair: tuple[str, str]):
    hidden, n_ff = widths(pair)
    return stack(pair[0], n_ff, hidden, 1), stack(pair[1], hidden, n_ff, 2), hidden


def routing(n_tokens: int, k: int, seed: int = 0):
    """Top-k distinct experts per token (so they repeat across tokens) and positive weights."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(N_EXPERTS)[:k] for _ in range(n_tokens)]).astype(np.int32)
    w = rng.uniform(0.1, 1, (n_tokens, k)).astype(np.float32)
    return ids, w / w.sum(axis=1, keepdims=True) * np.float32(2.5)


def tokens(n_tokens: int, hidden: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_tokens, hidden)).astype(np.float32)


def rel_error(y, ref) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def test_the_kernel_reads_every_format_the_recipes_give_experts():
    assert set(MOE_FORMATS) == set(FORMATS)   # a new block format must join the kernel
    assert {f for pair in RECIPE_PAIRS for f in pair} <= set(MOE_FORMATS)
    assert {"q8_0", "q5_1", "q4_k", "q6_k", "mxfp4", "nvfp4"} <= {f for pair in RECIPE_PAIRS for f in pair}
    assert all(moe.library().nemoq_moe_supports(TYPE_IDS[f]) for f in MOE_FORMATS)
    assert not moe.library().nemoq_moe_supports(1)   # F16: not a block format


@pytest.mark.parametrize("k", [1, 6])
@pytest.mark.parametrize("n_tokens", [1, 5])
@pytest.mark.parametrize("pair", PAIRS, ids="/".join)
def test_c_kernel_matches_the_numpy_reference(pair, n_tokens, k):
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(n_tokens, hidden), routing(n_tokens, k)
    y = moe_matvec(x, ids, w, up, down, *pair)
    assert y.dtype == np.float32 and y.shape == (n_tokens, hidden)
    assert rel_error(y, moe_matvec_oracle(x, ids, w, up, down, *pair)) <= TOLERANCE
    assert rel_error(y, moe_matvec_reference(x, ids, w, up, down, *pair)) <= TOLERANCE


@pytest.mark.parametrize("pair", [("q8_0", "q8_0"), ("nvfp4", "nvfp4"), ("q4_k", "q6_k"), ("q5_0", "q5_1")],
                         ids="/".join)
def test_numpy_reference_matches_the_oracle(pair):
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(3, hidden), routing(3, 2)
    assert rel_error(moe_matvec_reference(x, ids, w, up, down, *pair),
                     moe_matvec_oracle(x, ids, w, up, down, *pair)) <= TOLERANCE


def zero_weight_case():
    """Experts 5, 6 and 7 only behind zero weights (one slot of token 0, every slot of token 2),
    their bytes NaN scales: reading them would turn the result into NaN, even times 0."""
    pair = ("q8_0", "q8_0")
    up, down, hidden = experts(pair)
    x = tokens(4, hidden)
    ids = np.array([[0, 5, 1], [2, 3, 4], [6, 7, 5], [1, 0, 3]], np.int32)
    w = np.random.default_rng(4).uniform(0.1, 1, ids.shape).astype(np.float32)
    w[0, 1] = w[2, :] = 0
    poisoned_up, poisoned_down = up.copy(), down.copy()
    poisoned_up[5:] = poisoned_down[5:] = 0x7E   # every f16 scale 0x7E7E: NaN
    return x, ids, w, (up, down), (poisoned_up, poisoned_down), pair


def test_zero_weights_add_nothing_and_their_experts_are_not_read():
    x, ids, w, clean, poisoned, pair = zero_weight_case()
    y = moe_matvec(x, ids, w, *poisoned, *pair)
    assert rel_error(y, moe_matvec_oracle(x, ids, w, *clean, *pair)) <= TOLERANCE
    assert not y[2].any()
    np.testing.assert_array_equal(moe_matvec_reference(x, ids, w, *poisoned, *pair),
                                  moe_matvec_reference(x, ids, w, *clean, *pair))


def test_no_tokens_or_no_slots():
    pair = ("q4_k", "q6_k")
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(2, hidden), routing(2, 3)
    for call in (moe_matvec, *((cuda.emulate_matvec,) if cuda.nvcc() else ())):
        assert call(x[:0], ids[:0], w[:0], up, down, *pair).shape == (0, hidden)
        np.testing.assert_array_equal(call(x, ids[:, :0], w[:, :0], up, down, *pair), np.zeros_like(x))


def test_same_expert_twice_in_one_token():
    pair = ("q5_0", "q5_0")
    up, down, hidden = experts(pair)
    x = tokens(2, hidden)
    ids, w = np.array([[3, 3], [3, 1]], np.int32), np.array([[0.5, 0.25], [1, 0.5]], np.float32)
    assert rel_error(moe_matvec(x, ids, w, up, down, *pair), moe_matvec_oracle(x, ids, w, up, down, *pair)) <= TOLERANCE


def test_per_expert_scales_multiply_each_expert():
    pair = ("nvfp4", "nvfp4")
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(3, hidden), routing(3, 6)
    rng = np.random.default_rng(9)
    scales = {"up_scale": rng.uniform(0.5, 2, N_EXPERTS), "down_scale": rng.uniform(0.5, 2, N_EXPERTS)}
    ref = moe_matvec_oracle(x, ids, w, up, down, *pair, **scales)
    assert rel_error(moe_matvec(x, ids, w, up, down, *pair, **scales), ref) <= TOLERANCE
    assert rel_error(moe_matvec_reference(x, ids, w, up, down, *pair, **scales), ref) <= TOLERANCE
    assert rel_error(moe_matvec(x, ids, w, up, down, *pair), ref) > 1e-2


def test_ids_out_of_range_in_any_integer_type():
    pair = ("q8_0", "q8_0")
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(2, hidden), routing(2, 2)
    for bad in (ids - N_EXPERTS, ids.astype(np.int64) + 2**32, ids.astype(np.uint8) + N_EXPERTS):
        with pytest.raises(ValueError, match="expert ids"):
            moe_matvec(x, bad, w, up, down, *pair)
    np.testing.assert_array_equal(moe_matvec(x, ids.astype(np.int64), w, up, down, *pair),
                                  moe_matvec(x, ids, w, up, down, *pair))


def test_rejects_bad_input():
    pair = ("q8_0", "q8_0")
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(2, hidden), routing(2, 2)
    with pytest.raises(ValueError, match="tokens=2"):
        moe_matvec(x, ids[:1], w[:1], up, down, *pair)
    with pytest.raises(ValueError, match="bytes per row"):
        moe_matvec(x, ids, w, up, down, "q5_0", "q8_0")
    with pytest.raises(ValueError, match="reads"):
        moe_matvec(x, ids, w, up, down, "f16", "q8_0")
    with pytest.raises(ValueError, match="not a multiple"):
        moe_matvec(x[:, :100], ids, w, up, down, *pair)
    with pytest.raises(ValueError, match="one scale per expert"):
        moe_matvec(x, ids, w, up, down, *pair, up_scale=np.ones(3))


def test_without_the_c_library_says_so(monkeypatch):
    pair = ("q8_0", "q8_0")
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(1, hidden), routing(1, 2)
    monkeypatch.setattr(moe, "_function", lambda: None)
    with pytest.raises(RuntimeError, match="C kernels are unavailable"):
        moe_matvec(x, ids, w, up, down, *pair)


# ---- CUDA: built wherever nvcc exists, run on the CPU there, and on a GPU where there is one ----

def _cuda_built():
    if cuda.nvcc() is None:
        pytest.skip("nvcc not found: moe.cu cannot be built here")
    status = cuda.cuda_status()
    assert status.built, status.message
    return status


def test_cuda_status_says_what_is_there():
    status = cuda.cuda_status()
    assert status.nvcc == cuda.nvcc()
    assert status.built == (status.library is not None)
    assert status.devices >= 0 and status.message


def test_cuda_kernel_compiles_where_nvcc_exists():
    _cuda_built()
    assert all(cuda.library().nemoq_moe_cuda_supports(TYPE_IDS[f]) for f in MOE_FORMATS)
    assert not cuda.library().nemoq_moe_cuda_supports(1)


@pytest.mark.parametrize("pair", PAIRS, ids="/".join)
def test_cuda_code_run_on_the_cpu_equals_the_c_kernel(pair):
    """moe.cu's decoders and per-thread sums, run one thread after another on the CPU."""
    _cuda_built()
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(3, hidden), routing(3, 6)
    w[1, 2] = 0
    scales = {"up_scale": np.full(N_EXPERTS, 0.5), "down_scale": np.linspace(0.5, 2, N_EXPERTS)}
    np.testing.assert_array_equal(cuda.emulate_matvec(x, ids, w, up, down, *pair, **scales),
                                  moe_matvec(x, ids, w, up, down, *pair, **scales))


def test_cuda_code_skips_zero_weights():
    _cuda_built()
    x, ids, w, clean, poisoned, pair = zero_weight_case()
    np.testing.assert_array_equal(cuda.emulate_matvec(x, ids, w, *poisoned, *pair),
                                  moe_matvec(x, ids, w, *clean, *pair))


@pytest.mark.parametrize("pair", PAIRS, ids="/".join)
def test_cuda_kernel_on_the_gpu_equals_the_c_kernel(pair):
    status = _cuda_built()
    if not status.usable:
        pytest.skip(f"no GPU to run the CUDA kernel: {status.message}")
    up, down, hidden = experts(pair)
    x, (ids, w) = tokens(16, hidden), routing(16, 6)
    w[3, 1] = 0
    scales = {"down_scale": np.linspace(0.5, 2, N_EXPERTS)}
    np.testing.assert_array_equal(cuda.moe_matvec_cuda(x, ids, w, up, down, *pair, **scales),
                                  moe_matvec(x, ids, w, up, down, *pair, **scales))


# ---- scale bytes of every kind: moe.cu's own decoders against the C dequantizers ----

SCALE_BYTES = {"nvfp4": (36, slice(0, 4)), "q4_k": (144, slice(4, 16)), "q5_k": (176, slice(4, 16)),
               "mxfp4": (17, slice(0, 1)), "q6_k": (210, slice(192, 208))}
# E8M0 codes: the two whose halves are subnormal (0, 1: their own decode path), and a range that
# keeps the weights' products within float32
SCALE_CODES = {"mxfp4": np.r_[0:4, 112:132].astype(np.uint8)}


def with_random_scales(stack: np.ndarray, fmt: str, seed: int) -> np.ndarray:
    """A copy of `stack` whose blocks' scale bytes are random (every UE4M3 code, subnormal ones
    and 0x7F included; every packed 6-bit k-quant scale and min; every Q6_K int8 scale; E8M0
    codes of SCALE_CODES)."""
    block_bytes, where = SCALE_BYTES[fmt]
    blocks = stack.copy().reshape(-1, block_bytes)
    rng = np.random.default_rng(seed)
    shape = (len(blocks), where.stop - where.start)
    blocks[:, where] = (rng.choice(SCALE_CODES[fmt], shape) if fmt in SCALE_CODES
                        else rng.integers(0, 256, shape, dtype=np.uint8))
    if fmt == "nvfp4":   # and each of the 128 codes (top bit ignored) at least once
        codes = blocks[:, where].reshape(-1)
        codes[:256] = np.arange(256, dtype=np.uint8)
        blocks[:, where] = codes.reshape(len(blocks), -1)
    return blocks.reshape(stack.shape)


@pytest.mark.parametrize("fmt", sorted(SCALE_BYTES))
def test_every_scale_code_decodes_alike(fmt):
    pair = (fmt, fmt)
    up, down, hidden = experts(pair)
    up, down = with_random_scales(up, fmt, 11), with_random_scales(down, fmt, 12)
    x, (ids, w) = tokens(3, hidden), routing(3, 6)
    y = moe_matvec(x, ids, w, up, down, *pair)
    assert rel_error(y, moe_matvec_oracle(x, ids, w, up, down, *pair)) <= TOLERANCE
    if cuda.nvcc() is not None:
        _cuda_built()
        np.testing.assert_array_equal(cuda.emulate_matvec(x, ids, w, up, down, *pair), y)
