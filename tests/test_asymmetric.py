"""Asymmetric targets (nemoq/quant/asymmetric.py) and the walk's asymmetric feeds.

The layer: full-precision inputs X and the quantized model's inputs X~ = X + E, where E is
correlated with X as an upstream rounding error is; 2048 tokens, n = 128.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemoq.calib.walk_types import Gram
from nemoq.quant.asymmetric import asymmetric_target, asymmetric_target_torch
from nemoq.quant.compensate import compensated_quantize
from nemoq.quant.encodings import BLOCK_ENCODINGS


def streams(seed: int = 0, n: int = 128, tokens: int = 2048, rows: int = 16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, n)) @ (rng.standard_normal((n, n)) / np.sqrt(n))
    bend = np.eye(n) + 0.1 * rng.standard_normal((n, n)) / np.sqrt(n)   # what the layers below got wrong
    x_q = x @ bend + 0.02 * rng.standard_normal((tokens, n))
    w = (rng.standard_normal((rows, n)) * 0.05).astype(np.float32)
    return w, x, x_q


def gram_of(x, x_q) -> Gram:
    gram = Gram(x.shape[1], torch.device("cpu"))
    gram.add(torch.from_numpy(x_q).float(), torch.from_numpy(x).float())
    return gram


def miss(w_or_q: np.ndarray, w, x, x_q) -> float:
    """sum over tokens ||W x - Q x~||^2: what the quantized model's matrix gets wrong."""
    return float(np.square(x @ w.T - x_q @ w_or_q.T).sum())


def test_gram_sums_the_shift_between_the_streams():
    w, x, x_q = streams()
    gram = gram_of(x, x_q)
    h, shift = x_q.T @ x_q, (x - x_q).T @ x_q   # float32 products: within 1e-5 of the largest entry
    np.testing.assert_allclose(gram.numpy(), h, rtol=0, atol=1e-5 * np.abs(h).max())
    np.testing.assert_allclose(gram.shift.numpy(), shift, rtol=0, atol=1e-5 * np.abs(shift).max())
    assert Gram(4, torch.device("cpu")).shift is None


def test_target_is_the_least_squares_fit_of_the_full_precision_outputs():
    w, x, x_q = streams()
    gram = gram_of(x, x_q)
    target = asymmetric_target(w, gram.numpy(), gram.shift.numpy(), 1e-9, gram.tokens)
    exact = np.linalg.lstsq(x_q, x @ w.T.astype(np.float64), rcond=None)[0].T
    np.testing.assert_allclose(target, exact, rtol=1e-3, atol=1e-5)
    assert miss(target, w, x, x_q) < 0.5 * miss(w, w, x, x_q)


def test_same_streams_leave_the_weights_alone():
    w, x, _ = streams()
    gram = gram_of(x, x)
    assert np.abs(gram.shift.numpy()).max() == 0
    np.testing.assert_array_equal(asymmetric_target(w, gram.numpy(), gram.shift.numpy(), 0.01, gram.tokens), w)


def test_fewer_tokens_than_columns_keep_the_weights():
    w, x, x_q = streams(tokens=100)
    gram = gram_of(x, x_q)
    assert asymmetric_target(w, gram.numpy(), gram.shift.numpy(), 0.01, gram.tokens) is w


@pytest.mark.parametrize("fmt", ["q4_0", "iq4_nl", "q4_k", "nvfp4"])
def test_rounding_the_target_misses_the_full_precision_outputs_less(fmt):
    """Compensated rounding of W' through H~ against compensated rounding of W through H~
    (sequential GPTQ): the quantized model's outputs come closer to the full-precision ones."""
    w, x, x_q = streams(n=256)
    gram = gram_of(x, x_q)
    h = gram.numpy()
    target = asymmetric_target(w, h, gram.shift.numpy(), 0.01, gram.tokens)
    dequantize = BLOCK_ENCODINGS[fmt].dequantize
    asym = dequantize(compensated_quantize(fmt, target, h).blocks).reshape(w.shape)
    sequential = dequantize(compensated_quantize(fmt, w, h).blocks).reshape(w.shape)
    assert miss(asym, w, x, x_q) < 0.5 * miss(sequential, w, x, x_q)   # 0.22-0.27 measured


@pytest.mark.parametrize("tokens", [2048, 100])
def test_the_walks_torch_target_is_the_reference(tokens):
    w, x, x_q = streams(tokens=tokens)
    gram = gram_of(x, x_q)
    ours = asymmetric_target_torch(w, gram.h, gram.shift, 0.01, gram.tokens)
    reference = asymmetric_target(w, gram.numpy(), gram.shift.numpy(), 0.01, gram.tokens)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    assert (ours is w) == (tokens < w.shape[1])


def test_gram_weighs_tokens_by_their_gate_but_not_the_imatrix_statistic():
    """A routed expert's output reaches the layer times its gate g: H and the shift sum
    g^2 x x^T and g^2 (x - x~) x~^T, while the diagonal the imatrix reads stays sum x^2."""
    _, x, x_q = streams()
    g = np.random.default_rng(1).uniform(0.05, 2.5, len(x))
    gram = Gram(x.shape[1], torch.device("cpu"))
    gram.add(torch.from_numpy(x_q).float(), torch.from_numpy(x).float(), torch.from_numpy(g).float())
    h, shift = (x_q * g[:, None] ** 2).T @ x_q, ((x - x_q) * g[:, None] ** 2).T @ x_q
    np.testing.assert_allclose(gram.numpy(), h, rtol=0, atol=1e-5 * np.abs(h).max())
    np.testing.assert_allclose(gram.shift.numpy(), shift, rtol=0, atol=1e-5 * np.abs(shift).max())
    np.testing.assert_allclose(gram.diag.numpy(), np.square(x_q).sum(0), rtol=1e-6)



def test_the_torch_target_is_the_same_a_chunk_of_rows_at_a_time(monkeypatch):
    """The fast path's float64 products go CHUNK_ROWS rows at a time (a Nano head at once took
    7 GB): the rows of a chunk boundary are the reference's."""
    from nemoq.quant import asymmetric
    w, x, x_q = streams(rows=13)
    gram = gram_of(x, x_q)
    whole = asymmetric_target_torch(w, gram.h, gram.shift, 0.01, gram.tokens)
    monkeypatch.setattr(asymmetric, "CHUNK_ROWS", 5)
    chunked = asymmetric_target_torch(w, gram.h, gram.shift, 0.01, gram.tokens)
    np.testing.assert_array_equal(chunked, whole)
    reference = asymmetric_target(w, gram.numpy(), gram.shift.numpy(), 0.01, gram.tokens)
    np.testing.assert_allclose(chunked, reference, rtol=1e-5, atol=1e-6)
