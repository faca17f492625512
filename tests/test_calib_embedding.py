"""token_embd's H (nemoq/calib/embedding.py): the output error a row's rounding causes in layer 0's
input matrices, through its RMSNorm weight; and the rounding through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemoq.calib.embedding import CONSUMERS, embedding_hessian
from nemoq.calib.weights import Weights
from nemoq.quant.compensate import compensated_quantize

HIDDEN = 64
SHAPES = {"ssm_in.weight": (200, HIDDEN), "attn_q.weight": (64, HIDDEN), "attn_k.weight": (32, HIDDEN),
          "attn_v.weight": (32, HIDDEN), "ffn_up_shexp.weight": (96, HIDDEN), "ffn_up_exps.weight": (8, 48, HIDDEN)}
SHARE = 2 / 8   # two of eight experts per token


def layer0(kind: str, seed: int = 0) -> Weights:
    rng = np.random.default_rng(seed)
    tensors = {"attn_norm.weight": torch.from_numpy(rng.uniform(0.2, 2.0, HIDDEN).astype(np.float32))}
    for short in CONSUMERS[kind]:
        tensors[short] = torch.from_numpy(rng.standard_normal(SHAPES[short]).astype(np.float32))
    return Weights("blk.0.", tensors)


def output_error(w: Weights, kind: str, d: np.ndarray) -> float:
    """sum over layer 0's input matrices of ||W (g * d)||^2, routed experts weighted by SHARE."""
    gd = w["attn_norm.weight"].double().numpy() * d
    total = 0.0
    for short in CONSUMERS[kind]:
        m = w[short].double().numpy()
        if m.ndim == 3:
            total += SHARE * sum(float(np.sum((e @ gd) ** 2)) for e in m)
        else:
            total += float(np.sum((m @ gd) ** 2))
    return total


@pytest.mark.parametrize("kind", list(CONSUMERS))
def test_h_is_the_output_error_of_layer_0s_input_matrices(kind):
    w = layer0(kind)
    h = embedding_hessian(w, kind, SHARE)
    assert h.shape == (HIDDEN, HIDDEN) and np.allclose(h, h.T)
    for d in np.random.default_rng(1).standard_normal((3, HIDDEN)):
        assert d @ h @ d == pytest.approx(output_error(w, kind, d), rel=1e-9)


def test_rounding_through_h_lowers_layer_0s_output_error():
    """On random embedding rows: compensated rounding's error through layer 0 is below importance
    rounding's, and the report measures it."""
    w = layer0("mamba")
    h = embedding_hessian(w, "mamba", SHARE)
    rows = (np.random.default_rng(2).standard_normal((256, HIDDEN)) * 0.05).astype(np.float32)
    c = compensated_quantize("iq4_nl", rows, h)
    assert c.fallback is None and c.error < 0.9 * c.error_rounding
    from nemoq.quant.formats import FORMATS
    d = rows.astype(np.float64) - FORMATS["iq4_nl"].dequantize(c.blocks).astype(np.float64)
    measured = np.sqrt(sum(output_error(w, "mamba", r) for r in d) / sum(output_error(w, "mamba", r) for r in rows))
    assert c.error == pytest.approx(measured, rel=1e-6)
