"""What the routers downstream read: the row metric a residual writer is rounded under.

A matrix that writes into the residual stream moves the input of every later MoE layer's router.
Router l reads A_l h / rms(h), A_l = W_gate diag(g) (its RMSNorm weight g), so a write error e
moves its scores by A_l e / rms; a token whose top-k is close to a tie then goes to other experts.
On the trained tiny models such flips made 85-97% of the KLD of a small rounding error upstream of
a router, and removing only the routers' share of ssm_out's error (5% of it) cut that tensor's
KLD 3-5x (docs/benchmarks.md, "Routing flips"). The writer's row metric is therefore

    M = I + ROUTER_WEIGHT * B / lambda_max(B),   B = sum over later MoE layers of A_l^T A_l,

(nemoq/quant/row_metric.py rounds under it). The last MoE layer's writers, the MTP block and
writers with no router after them keep M = I: plain compensated rounding.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from nemoq.calib.weights import read_tensor
from nemoq.quant.compensate import Compensated, output_energy, relative_error
from nemoq.quant.formats import FORMATS
from nemoq.quant.row_metric import coupled_rows

# mu: 100 (16 row groups) against 10 (8 groups) and 1000 (32 groups) on the w256 model, KLD over
# the file without the metric, Q4_K_M / IQ4_NL: 0.94 / 0.94, 0.98 / 0.95, 1.02 / 0.95
# (docs/benchmarks.md)
ROUTER_WEIGHT = 100.0
# The matrices whose outputs are added to the residual stream as they are (not gated)
WRITERS = ("ssm_out.weight", "attn_output.weight", "ffn_down_shexp.weight")
ROUTER, ROUTER_NORM = "ffn_gate_inp.weight", "attn_norm.weight"


def router_reads(plan, layer_kinds: list[str]) -> dict[int, np.ndarray]:
    """A_l^T A_l (hidden, hidden) of each MoE layer's router, by layer (read from the plan: the
    routers and their norms only, a few MB for the real model)."""
    tensors = {t.name: t for t in plan.tensors}
    reads = {}
    for layer, kind in enumerate(layer_kinds):
        gate, norm = tensors.get(f"blk.{layer}.{ROUTER}"), tensors.get(f"blk.{layer}.{ROUTER_NORM}")
        if kind != "moe" or gate is None or norm is None:
            continue
        a = read_tensor(gate).double().numpy() * read_tensor(norm).double().numpy()[None, :]
        reads[layer] = a.T @ a
    return reads


def is_writer(name: str) -> bool:
    parts = name.split(".", 2)
    return parts[0] == "blk" and len(parts) == 3 and parts[2] in WRITERS


def writer_metric(reads: dict[int, np.ndarray], name: str) -> np.ndarray | None:
    """M for tensor `name`, or None where it is not a residual writer with a router after it."""
    if not is_writer(name):
        return None
    later = [b for layer, b in reads.items() if layer > int(name.split(".")[1])]
    if not later:
        return None
    b = sum(later)
    top = float(np.linalg.eigvalsh(b)[-1])
    if not top > 0:
        return None
    return np.eye(len(b)) + (ROUTER_WEIGHT / top) * b


class WriterMetrics:
    """writer_metric for one model's tensors by name; the routers are read when a writer first
    asks (a walk that rounds no writer, or measures instead, never reads them)."""

    def __init__(self, plan, layer_kinds: list[str]):
        self.plan, self.layer_kinds = plan, layer_kinds
        self.reads: dict[int, np.ndarray] | None = None

    def __call__(self, name: str) -> np.ndarray | None:
        if not is_writer(name):
            return None
        if self.reads is None:
            self.reads = router_reads(self.plan, self.layer_kinds)
        return writer_metric(self.reads, name)


def coupled_compensated(fmt: str, w: np.ndarray, h: np.ndarray, m: np.ndarray,
                        round_group: Callable[[np.ndarray], Compensated]) -> Compensated:
    """w rounded under row metric m (row_metric.coupled_rows), each group by `round_group`
    (compensated rounding through H); reported as compensated rounding is: errors through H
    against w, the largest damping and the groups' fallbacks."""
    f = FORMATS[fmt]
    groups: list[Compensated] = []

    def round_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        groups.append(round_group(rows))
        return groups[-1].blocks, f.dequantize(groups[-1].blocks).reshape(rows.shape)
    blocks, _ = coupled_rows(w, m, round_rows)
    energy = output_energy(w, h)
    diag = np.diag(h)
    plain = f.quantize(w, np.maximum(diag, 0) if diag.any() else None)
    dampings = [c.damping for c in groups if np.isfinite(c.damping)]
    fallbacks = sorted({c.fallback for c in groups if c.fallback})
    return Compensated(blocks, relative_error(f, w, blocks, h, energy), relative_error(f, w, plain, h, energy),
                       energy, max(dampings) if dampings else np.nan, "; ".join(fallbacks) or None)
