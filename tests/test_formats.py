"""Block formats against ggml itself (libggml through ctypes) and gguf-py.

- dequantize equals gguf-py's bit for bit, on random valid blocks, on our output and on ggml's;
- each format's port of ggml's quantizer (Format.ggml_rows) gives ggml_quantize_chunk's bytes on
  every block, with and without an importance vector; Q8_0's quantize is that port;
- every other format's quantizer has a (importance-)weighted squared error no larger than
  ggml's on the same tensor (by construction: see test_format_searches.py for the search alone).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from nemoq.quant.formats import FORMATS
from tests.ggml_oracle import ggml_quantize

NAMES = ["q8_0", "q5_1", "q5_0", "q4_0", "iq4_nl", "q4_k", "q5_k", "q6_k", "mxfp4", "nvfp4"]
ROWS, N = 24, 1024  # N is a multiple of every block size (256 for the k-quants)
SLACK = 1e-6  # relative, for float rounding only
TINY_MODEL = Path(__file__).resolve().parent / "data" / "nemotron-tiny"


def gaussian(rng, block_size):
    return rng.standard_normal((ROWS, N))


def heavy_tailed(rng, block_size):
    return np.concatenate([rng.standard_t(2, (ROWS // 2, N)), rng.standard_t(3, (ROWS // 2, N))])


def outlier_columns(rng, block_size):
    x = rng.standard_normal((ROWS, N)) * 0.02
    x[:, rng.choice(N, 6, replace=False)] *= 100
    return x


def zeros_and_spikes(rng, block_size):
    """All-zero blocks, blocks with a single value, constant blocks, tiny values."""
    x = np.zeros((ROWS, N))
    x[::2, rng.choice(N, 40, replace=False)] = rng.standard_normal((ROWS // 2, 40))
    x[1::4, 256:512] = 0.75
    x[3::4, 512:768] = rng.standard_normal((ROWS // 4, 256)) * 1e-6
    return x


def signed_zeros(rng, block_size):
    """Mostly zeros of either sign (a product with 0 keeps the sign), so whole blocks of -0 and +0."""
    return rng.standard_normal((ROWS, N)) * (rng.random((ROWS, N)) < 0.05)


def small_and_large(rng, block_size):
    """Rows of tiny (1e-5) and large (3e3) values: scales far from 1 in either direction."""
    return rng.standard_normal((ROWS, N)) * np.where(np.arange(ROWS) % 2, 1e-5, 3e3)[:, None]


def single_block(rng, block_size):
    """One row of one 256-value block: numpy reduces over axes of length 1 in other orders."""
    return rng.standard_t(3, (1, 256))


def real_weights(rng, block_size):
    """Rows of two different kinds of matrix of the trained tiny model (bf16 -> float32) whose
    width fits the block size, e.g. token_embd + ssm_in, or ssm_out + attn_output for k-quants."""
    files = sorted(TINY_MODEL.glob("*.safetensors"))
    if not files:
        pytest.skip(f"no *.safetensors in {TINY_MODEL}: real-weight case not run")
    from safetensors import safe_open

    picked: list[np.ndarray] = []
    kinds: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                shape = f.get_slice(name).get_shape()
                kind = re.sub(r"\.\d+\.", ".N.", name)
                if len(shape) != 2 or shape[1] % block_size or kind in kinds or shape[0] < ROWS // 2:
                    continue
                if picked and shape[1] != picked[0].shape[1]:
                    continue
                picked.append(f.get_tensor(name)[: ROWS // 2].float().numpy())
                kinds.add(kind)
                if len(picked) == 2:
                    return np.concatenate(picked)
    pytest.skip(f"{TINY_MODEL} has no two kinds of matrix with a width that is a multiple of {block_size}")


CASES = {f.__name__.replace("_", "-"): f for f in (
    gaussian, heavy_tailed, outlier_columns, zeros_and_spikes, signed_zeros, small_and_large, single_block,
    real_weights,
)}


@functools.cache
def case_matrix(case: str, block_size: int) -> np.ndarray:
    x = CASES[case](np.random.default_rng(sorted(CASES).index(case)), block_size)
    return np.ascontiguousarray(x, dtype=np.float32)


def importance_for(n: int, seed: int = 7) -> np.ndarray:
    """An imatrix-like vector: mean x^2 of activations with very uneven columns, some never active."""
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((128, n)) * np.exp(1.5 * rng.standard_normal(n))
    imp = (acts * acts).mean(axis=0)
    imp[rng.choice(n, n // 50, replace=False)] = 0
    return imp.astype(np.float32)


def weighted_error(x, y, w) -> float:
    return float((w.astype(np.float64) * (x.astype(np.float64) - y) ** 2).sum())


def test_registry_lists_the_formats_with_gguf_sizes():
    assert sorted(FORMATS) == sorted(NAMES)
    for name, fmt in FORMATS.items():
        assert fmt.ggml_type == GGMLQuantizationType[name.upper()]
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[fmt.ggml_type]


# Offsets of the f16 fields of each block: random bytes there would be NaN or inf.
F16_FIELDS = {
    "q8_0": [0], "q5_1": [0, 2], "q5_0": [0], "q4_0": [0], "iq4_nl": [0], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208],
}


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_random_blocks_matches_gguf_py(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 40, fmt.type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(name, []):
        d = (rng.standard_normal((3, 40)) * 0.05).astype(np.float16)
        blocks[..., off:off + 2] = d[..., None].view(np.uint8)
    data = blocks.reshape(3, -1)
    with np.errstate(over="ignore"):  # an MXFP4 exponent of 255 times 6 is inf, in ggml too
        ours, ref = fmt.dequantize(data), quants.dequantize(data, fmt.ggml_type)
    assert ours.dtype == np.float32 and ours.shape == (3, 40 * fmt.block_size)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_quantize_error_is_not_above_ggml(name, case, weighted):
    fmt = FORMATS[name]
    x = case_matrix(case, fmt.block_size)
    rows, n = x.shape
    imp = importance_for(n) if weighted else None
    ours = fmt.quantize(x, imp)
    ref = ggml_quantize(x, fmt.ggml_type, imp)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (rows, n // fmt.block_size * fmt.type_size)

    y = fmt.dequantize(ours)
    np.testing.assert_array_equal(y, quants.dequantize(ours, fmt.ggml_type))
    y_ref = fmt.dequantize(ref)
    np.testing.assert_array_equal(y_ref, quants.dequantize(ref, fmt.ggml_type))

    if name == "q8_0":
        np.testing.assert_array_equal(ours, ref)
        return
    w = imp if weighted else np.ones(n, np.float32)
    ours_err, ggml_err = weighted_error(x, y, w), weighted_error(x, y_ref, w)
    assert ours_err <= ggml_err * (1 + SLACK), f"{name} {case}: error {ours_err:.6g} > ggml {ggml_err:.6g}"


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_ggml_port_reproduces_ggml_bytes(name, case, weighted):
    """Every block of the port (Format.ggml_rows) equals ggml's: the same float32 operations in the
    same order, so near-ties fall the same way. (MXFP4's exponent is exact where ggml's log2f may
    round up for maxima a few ulps below a power of two, which no case here has: mxfp4.py.)"""
    fmt = FORMATS[name]
    x = case_matrix(case, fmt.block_size)
    imp = importance_for(x.shape[1]) if weighted else None
    ours = fmt.ggml_rows(x, imp).reshape(-1, fmt.type_size)
    ref = ggml_quantize(x, fmt.ggml_type, imp).reshape(-1, fmt.type_size)
    differ = np.flatnonzero((ours != ref).any(axis=1))
    assert differ.size == 0, f"{name} {case}: {differ.size} of {len(ref)} blocks differ from ggml's, first {differ[:5]}"


@pytest.mark.parametrize("name", NAMES)
def test_quantize_keeps_leading_dims_and_checks_its_input(name):
    fmt = FORMATS[name]
    x = np.random.default_rng(2).standard_normal((2, 3, 512)).astype(np.float32)
    q = fmt.quantize(x)
    assert q.shape == (2, 3, 512 // fmt.block_size * fmt.type_size)
    np.testing.assert_array_equal(q.reshape(6, -1), fmt.quantize(x.reshape(6, 512)))
    assert fmt.dequantize(q).shape == x.shape
    with pytest.raises(ValueError, match="multiple"):
        fmt.quantize(np.zeros((2, 512 + fmt.block_size // 2), np.float32))
    with pytest.raises(ValueError, match="importance"):
        fmt.quantize(x, np.ones(256, np.float32))
    with pytest.raises(ValueError, match="importance"):
        fmt.quantize(x, -np.ones(512, np.float32))


@pytest.mark.parametrize("case", ["real-weights", "gaussian"])
def test_iq4_nl_plain_search_skips_only_factors_that_never_win(case):
    """Without importance IQ4_NL tries only the first search factors; the others must not have
    lowered the error (they never won on real weights)."""
    from nemoq.quant.formats.iq4_nl import IQ4_NL

    x = case_matrix(case, 32)
    everything = IQ4_NL()
    everything.plain_factors = len(IQ4_NL.search_factors)
    fmt = FORMATS["iq4_nl"]
    ones = np.ones(x.shape[1], np.float32)
    kept = weighted_error(x, fmt.dequantize(fmt.quantize(x)), ones)
    full_search = weighted_error(x, fmt.dequantize(everything.quantize(x)), ones)
    assert kept <= full_search * (1 + SLACK)
