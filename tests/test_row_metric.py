"""Rounding under a row metric (nemoq/quant/row_metric.py) and the routers' metric the walk
rounds residual writers under (nemoq/calib/routers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from nemoq.calib.routers import ROUTER_WEIGHT, coupled_compensated, router_reads, writer_metric
from nemoq.convert.pipeline import open_source
from nemoq.quant.compensate import compensated_quantize
from nemoq.quant.formats import FORMATS
from nemoq.quant.row_metric import ROW_GROUPS, coupled_rows, exposure_order


def layer(seed: int = 0, rows: int = 128, n: int = 256, tokens: int = 2048, seen: int = 8):
    """W, H of correlated inputs, and A (seen, rows): what a router reads of W's outputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, n)) @ (rng.standard_normal((n, n)) / np.sqrt(n))
    w = (rng.standard_normal((rows, n)) * 0.05).astype(np.float32)
    a = rng.standard_normal((seen, rows))
    return w, x.T @ x, a


def metric_of(a: np.ndarray, mu: float = ROUTER_WEIGHT) -> np.ndarray:
    b = a.T @ a
    return np.eye(len(b)) + mu * b / np.linalg.eigvalsh(b)[-1]


def rounder(fmt: str, h: np.ndarray):
    f = FORMATS[fmt]

    def round_rows(rows):
        blocks = compensated_quantize(fmt, rows, h).blocks
        return blocks, f.dequantize(blocks).reshape(rows.shape)
    return round_rows


def cost(e: np.ndarray, h: np.ndarray, m: np.ndarray | None = None) -> float:
    """tr(M E H E^T)."""
    return float(np.trace((e @ h @ e.T) if m is None else m @ e @ h @ e.T))


@pytest.mark.parametrize("fmt", ["q4_k", "iq4_nl"])
def test_identity_metric_is_rounding_every_row_at_once(fmt):
    w, h, _ = layer()
    blocks, values = coupled_rows(w, np.eye(len(w)), rounder(fmt, h))
    whole = compensated_quantize(fmt, w, h).blocks
    np.testing.assert_array_equal(blocks, whole)
    np.testing.assert_array_equal(values, FORMATS[fmt].dequantize(whole).reshape(w.shape))


def test_each_group_moves_its_error_onto_the_rows_left():
    """Rounding to integers, one row per group: row 1's target is w_1 + M_11^-1 M_10 e_0, the
    least-squares answer to e^T M e given row 0's error e_0."""
    w = np.array([[0.4], [0.3]])
    m = np.array([[2.0, 1.0], [1.0, 1.0]])        # row 0 the more exposed: rounded first
    _, values = coupled_rows(w, m, lambda rows: (np.rint(rows), np.rint(rows)), groups=2)
    e0 = 0.4 - 0.0
    assert values[0, 0] == 0.0 and values[1, 0] == np.rint(0.3 + 1.0 * e0)   # 0.7 rounds to 1
    assert list(exposure_order(m)) == [0, 1]


@pytest.mark.parametrize("fmt", ["q4_k", "iq4_nl", "nvfp4"])
def test_coupled_rows_hide_the_error_from_what_the_router_reads(fmt):
    """Against each row on its own: the error along A's rows (what a router downstream sees) is
    a few percent (0.035-0.043 measured), the cost under M a quarter (0.26-0.28), for a total
    output error some 22% above."""
    w, h, a = layer()
    m = metric_of(a)
    f = FORMATS[fmt]
    own = f.dequantize(compensated_quantize(fmt, w, h).blocks).reshape(w.shape)
    _, coupled = coupled_rows(w, m, rounder(fmt, h))
    seen = a.T @ a
    assert cost(w - coupled, h, seen) < 0.1 * cost(w - own, h, seen)
    assert cost(w - coupled, h, m) < 0.4 * cost(w - own, h, m)
    assert cost(w - coupled, h) < 1.3 * cost(w - own, h)


def test_coupled_report_is_measured_against_the_matrix_asked_for():
    w, h, a = layer(rows=64)
    c = coupled_compensated("q4_k", w, h, metric_of(a), lambda rows: compensated_quantize("q4_k", rows, h))
    f = FORMATS["q4_k"]
    d = w.astype(np.float64) - f.dequantize(c.blocks).reshape(w.shape)
    assert c.error == pytest.approx(np.sqrt(cost(d, h) / cost(w.astype(np.float64), h)), rel=1e-9)
    assert c.error < c.error_rounding and np.isfinite(c.damping) and c.fallback is None
    assert c.blocks.shape == compensated_quantize("q4_k", w, h).blocks.shape


def test_writers_get_the_metric_of_the_routers_after_them(tiny_model):
    source = open_source(tiny_model)
    kinds = source.layer_kinds
    reads = router_reads(source.plan, kinds)
    moe = [i for i, k in enumerate(kinds) if k == "moe"]
    assert sorted(reads) == moe and len(moe) >= 2
    hidden = next(iter(reads.values())).shape[0]
    first, last = moe[0], moe[-1]
    before = next(i for i, k in enumerate(kinds) if k == "mamba" and i < last)
    m = writer_metric(reads, f"blk.{before}.ssm_out.weight")
    b = sum(r for layer, r in reads.items() if layer > before)
    np.testing.assert_allclose(m, np.eye(hidden) + ROUTER_WEIGHT * b / np.linalg.eigvalsh(b)[-1], rtol=1e-12)
    assert np.linalg.eigvalsh(m)[-1] == pytest.approx(1 + ROUTER_WEIGHT)
    assert writer_metric(reads, f"blk.{first}.ffn_down_shexp.weight") is not None
    assert writer_metric(reads, f"blk.{last}.ffn_down_shexp.weight") is None      # no router after it
    assert writer_metric(reads, f"blk.{before}.ssm_in.weight") is None             # not a writer
    assert writer_metric(reads, "output.weight") is None
    assert ROW_GROUPS == 16


@pytest.mark.parametrize("fmt", ["q4_k", "iq4_nl"])
def test_row_groups_sharing_hs_factor_make_the_same_bytes(fmt):
    """The walk's row groups reuse H's factor (compensate_torch's `factors`): the bytes are those
    of factorising H for every group."""
    import torch
    from nemoq.calib import compensate_torch
    from nemoq.quant.compensate import column_order
    w, h, a = layer(rows=64)
    m = metric_of(a)

    def fast(rows, factors=None):
        return compensate_torch.compensated_quantize(fmt, rows, h, device=torch.device("cpu"),
                                                     act_order=column_order(fmt), factors=factors)
    shared: dict = {}
    alone = coupled_compensated(fmt, w, h, m, fast)
    reused = coupled_compensated(fmt, w, h, m, lambda rows: fast(rows, shared))
    np.testing.assert_array_equal(reused.blocks, alone.blocks)
    assert list(shared) == [column_order(fmt)]
