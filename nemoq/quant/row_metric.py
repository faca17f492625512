"""Rounding a matrix whose output rows are not all worth the same: rows coupled through a metric.

GPTQ (compensate.py) weighs every output of W equally: tr(E H E^T), E = W - Q, and each row is
rounded on its own. Some outputs cost more than others, and not one row at a time: a matrix that
writes into the residual stream (ssm_out, attn_output, the shared expert's down projection) moves
the inputs of every router downstream, and a router's input moved along its own rows flips the
experts a token is sent to. On the trained tiny models those flips are most of the KLD of
quantizing anything upstream of a router (docs/benchmarks.md, "Routing flips"). The cost is then

    tr(M E H E^T),   M = I + mu B  (rows x rows),

with B what the routers read (routers.py). Rows are rounded in groups, most exposed first, each
group compensated through H as before; its error e is then moved onto the rows not yet rounded,
the least-squares answer given e:

    W_rest += M_rest,rest^-1 M_rest,group e

(H factors out: every row shares it), so the later rows cancel, in the directions M cares about,
what the earlier ones got wrong. With M = I nothing moves and the bytes are those of rounding
all rows at once. numpy only; the rounding of each group is the caller's (the walk's fast path).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# Groups per matrix: 16 (of 16 rows at width 256) with routers.ROUTER_WEIGHT 100, against 8 groups
# with 10 and 32 with 1000 (not varied separately; docs/benchmarks.md). The count, not the size,
# is fixed, so the real model's wide matrices pay 16 factorisations each.
ROW_GROUPS = 16

RoundRows = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def exposure_order(m: np.ndarray) -> np.ndarray:
    """Rows by decreasing diag M: the most exposed rounded first, while others can still cancel them."""
    return np.argsort(-np.diag(m), kind="stable")


def coupled_rows(w: np.ndarray, m: np.ndarray, round_rows: RoundRows,
                 groups: int = ROW_GROUPS) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, values) of w (rows, n) rounded group by group under the row metric m (rows, rows,
    symmetric positive definite). round_rows(w_rows) -> (blocks, values) of those rows, each row
    rounded on its own (compensated through H)."""
    rows = w.shape[0]
    if m.shape != (rows, rows):
        raise ValueError(f"row metric {m.shape} for {rows} rows")
    order = exposure_order(m)
    target = np.asarray(w, np.float64).copy()
    blocks: np.ndarray | None = None
    values = np.empty(w.shape, np.float32)
    done = 0
    for group in np.array_split(order, min(groups, rows)):
        b, v = round_rows(target[group].astype(np.float32))
        if blocks is None:
            blocks = np.empty((rows,) + b.shape[1:], b.dtype)
        blocks[group], values[group] = b, v
        done += len(group)
        rest = order[done:]
        if len(rest):
            moved = m[np.ix_(rest, group)] @ (target[group] - v.astype(np.float64))
            target[rest] += np.linalg.solve(m[np.ix_(rest, rest)], moved)
    return blocks, values
