"""nemoq's own searches and the importance vector, each tested on its own.

test_formats.py pins the ggml ports to ggml's bytes and checks that quantize is never worse than
ggml; that holds by construction (ggml's encoding is a candidate), so it cannot tell whether
nemoq's own search does anything. Here:

- the search alone (Format.search_rows, without ggml's candidate) against the port, block by
  block, on weights of the bundled trained model: strictly better on a stated share of blocks,
  worse on at most a stated share, lower in total; and its wins reach quantize's output;
- an importance vector concentrated on some columns lowers the error on those columns, for every
  format, and for the FP4 formats through the per-matrix `.scale` search (tensor_scale.py) too.

Where the search may be worse than ggml's port on a block, and why: for Q4_0, Q5_0, Q5_1, IQ4_NL,
Q4_K, Q5_K and Q6_K it is a different search, not a superset of ggml's. Its candidate scales are
other points (Q4_0: the largest value mapped to -8 x 0.85 .. 2.5, ggml's -8 +- 0.9 in steps of
0.1), it fits with the error's own weights where ggml weights by x^2, mean|x| + |x| or
importance * sqrt(sigma^2 + x^2), and the f16 rounding of the scales comes after either search
(a constant block is exact at ggml's d = max / -8 and not at a fitted d). That is why quantize
keeps the better of the two per block (on the trained model's weights the search alone loses 0.1%
to 36% of the blocks, MEASURED below). MXFP4 and NVFP4 search ggml's own scale among their
candidates, and so are never worse on any block.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest

from nemoq.quant.encodings import BLOCK_ENCODINGS
from nemoq.quant.formats import FORMATS
from nemoq.quant.formats.base import metric_weights
from nemoq.quant.tensor_scale import SCALE_RULES, ScaledEncoding, best_scale
from tests.test_formats import CASES, TINY_MODEL, case_matrix, importance_for

SEARCHING = ["q5_1", "q5_0", "q4_0", "iq4_nl", "q4_k", "q5_k", "q6_k", "mxfp4", "nvfp4"]   # Q8_0 has no search
SUPERSET = {"mxfp4", "nvfp4"}   # their search includes ggml's scale

# Shares of real-weight blocks (real_matrices below) where the search alone is strictly better /
# worse than ggml's port by the error it minimises, measured (plain, importance). The test asks
# for at least half the measured share better, and at most twice the measured share worse.
MEASURED = {   # name: ((better, worse) plain, (better, worse) importance)
    "q5_1": ((0.999, 0.001), (0.787, 0.180)),
    "q5_0": ((0.720, 0.278), (0.821, 0.118)),
    "q4_0": ((0.895, 0.102), (0.912, 0.038)),
    "iq4_nl": ((0.799, 0.183), (0.892, 0.054)),
    "q4_k": ((0.691, 0.309), (0.717, 0.283)),
    "q5_k": ((0.688, 0.312), (0.641, 0.359)),
    "q6_k": ((0.998, 0.002), (0.957, 0.043)),
    "mxfp4": ((0.155, 0.0), (0.196, 0.0)),
    "nvfp4": ((0.860, 0.0), (0.968, 0.0)),
}


@functools.cache
def real_matrices(block_size: int) -> tuple[np.ndarray, ...]:
    """The first rows (64, or 256 for the k-quants: only two kinds of matrix are 256 wide) of one
    matrix of each kind of the trained tiny model (bf16 -> float32) whose width is a multiple of
    block_size."""
    from safetensors import safe_open
    files = sorted(TINY_MODEL.glob("*.safetensors"))
    if not files:
        pytest.skip(f"no *.safetensors in {TINY_MODEL}")
    picked, kinds = [], set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                shape = f.get_slice(name).get_shape()
                kind = re.sub(r"\.\d+\.", ".N.", name)
                if len(shape) == 2 and shape[1] % block_size == 0 and "gate.weight" not in name and kind not in kinds:
                    rows = 64 * max(1, block_size // 64)
                    picked.append(np.ascontiguousarray(f.get_tensor(name)[:rows].float().numpy()))
                    kinds.add(kind)
    return tuple(picked)


def block_errors(fmt, x: np.ndarray, data: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float64 weighted squared error of each block."""
    y = fmt.dequantize(data).astype(np.float64)
    w = np.broadcast_to(w, x.shape)
    return (w * (x - y) ** 2).reshape(-1, fmt.block_size).sum(axis=-1)


def compare(fmt, x: np.ndarray, importance):
    """(search's, port's) block errors by the error the search minimises."""
    w = metric_weights(x, importance)
    return (block_errors(fmt, x, fmt.search_rows(x, importance), w),
            block_errors(fmt, x, fmt.ggml_rows(x, importance), w))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("name", SEARCHING)
def test_search_alone_beats_the_ggml_port_on_real_weights(name, weighted):
    fmt = FORMATS[name]
    ours, ggml = [], []
    for x in real_matrices(fmt.block_size):
        o, g = compare(fmt, x, importance_for(x.shape[1]) if weighted else None)
        ours.append(o)
        ggml.append(g)
    ours, ggml = np.concatenate(ours), np.concatenate(ggml)
    better, worse = (ours < ggml).mean(), (ours > ggml).mean()
    measured_better, measured_worse = MEASURED[name][weighted]
    where = f"{name}: the search alone is better on {better:.1%} of {len(ours)} blocks, worse on {worse:.1%}"
    assert better >= measured_better / 2, where
    assert worse <= 2 * measured_worse, where
    assert ours.sum() < ggml.sum(), where


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", sorted(SUPERSET))
def test_fp4_search_is_never_worse_than_ggml_on_any_block(name, case, weighted):
    fmt = FORMATS[name]
    x = case_matrix(case, fmt.block_size)
    ours, ggml = compare(fmt, x, importance_for(x.shape[1]) if weighted else None)
    worse = np.flatnonzero(ours > ggml * (1 + 1e-6))
    assert worse.size == 0, f"{name} {case}: worse than ggml on blocks {worse[:5]}"


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("name", SEARCHING)
def test_quantize_writes_the_search_where_it_wins(name, weighted):
    """Block by block, quantize's bytes are the search's where it is strictly better than the
    port, and the port's elsewhere: the search's wins reach the output."""
    fmt = FORMATS[name]
    for x in real_matrices(fmt.block_size)[:4]:
        importance = importance_for(x.shape[1]) if weighted else None
        search, port = fmt.search_rows(x, importance), fmt.ggml_rows(x, importance)
        ours, ggml = compare(fmt, x, importance)
        wins = (ours < ggml)[:, None]
        expected = np.where(wins, search.reshape(-1, fmt.type_size), port.reshape(-1, fmt.type_size))
        if name in SUPERSET:   # quantize is the search itself
            expected = search.reshape(-1, fmt.type_size)
        np.testing.assert_array_equal(fmt.quantize(x, importance).reshape(-1, fmt.type_size), expected)


# ---- importance ----------------------------------------------------------------------------

def concentrated(n: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(columns, importance): weight 1 on a random eighth of the columns, 0.01 elsewhere."""
    rng = np.random.default_rng(seed)
    columns = np.zeros(n, bool)
    columns[rng.choice(n, n // 8, replace=False)] = True
    return columns, np.where(columns, 1.0, 0.01).astype(np.float32)


# Error on the important columns with importance / without, measured (the larger of the
# real-weights and gaussian cases); the test asks for a ratio at most half-way between it and 1.
IMPORTANCE_RATIO = {"q5_1": 0.26, "q5_0": 0.41, "q4_0": 0.39, "iq4_nl": 0.35, "q4_k": 0.31, "q5_k": 0.36, "q6_k": 0.29,
                    "mxfp4": 0.95, "nvfp4": 0.43}


def column_error(x, y, columns) -> float:
    return float(((x - y)[:, columns].astype(np.float64) ** 2).sum())


@pytest.mark.parametrize("case", ["real-weights", "gaussian"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_importance_lowers_the_error_on_its_columns(name, case):
    """Q8_0 excepted: ggml's Q8_0 ignores importance, and nemoq writes ggml's bytes."""
    fmt = FORMATS[name]
    x = case_matrix(case, fmt.block_size)
    columns, importance = concentrated(x.shape[1])
    plain, weighted = fmt.quantize(x), fmt.quantize(x, importance)
    if name == "q8_0":
        np.testing.assert_array_equal(weighted, plain)
        return
    ratio = column_error(x, fmt.dequantize(weighted), columns) / column_error(x, fmt.dequantize(plain), columns)
    assert ratio <= (1 + IMPORTANCE_RATIO[name]) / 2, f"{name} {case}: error on the important columns x{ratio:.3f}"


def stacked_experts(n_experts: int = 4, rows: int = 48) -> np.ndarray:
    """Up projections of the tiny model's first MoE layer, (experts, rows, 320)."""
    from safetensors import safe_open
    name = "backbone.layers.1.mixer.experts.{}.up_proj.weight"
    found = {}
    for path in sorted(TINY_MODEL.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for e in range(n_experts):
                if name.format(e) in f.keys():
                    found[e] = f.get_tensor(name.format(e))[:rows].float().numpy()
    if len(found) < n_experts:
        pytest.skip(f"{TINY_MODEL} lacks {name}")
    return np.stack([found[e] for e in range(n_experts)])


def scaled_values(fmt: str, x: np.ndarray, importance) -> tuple[np.ndarray, np.ndarray]:
    """What llama.cpp computes with: each matrix dequantized times its `.scale`; and the scales."""
    enc = ScaledEncoding(BLOCK_ENCODINGS[fmt], x.shape, importance)
    data = enc.encode(x.reshape(-1, x.shape[-1]), "F32")
    y = BLOCK_ENCODINGS[fmt].dequantize(data).reshape(x.shape) * enc.scales[:, None, None]
    return y, enc.scales


@pytest.mark.parametrize("fmt", sorted(SCALE_RULES))
def test_importance_reaches_fp4_tensors_with_a_scale(fmt):
    """NVFP4 and MXFP4 tensors are written through tensor_scale.ScaledEncoding (the `.scale`
    companions): importance, one vector per expert, lowers the error on its columns there too."""
    x = stacked_experts()
    columns, importance = zip(*(concentrated(x.shape[-1], seed) for seed in range(x.shape[0])))
    importance = np.stack(importance)
    y_plain, _ = scaled_values(fmt, x, None)
    y_weighted, scales = scaled_values(fmt, x, importance)
    base, rule = BLOCK_ENCODINGS[fmt], SCALE_RULES[fmt]
    for e in range(x.shape[0]):
        ratio = column_error(x[e], y_weighted[e], columns[e]) / column_error(x[e], y_plain[e], columns[e])
        assert ratio <= (1 + IMPORTANCE_RATIO[fmt]) / 2, f"{fmt} expert {e}: important columns' error x{ratio:.3f}"
        assert scales[e] == best_scale(base, x[e], importance[e], rule)   # the scale search weighs by it too


def test_mxfp4_matrix_scale_search_follows_the_importance():
    """The per-matrix scale search weighs by the importance: with all weight on some columns, the
    scale it picks quantizes those columns at least as well as the scale picked without it."""
    x = stacked_experts(n_experts=1)[0]
    columns, _ = concentrated(x.shape[-1])
    importance = columns.astype(np.float32)
    base, rule = BLOCK_ENCODINGS["mxfp4"], SCALE_RULES["mxfp4"]

    def error(scale):
        return column_error(x, base.dequantize(base.quantize(x / scale, importance)) * scale, columns)
    with_importance, without = best_scale(base, x, importance, rule), best_scale(base, x, None, rule)
    assert with_importance != without
    assert error(with_importance) <= error(without)
