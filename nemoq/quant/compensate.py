"""Error-compensating rounding (GPTQ, Frantar et al. 2022) for every block format nemoq writes.

A linear layer computes y = W x. Calibration gives H = sum over tokens of x x^T (n, n), and
rounding W to Q costs tr((W - Q) H (W - Q)^T) = sum over tokens ||(W - Q) x||^2: the output
error. Importance-weighted rounding sees only diag H. GPTQ rounds one column at a time and
moves each column's rounding error onto the columns not yet rounded, where the correlations in
H let them cancel it; with U the upper Cholesky factor of H^-1 (H^-1 = U^T U), row j of U is
exactly the update that is optimal for the columns after j.

ggml's formats round to a grid that each block's scale fields set, so the sweep goes block
column by block column (32, 64 or 256 columns):
  1. scales: the format's own importance-weighted quantizer on the block's current,
     error-updated weights chooses the scale fields (f16 d, k-quant sub-scales and mins, E8M0,
     UE4M3 group scales);
  2. codes: column by column, the nearest value on that grid, each column's error pushed into
     the block's later columns through U;
  3. refit: the scale fields refitted for those codes by least squares under the block's true
     error metric (FP4 scales are codes: a search over neighbouring codes), kept per block only
     where the output error drops;
  4. the block's error is pushed into all later columns at once (GPTQ's lazy batch update);
  5. after the sweep, PASSES passes of coordinate descent (`refine`): every column's code
     re-chosen given all the others, then every block's scale fields refitted given the other
     blocks. On synthetic layers with 4x more tokens than columns two passes lowered the output
     error on held-out tokens by 4-5% (IQ4_NL, Q4_K) to 12-15% (NVFP4, MXFP4, Q8_0).

numpy only: this is the reference. compensated_quantize is the entry point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nemoq.quant.formats import FORMATS, Format
from nemoq.quant.refit import REFITS, block_error, keep_better, refit_scales, values  # noqa: F401 (step 3)

# Defaults, measured on synthetic layers (n = 512) against the output error on 8192 held-out
# tokens (docs/quantize.md): with fewer tokens than columns H is rank-deficient and compensation
# fits the calibration tokens at the expense of others; more damping limits that.
DAMPING = 0.01  # lambda: H + lambda * mean(diag H) * I, GPTQ's default; best from 2n tokens on
FEW_TOKENS_DAMPING = 0.1  # at least this lambda with fewer tokens than columns
DAMPING_LADDER = (0.1, 1.0, 10.0)  # tried in turn when Cholesky fails with the lambda asked for
MIN_TOKENS = 64  # fewer calibration tokens than this: importance-weighted rounding instead
PASSES = 2  # coordinate-descent passes over the codes after the sweep (step 5)
# The sweep's column order: False, block by block (sweep); True, by decreasing diag H on importance
# rounding's scales (sweep_act_order); None, both, keeping the lower output error on the
# calibration tokens. Measured on the bundled model (KLD over --imatrix's, 11.5k held-out tokens,
# with refine): act order won for NVFP4 (0.81 vs 1.01) and Q4_K_M's Q5_0 (0.78 vs 0.82), lost
# for IQ4_NL (0.82 vs 0.77); keeping the lower calibration error chose block order for NVFP4
# (1.01): the static scales of act order keep the grid on the weights' own range, which the
# held-out tokens rewarded and the calibration tokens did not. Hence a per-format order
# (`column_order`, which the walk uses), act order where not listed. Not settled: on the second
# trained model (w256) both orders gave NQ4 0.72 against this table's 0.81 (docs/quantize.md).
ACT_ORDER = True
BLOCK_ORDER_FORMATS = frozenset({"iq4_nl"})
ACT_ORDER_BATCH = 128  # columns per lazy update in act order


@dataclass(frozen=True)
class Compensated:
    """The block bytes of one matrix (or a stack of experts) and what compensation bought."""

    blocks: np.ndarray  # uint8 (rows, n / block_size * type_size), GGUF layout; (experts, rows, ...) for a stack
    error: float  # relative output error of `blocks`: sqrt(tr(D H D^T) / tr(W H W^T)), D = W - Q
    error_rounding: float  # ... of importance-weighted rounding (the format's quantize, importance = diag H)
    energy: float  # tr(W H W^T) = sum over tokens ||W x||^2, the denominator of both errors
    damping: float  # the lambda used; nan where no factorisation was made
    fallback: str | None = None  # why `blocks` are importance-weighted rounding instead, or None
    experts: tuple[Compensated, ...] = ()  # one report per matrix of a stack


def compensated_quantize(
    fmt: str, w: np.ndarray, h: np.ndarray, *, damping: float = DAMPING,
    importance: np.ndarray | None = None, tokens: int | None = None, refit: bool = True,
    passes: int = PASSES, act_order: bool | None = ACT_ORDER,
) -> Compensated:
    """Quantize W (rows, n) to format `fmt`, compensating rounding errors through H (n, n).

    h: sum over calibration tokens of x x^T (any positive multiple of it: the mean too).
    importance: weights of the reference rounding and of any fallback (default diag H).
    tokens: how many tokens h sums, where known: below MIN_TOKENS the result is
    importance-weighted rounding, below n the damping is at least FEW_TOKENS_DAMPING.
    A stack of experts, w (experts, rows, n) with h (experts, n, n) (importance (experts, n) and
    tokens (experts,) likewise), is quantized one matrix at a time; each has its report in
    `experts`, and the errors on top are those of the whole stack.
    """
    f = FORMATS[fmt]
    w, h = np.asarray(w), np.asarray(h)
    if w.ndim == 3:
        per = [compensated_quantize(
            fmt, w[e], h[e], damping=damping, refit=refit, passes=passes, act_order=act_order,
            importance=None if importance is None else importance[e],
            tokens=None if tokens is None else int(np.asarray(tokens)[e]),
        ) for e in range(w.shape[0])]
        return stack(per)
    rows, n = w.shape
    if n % f.block_size:
        raise ValueError(f"{fmt}: row length {n} is not a multiple of the block size {f.block_size}")
    if h.shape != (n, n) or not np.isfinite(h).all():
        raise ValueError(f"{fmt}: H must be a finite ({n}, {n}) matrix, got shape {h.shape}")
    h = h.astype(np.float64)
    w = w.astype(np.float32)
    if importance is None:
        importance = np.diag(h) if np.diag(h).any() else None
    rounded = f.quantize(w, None if importance is None else np.maximum(importance, 0))
    energy = output_energy(w, h)
    error_rounding = relative_error(f, w, rounded, h, energy)

    def fallback(reason: str, lam: float = np.nan) -> Compensated:
        return Compensated(rounded, error_rounding, error_rounding, energy, lam, reason)

    skip, damping = precheck(bool(np.diag(h).any()), tokens, n, damping)
    if skip:
        return fallback(skip)
    best = None
    for act in column_orders(act_order):
        perm = np.argsort(-np.diag(h), kind="stable")
        factor = inverse_cholesky(h[np.ix_(perm, perm)] if act else h, damping)
        if factor is None:
            return fallback(f"H is singular even with damping {DAMPING_LADDER[-1]}")
        u, lam = factor
        blocks = sweep_act_order(f, w, rounded, u, perm) if act else sweep(f, w, u, refit=refit)
        if passes:
            blocks = refine(f, w, blocks, damped(h, lam), passes, refit=refit)
        error = relative_error(f, w, blocks, h, energy)
        if best is None or error < best[0]:
            best = error, blocks, lam
    error, blocks, lam = best
    if error > error_rounding:
        return fallback(ROUNDING_WON, lam)
    return Compensated(blocks, error, error_rounding, energy, lam)


ROUNDING_WON = "importance-weighted rounding had the lower output error"


def precheck(has_input: bool, tokens: int | None, n: int, damping: float) -> tuple[str | None, float]:
    """Why a matrix keeps importance-weighted rounding before any sweep (None: compensate it),
    and the damping to use: at least FEW_TOKENS_DAMPING when fewer tokens than columns."""
    if not has_input:
        return "no calibration input (H = 0)", damping
    if tokens is not None and tokens < MIN_TOKENS:
        return f"{tokens} calibration tokens, fewer than {MIN_TOKENS}", damping
    if tokens is not None and tokens < n:
        damping = max(damping, FEW_TOKENS_DAMPING)
    return None, damping


def column_orders(act_order: bool | None) -> tuple[bool, ...]:
    """The sweeps to try: act order, block order, or both (None) keeping the lower output error."""
    return (False, True) if act_order is None else (act_order,)


def inverse_cholesky(h: np.ndarray, damping: float) -> tuple[np.ndarray, float] | None:
    """U, upper triangular with U^T U = (H + lambda mean(diag H) I)^-1, and the lambda used.

    A dead column (diag H = 0: no input ever reaches it) gets H_jj = 1 as in GPTQ: it is then
    uncoupled, keeps its weights, is rounded plainly on its block's grid and pushes no error.
    A rank-deficient H (fewer tokens than columns, duplicated inputs) factors once damped; where
    Cholesky still fails (H lost positive definiteness, as one accumulated in low precision can,
    or no damping was asked for) lambda rises along DAMPING_LADDER; None if it fails there too.
    """
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    mean_diag = np.diag(h).mean()
    eye = np.eye(len(h))
    for lam in (damping, *(x for x in DAMPING_LADDER if x > damping)):
        try:
            # H = R R^T with R upper (the Cholesky factor of H with rows and columns reversed,
            # reversed back), so H^-1 = R^-T R^-1 and U = R^-1: GPTQ's cholesky(H^-1, upper)
            # without forming H^-1
            r = np.linalg.cholesky((h + lam * mean_diag * eye)[::-1, ::-1])[::-1, ::-1]
            u = np.linalg.inv(r)
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(u).all():
            return u, lam
    return None


def sweep(f: Format, w: np.ndarray, u: np.ndarray, *, refit: bool = True, lazy: bool = True) -> np.ndarray:
    """GPTQ over block columns: returns the blocks (rows, n / block_size * type_size).

    lazy: push each column's error into the rest of its block only, and the block's error into
    the later blocks at once (one matrix product per block); otherwise into every later column
    right away, as the paper's plain loop. Both give the same codes up to float rounding.
    """
    rows, n = w.shape
    bs = f.block_size
    w = w.astype(np.float64)  # becomes the error-updated weights as the sweep moves right
    out = np.empty((rows, n // bs, f.type_size), np.uint8)
    for k in range(0, n, bs):
        B, rest = slice(k, k + bs), slice(k + bs, n)
        u_b = u[B, B]
        w_b = w[:, B].copy()  # the block's weights as the sweep reaches it
        blocks = f.quantize(w_b.astype(np.float32), block_importance(u_b)).reshape(rows, f.type_size)
        span = bs if lazy else n - k
        codes, pushed = round_on_grid(f, blocks, w[:, k:k + span], u[k:k + bs, k:k + span])
        blocks = f.with_codes(blocks, codes)
        v = np.linalg.inv(u_b)  # the block's error in the metric of step 3: ||(w_b - q_b) v||^2
        if refit:
            blocks = refit_scales(f, blocks, w_b, v)
        err = (w_b - values(f, blocks)) @ v  # GPTQ's scaled errors (w - q) / U_jj, for the final q
        w[:, rest] -= (err - (0 if lazy else pushed)) @ u[B, rest]
        out[:, k // bs] = blocks
    return out.reshape(rows, -1)


def column_order(fmt: str) -> bool:
    """The act_order the walk uses for a format (see BLOCK_ORDER_FORMATS)."""
    return fmt not in BLOCK_ORDER_FORMATS


def sweep_act_order(f: Format, w: np.ndarray, blocks: np.ndarray, u: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """GPTQ's act order: the columns by decreasing diag H (perm), so the inputs with the most
    energy are rounded while most columns remain to absorb their errors. A block's columns are
    then scattered over the sweep, so its grid is fixed up front ("static groups"): the scale
    fields of `blocks`, importance-weighted rounding's; refine() refits them afterwards.

    u: the upper factor of the permuted H^-1. Errors go into the rest of a batch of
    ACT_ORDER_BATCH columns one column at a time, and into the later columns once per batch.
    """
    rows, n = w.shape
    flat = blocks.reshape(-1, f.type_size)
    a, b = (x.reshape(rows, n)[:, perm] for x in f.grid(flat))
    keep = f.codes(flat).reshape(rows, n)[:, perm]
    levels, level_codes = f.written_levels()
    w = w[:, perm].astype(np.float64)
    codes = np.empty((rows, n), np.uint8)
    for k in range(0, n, ACT_ORDER_BATCH):
        end = min(k + ACT_ORDER_BATCH, n)
        err = np.empty((rows, end - k))
        for j in range(k, end):
            codes[:, j] = nearest_code(w[:, j], a[:, j], b[:, j], levels, level_codes, keep[:, j])
            q = a[:, j] * f.code_values[codes[:, j]] + b[:, j]
            err[:, j - k] = (w[:, j] - q) / u[j, j]
            w[:, j + 1:end] -= np.outer(err[:, j - k], u[j, j + 1:end])
        w[:, end:] -= err @ u[k:end, end:]
    unpermuted = np.empty_like(codes)
    unpermuted[:, perm] = codes
    return f.with_codes(flat, unpermuted.reshape(-1, f.block_size)).reshape(rows, -1)


def damped(h: np.ndarray, lam: float) -> np.ndarray:
    """H as the sweep factored it: dead columns set to 1, lambda * mean(diag H) on the diagonal."""
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    return h + lam * np.diag(h).mean() * np.eye(len(h))


def refine(f: Format, w: np.ndarray, blocks: np.ndarray, h: np.ndarray, passes: int, *,
           refit: bool = True) -> np.ndarray:
    """Step 5: coordinate descent on tr(D H D^T), D = W - Q (QuantEase, Behdin et al. 2023).

    The sweep decides each column once, knowing only the columns before it. Here every column
    in turn gets the code nearest to its best value given all the others,
    q_j = w_j + (R_j - H_jj d_j) / H_jj with R = D H, which never raises the output error;
    after each pass the scale fields of every block are refitted for the codes, the other
    blocks fixed. h: the damped H the sweep used (the damping keeps it from fitting the
    calibration tokens alone).
    """
    rows, n = w.shape
    bs = f.block_size
    w = w.astype(np.float64)
    blocks = blocks.reshape(rows * (n // bs), f.type_size)
    levels, level_codes = f.written_levels()
    for _ in range(passes):
        a, b = (x.reshape(rows, n) for x in f.grid(blocks))
        codes = f.codes(blocks).reshape(rows, n)
        d = w - (a * f.code_values[codes] + b).astype(np.float64)
        r = d @ h
        descend_columns(f, w, d, r, a, b, codes, h, levels, level_codes)
        blocks = f.with_codes(blocks, codes.reshape(-1, bs))
        if refit:
            blocks = refit_in_place(f, w, blocks.reshape(rows, n // bs, f.type_size), h, d)
    return blocks.reshape(rows, -1)


def descend_columns(f: Format, w, d, r, a, b, codes, h, levels, level_codes) -> None:
    """One coordinate-descent pass over w's columns, in place on d (= w - Q), r (= D H) and codes:
    each column's nearest code to its best value given all the others."""
    for j in range(w.shape[1]):
        target = w[:, j] + (r[:, j] - h[j, j] * d[:, j]) / h[j, j]
        c = nearest_code(target, a[:, j], b[:, j], levels, level_codes, codes[:, j])
        delta = w[:, j] - (a[:, j] * f.code_values[c] + b[:, j]) - d[:, j]
        moved = np.nonzero(delta)[0]
        if len(moved):
            codes[:, j] = c
            d[moved, j] += delta[moved]
            r[moved] += np.outer(delta[moved], h[j])


def refit_in_place(f: Format, w: np.ndarray, blocks: np.ndarray, h: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Each block's scale fields refitted for its codes with the other blocks' errors fixed: the
    block's share of tr(D H D^T) is ||(t_b - q_b) v||^2 up to a constant, with v v^T = H_bb and
    target t_b = w_b + D_rest H_rest,b H_bb^-1. blocks (rows, n / bs, type_size); d = W - Q."""
    rows, n = w.shape
    bs = f.block_size
    for k in range(0, n, bs):
        B = slice(k, k + bs)
        h_bb = h[B, B]
        v = np.linalg.cholesky(h_bb)
        cross = d @ h[:, B] - d[:, B] @ h_bb        # D_rest H_rest,b
        t_b = w[:, B] + np.linalg.solve(h_bb, cross.T).T
        new = refit_scales(f, blocks[:, k // bs], t_b, v)
        blocks[:, k // bs] = new
        d[:, B] = w[:, B] - values(f, new)
    return blocks.reshape(-1, f.type_size)


def block_importance(u_b: np.ndarray) -> np.ndarray:
    """Weights for choosing a block's scales: 1 / U_jj^2, the cost of a unit error in column j
    once every later column compensates it (GPTQ's error weight). diag H and the diagonal of the
    block's Schur complement gave output errors within 2% of it on the test layers, either way."""
    return (1 / np.diag(u_b) ** 2).astype(np.float32)


def round_on_grid(f: Format, blocks: np.ndarray, w: np.ndarray, u: np.ndarray):
    """GPTQ's inner loop over one block's columns: the nearest grid value of each column's
    current weights, its scaled error pushed into the columns of w after it.

    blocks: (rows, type_size), whose scale fields set the grid; w: (rows, span) weights from the
    block's first column on, updated in place; u: the matching rows (bs, span) of U.
    Returns the codes (rows, bs) and the scaled errors (rows, bs).
    """
    bs = f.block_size
    a, b = f.grid(blocks)
    fallback_codes = f.codes(blocks)  # where a = 0 every code gives b; keep the quantizer's
    levels, level_codes = f.written_levels()
    codes = np.empty(a.shape, np.uint8)
    err = np.empty(a.shape)
    for j in range(bs):
        codes[:, j] = nearest_code(w[:, j], a[:, j], b[:, j], levels, level_codes, fallback_codes[:, j])
        q = a[:, j] * f.code_values[codes[:, j]] + b[:, j]  # float32, as dequantize computes it
        err[:, j] = (w[:, j] - q) / u[j, j]
        w[:, j + 1:] -= np.outer(err[:, j], u[j, j + 1:])
    return codes, err


def nearest_code(w, a, b, levels, level_codes, keep):
    """Per row, the code whose value a * level + b is nearest to w (ties to the larger level)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (w - b) / a  # |a * level + b - w| = |a| |level - t|
    i = np.clip(np.searchsorted(levels, t), 1, len(levels) - 1)
    lower, upper = levels[i - 1], levels[i]
    i = np.where(np.abs(t - lower) < np.abs(upper - t), i - 1, i)
    return np.where(a != 0, level_codes[i], keep)


# --- measuring ----------------------------------------------------------------------------------


def output_energy(w: np.ndarray, h: np.ndarray) -> float:
    """tr(W H W^T) = sum over tokens ||W x||^2."""
    w = w.astype(np.float64)
    return float(((w @ h) * w).sum())


def squared_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """tr((W - Q) H (W - Q)^T) = sum over tokens ||(W - Q) x||^2 (never below 0 by rounding)."""
    d = w.astype(np.float64) - q.astype(np.float64)
    return max(float(((d @ h) * d).sum()), 0.0)


def relative_error(f: Format, w: np.ndarray, blocks: np.ndarray, h: np.ndarray, energy: float) -> float:
    """||(W - Q) X|| / ||W X|| through H: sqrt(tr(D H D^T) / tr(W H W^T)); 0 where both are 0."""
    num = squared_error(w, f.dequantize(blocks), h)
    if energy <= 0:
        return 0.0 if num == 0 else float("inf")
    return float(np.sqrt(num / energy))


def stack(per: list[Compensated]) -> Compensated:
    """One report for a stack of experts: errors over the whole stack, the largest damping."""
    energy = sum(c.energy for c in per)

    def pooled(attr: str) -> float:
        if energy <= 0:
            return 0.0
        return float(np.sqrt(sum(getattr(c, attr) ** 2 * c.energy for c in per) / energy))

    reasons = sorted({c.fallback for c in per if c.fallback})
    fallback = None
    if reasons:
        count = sum(c.fallback is not None for c in per)
        fallback = f"{count} of {len(per)} experts: " + "; ".join(reasons)
    lams = [c.damping for c in per if np.isfinite(c.damping)]
    return Compensated(
        np.stack([c.blocks for c in per]), pooled("error"), pooled("error_rounding"), energy,
        max(lams) if lams else float("nan"), fallback, tuple(per),
    )
