"""The fast path of error-compensated rounding: nemoq.quant.compensate at real widths.

Same algorithm, same blocks (tests/test_compensate_fast.py pairs it with the numpy reference
for every format); what changes is where the time goes. Per Nano expert matrix the reference
spends it in float64 products on one core (H^-1's factor through a general inverse, the output
errors as W H W^T, the descent's D H) and in numpy's per-column loops. Here:

- H's Cholesky factor R (H + lambda I = R R^T, float64 where the device has it), the updates of
  the not-yet-rounded columns and the output errors are torch products on the walk's device
  (CPU, CUDA, MPS), in `dtype` (float32 by default, GPTQ's own precision; float64 reproduces
  the reference's bytes);
- U = R^-1 is never formed: the sweep is left-looking, a block's error-updated weights are
  W_b + D_<b R_<b,b R_bb^-1 with D = W - Q of the blocks done (the reference's right-looking
  updates, since W - Q = E U), one product per batch of BATCH columns, the batch's own blocks
  in float64 on the host;
- each block's scale search is the format's C quantizer on the whole (rows, block) slice, the
  column loops are C (nemoq/kernels_c/round_on_grid.c), the refits the reference's own code;
- the descent after the sweep goes by batches too (compensate_refine.py);
- the output errors: ||D X^T||^2 through an expert's tokens where it has fewer than half as many
  as columns, else ||D R||^2 - lambda ||D||^2 (R triangular: half a product);
- rows go ROWS at a time (rows are independent given H), so the head's 131072 take bounded memory.
"""

from __future__ import annotations

import numpy as np
import torch

from nemoq.calib.compensate_refine import BATCH, DenseMetric, TokenMetric, refine
from nemoq.kernels_c import rounding
from nemoq.quant import compensate as ref
from nemoq.quant.compensate import (
    ACT_ORDER, ACT_ORDER_BATCH, DAMPING, DAMPING_LADDER, PASSES, Compensated,
)
from nemoq.quant.encodings import BLOCK_ENCODINGS
from nemoq.quant.formats import FORMATS, Format

PRODUCT_COLUMNS = 512  # columns of R per product when multiplying by a triangular R
ROWS = 4096            # rows quantized at a time (the output head has 131072): memory stays bounded


def compensated_quantize(
    fmt: str, w: np.ndarray, h: np.ndarray | torch.Tensor, *, damping: float = DAMPING,
    importance: np.ndarray | None = None, tokens: int | None = None, refit: bool = True,
    passes: int = PASSES, act_order: bool | None = ACT_ORDER, inputs: np.ndarray | torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, factors: dict | None = None,
) -> Compensated:
    """nemoq.quant.compensate.compensated_quantize, its linear algebra in torch on `device`.

    Same arguments, fallbacks and report; h may be a torch tensor (a Gram on the device).
    inputs: the tokens (tokens, n) that h sums, where at hand: with fewer tokens than half the
    columns the output errors are measured through them, which costs less than through H.
    dtype: of the products; H's factor is float64 wherever the device has it (MPS has not).
    factors: a dict kept by the caller across calls with the same h, damping and tokens (the row
    groups of one matrix, routers.py): H's factor is made once per column order and reused.
    """
    f = FORMATS[fmt]
    w = np.asarray(w)
    if w.ndim == 3:
        per = [compensated_quantize(
            fmt, w[e], h[e], damping=damping, refit=refit, passes=passes, act_order=act_order, device=device,
            dtype=dtype,
            importance=None if importance is None else importance[e],
            tokens=None if tokens is None else int(np.asarray(tokens)[e]),
        ) for e in range(w.shape[0])]
        return ref.stack(per)
    rows, n = w.shape
    if n % f.block_size:
        raise ValueError(f"{fmt}: row length {n} is not a multiple of the block size {f.block_size}")
    device = torch.device(device)
    wide = torch.float32 if device.type == "mps" else torch.float64
    h = torch.as_tensor(h).to(device, wide)
    if tuple(h.shape) != (n, n) or not torch.isfinite(h).all():
        raise ValueError(f"{fmt}: H must be a finite ({n}, {n}) matrix, got shape {tuple(h.shape)}")
    w = np.asarray(w, dtype=np.float32)   # no copy of a float32 matrix (the head: 1.4 GB)
    diag = h.diagonal().double().cpu().numpy()
    if importance is None:
        importance = diag.astype(np.float32) if diag.any() else None
    enc = BLOCK_ENCODINGS[fmt]
    rounded = enc.quantize(w, None if importance is None else np.maximum(importance, 0))
    # the output errors through the tokens where fewer than half the columns: ||D X^T||^2 costs less
    x_t = torch.as_tensor(inputs).to(device, dtype).T if inputs is not None and len(inputs) < n / 2 else None

    def fallback(reason: str, lam: float = np.nan) -> Compensated:
        energy, err = output_forms(enc, w, rounded, inputs_t=x_t, h=h)
        return Compensated(rounded, relative(err, energy), relative(err, energy), energy, lam, reason)

    skip, damping = ref.precheck(bool(diag.any()), tokens, n, damping)
    if skip:
        return fallback(skip)
    best = None
    for act in ref.column_orders(act_order):
        perm = np.argsort(-diag, kind="stable") if act else np.arange(n)
        order = torch.from_numpy(perm).to(device)
        if factors is not None and act in factors:
            factor = factors[act]
        else:
            factor = cholesky_factor(h[order][:, order] if act else h, damping)
            if factors is not None:
                factors[act] = factor
        if factor is None:
            return fallback(f"H is singular even with damping {DAMPING_LADDER[-1]}")
        r, lam, shift_p = factor
        shift = np.empty(n)
        shift[perm] = shift_p     # H' as refine sees it, in the columns' own order
        if x_t is not None:       # H' = X^T X + diag(shift): the descent works through D X^T (rows, tokens)
            metric = TokenMetric(x_t.T, torch.from_numpy(shift).to(device, dtype))
        else:
            metric = DenseMetric(h.to(dtype) + torch.diag(torch.from_numpy(shift).to(device, dtype)))
        parts = []
        for r0 in range(0, rows, ROWS):   # rows are independent: a chunk at a time bounds memory
            part = w[r0:r0 + ROWS]
            on_device = torch.from_numpy(part).to(device, dtype)
            if act:
                blocks = sweep_act_order(f, on_device, rounded[r0:r0 + ROWS], r, perm, dtype)
            else:
                blocks = sweep(f, on_device, r, dtype, refit=refit)
            if passes:
                blocks = refine(f, part, blocks, metric, passes, refit=refit)
            parts.append(blocks)
        blocks = np.concatenate(parts)
        del metric
        energy, error_rounding, error = output_forms(enc, w, rounded, blocks, inputs_t=x_t,
                                                     factor=(r.to(dtype), shift_p, perm))
        if best is None or error < best[0]:
            best = error, error_rounding, energy, blocks, lam
    error, error_rounding, energy, blocks, lam = best
    error, error_rounding = relative(error, energy), relative(error_rounding, energy)
    if error > error_rounding:
        return Compensated(rounded, error_rounding, error_rounding, energy, lam, ref.ROUNDING_WON)
    return Compensated(blocks, error, error_rounding, energy, lam)


def relative(err: float, energy: float) -> float:
    """sqrt(err / energy) as compensate.relative_error: 0 where both are 0."""
    err = max(err, 0.0)
    if energy <= 0:
        return 0.0 if err == 0 else float("inf")
    return float(np.sqrt(err / energy))


# --- H's factor ------------------------------------------------------------------------------


def cholesky_factor(h: torch.Tensor, damping: float):
    """As compensate.inverse_cholesky, but the factor itself: (R, lambda, shift) with R upper
    triangular, R R^T = H' = H + lambda mean(diag H) I (dead columns' H_jj set to 1 first: U =
    R^-1 is the reference's factor) and shift (n,) = diag(H' - H); None where Cholesky fails
    along the damping ladder."""
    n = h.shape[0]
    h = h.clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    mean_diag = float(h.diagonal().double().mean())
    for lam in (damping, *(x for x in DAMPING_LADDER if x > damping)):
        h.diagonal().add_(lam * mean_diag)
        # the Cholesky factor of H with rows and columns reversed, reversed back: upper R, H = R R^T
        low, info = torch.linalg.cholesky_ex(h.flip(0, 1))
        h.diagonal().sub_(lam * mean_diag)
        if info.item() == 0 and torch.isfinite(low).all() and bool((low.diagonal() > 0).all()):
            return low.flip(0, 1), lam, np.full(n, lam * mean_diag) + dead.cpu().numpy()
    return None


# --- output errors ---------------------------------------------------------------------------


def output_forms(enc, w: np.ndarray, *blocks: np.ndarray, inputs_t: torch.Tensor | None = None,
                 h: torch.Tensor | None = None, factor: tuple | None = None) -> list[float]:
    """tr(W H W^T) and tr(D H D^T) for D = W - Q of each of `blocks`, ROWS rows at a time:
    through the inputs X^T (n, tokens) where given (||D X^T||^2), else through the factor
    (R, shift, perm) of H with its columns in the order perm (||D_perm R||^2 - shift-weighted
    ||D_j||^2), else through H itself."""
    sums = np.zeros(1 + len(blocks))
    for r0 in range(0, len(w), ROWS):
        part = w[r0:r0 + ROWS].astype(np.float64)
        stack = np.stack([part] + [part - enc.dequantize(b[r0:r0 + ROWS]).astype(np.float64) for b in blocks])
        if inputs_t is not None:
            sums += norms_through(inputs_t, stack)
        elif factor is not None:
            r, shift, perm = factor
            stack = stack[:, :, perm]
            sums += np.subtract(norms_through(r, stack, triangular=True), shifted_norms(shift, stack))
        else:
            sums += quadratic_forms(h, stack)
    return [float(s) for s in sums]


def quadratic_forms(h: torch.Tensor, x: np.ndarray) -> list[float]:
    """tr(X_i H X_i^T) for each matrix X_i of the stack x (k, rows, n), through H itself."""
    out = []
    for xi in x:
        t = torch.from_numpy(xi).to(h.device, h.dtype)
        out.append(float(((t @ h) * t).sum(dtype=torch.float64)))
    return out


def norms_through(m: torch.Tensor, x: np.ndarray, triangular: bool = False) -> list[float]:
    """||X_i M||^2 for each X_i of the stack x (k, rows, n). M upper triangular (`triangular`):
    column block J of X M needs only X's columns up to J's last."""
    k, rows, n = x.shape
    t = torch.from_numpy(x.reshape(k * rows, n)).to(m.device, m.dtype)
    if not triangular:
        return [float(s) for s in (t @ m).square().reshape(k, -1).sum(1, dtype=torch.float64).cpu()]
    sums = torch.zeros(k, dtype=torch.float64, device=m.device)
    for j in range(0, n, PRODUCT_COLUMNS):
        end = min(j + PRODUCT_COLUMNS, n)
        sums += (t[:, :end] @ m[:end, j:end]).square().reshape(k, -1).sum(1, dtype=torch.float64)
    return [float(s) for s in sums.cpu()]


def shifted_norms(shift: np.ndarray, x: np.ndarray) -> list[float]:
    """sum_j shift_j ||X_i[:, j]||^2: what H' adds to tr(X_i H X_i^T)."""
    return [float(v) for v in ((x * x).sum(axis=1) * shift).sum(axis=1)]


# --- the sweep -------------------------------------------------------------------------------


def sweep(f: Format, w: torch.Tensor, r: torch.Tensor, dtype: torch.dtype, *, refit: bool = True) -> np.ndarray:
    """compensate.sweep, left-looking: a block's error-updated weights are
    W'_b = W_b + D_<b R_<b,b U_bb, with D = W - Q of the blocks done and U_bb = R_bb^-1 (equal
    to the reference's right-looking updates, since W - Q = E U and E = D R). One product per
    batch of BATCH columns for what the earlier batches push into it, the batch's own blocks in
    float64. Returns the blocks (rows, n / block_size * type_size)."""
    rows, n = w.shape
    bs, step = f.block_size, max(BATCH, f.block_size)
    out = np.empty((rows, n // bs, f.type_size), np.uint8)
    d = torch.zeros_like(w)
    r_products = r.to(dtype)
    for k0 in range(0, n, step):
        K = slice(k0, min(k0 + step, n))
        pushed = (d[:, :k0] @ r_products[:k0, K]).to("cpu", torch.float64).numpy()
        wk = w[:, K].to("cpu", torch.float64).numpy()
        rk = r[K, K].to("cpu", torch.float64).numpy()
        dk = np.zeros_like(wk)
        for k in range(0, wk.shape[1], bs):
            B = slice(k, k + bs)
            r_b = rk[B, B]
            u_b = np.linalg.inv(r_b)
            w_b = wk[:, B] + (pushed[:, B] + dk[:, :k] @ rk[:k, B]) @ u_b
            out[:, (k0 + k) // bs], q_b = block(f, w_b, u_b, r_b, refit)
            dk[:, B] = wk[:, B] - q_b
        d[:, K] = torch.from_numpy(dk).to(d.device, d.dtype)
    return out.reshape(rows, -1)


def block(f: Format, w_b: np.ndarray, u_b: np.ndarray, r_b: np.ndarray, refit: bool) -> tuple[np.ndarray, np.ndarray]:
    """One format block: scales, codes, refit (compensate.sweep's body) on its error-updated
    weights w_b (rows, block_size). Returns its blocks (rows, type_size) and values."""
    rows = w_b.shape[0]
    blocks = BLOCK_ENCODINGS[f.name].quantize(w_b.astype(np.float32), ref.block_importance(u_b))
    blocks = blocks.reshape(rows, f.type_size)
    blocks = f.with_codes(blocks, round_codes(f, blocks, w_b.copy(), u_b))
    if refit:
        blocks = ref.refit_scales(f, blocks, w_b, r_b)
    return blocks, ref.values(f, blocks)


def round_codes(f: Format, blocks: np.ndarray, w_b: np.ndarray, u_b: np.ndarray) -> np.ndarray:
    """compensate.round_on_grid's codes on the grid of `blocks` (w_b is updated in place)."""
    a, b = f.grid(blocks)
    return grid_round(f, w_b, a, b, f.codes(blocks), u_b)


def grid_round(f: Format, w: np.ndarray, a: np.ndarray, b: np.ndarray, keep: np.ndarray, u: np.ndarray) -> np.ndarray:
    """GPTQ's column loop on w (rows, m) float64 (updated in place) over any grid a, b (rows, m),
    errors pushed through u (m, m): C where the kernels are built, else numpy. The codes."""
    levels, level_codes = f.written_levels()
    if rounding.available():
        return rounding.round_on_grid(w, a, b, u, levels, level_codes, f.code_values, keep)[0]
    codes = np.empty(w.shape, np.uint8)
    for j in range(w.shape[1]):
        codes[:, j] = ref.nearest_code(w[:, j], a[:, j], b[:, j], levels, level_codes, keep[:, j])
        q = a[:, j] * f.code_values[codes[:, j]] + b[:, j]
        w[:, j + 1:] -= np.outer((w[:, j] - q) / u[j, j], u[j, j + 1:])
    return codes


def sweep_act_order(f: Format, w: torch.Tensor, rounded: np.ndarray, r: torch.Tensor, perm: np.ndarray,
                    dtype: torch.dtype) -> np.ndarray:
    """compensate.sweep_act_order, left-looking: the columns in the order perm on the fixed grid
    of `rounded` (importance-weighted rounding's blocks), ACT_ORDER_BATCH columns at a time; r:
    the factor of H with its rows and columns in that order."""
    rows, n = w.shape
    flat = rounded.reshape(-1, f.type_size)
    a, b = (x.reshape(rows, n)[:, perm] for x in f.grid(flat))
    keep = f.codes(flat).reshape(rows, n)[:, perm]
    w = w[:, torch.from_numpy(perm).to(w.device)]
    d, r_products = torch.zeros_like(w), r.to(dtype)
    codes = np.empty((rows, n), np.uint8)
    for k0 in range(0, n, ACT_ORDER_BATCH):
        K = slice(k0, min(k0 + ACT_ORDER_BATCH, n))
        w_0 = w[:, K].to("cpu", torch.float64).numpy()    # the batch's weights, then error-updated: w_k
        u_k = np.linalg.inv(r[K, K].to("cpu", torch.float64).numpy())
        w_k = w_0 + (d[:, :k0] @ r_products[:k0, K]).to("cpu", torch.float64).numpy() @ u_k
        codes[:, K] = grid_round(f, np.ascontiguousarray(w_k), a[:, K], b[:, K], keep[:, K], np.ascontiguousarray(u_k))
        q = (a[:, K] * f.code_values[codes[:, K]] + b[:, K]).astype(np.float64)
        d[:, K] = torch.from_numpy(w_0 - q).to(d.device, d.dtype)
    unpermuted = np.empty_like(codes)
    unpermuted[:, perm] = codes
    return f.with_codes(flat, unpermuted.reshape(-1, f.block_size)).reshape(rows, -1)
