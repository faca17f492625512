"""Routed experts straight from the quantized stacks: the C kernel of moe.c, through ctypes.

    from nemoq.kernels_c.moe import moe_matvec
    y = moe_matvec(x, expert_ids, expert_weights, up, down, "q4_k", "q6_k")   # (T, H) float32

x: (T, H) float32 tokens; expert_ids: (T, k) ints; expert_weights: (T, k) router weights (already
normalised and scaled); up: ffn_up_exps as uint8 (E, I, H / block * bytes); down: ffn_down_exps
as uint8 (E, H, I / block * bytes), e.g. the arrays gguf-py's GGUFReader returns (or np.memmap
views of the file). y_t = sum_j w_j * down[e_j] @ relu(up[e_j] @ x_t)^2, defined by
nemoq/quant/moe_reference.py. Slots with weight 0 are skipped: they add exactly nothing.

Threads: one C call (moe_run.c) groups the tokens' (expert, weight) slots by expert and runs
both phases on a persistent C thread pool (pool.c): the threads take the I rows of every
routed expert (up phase), then the H output rows (down phase), in chunks, with a barrier
between. A row is read once per call, for all tokens routed to its expert, by one thread,
which also owns the output row, so the result does not depend on `threads`. ctypes releases
the GIL for the call.

activations="q8" (default "f32") computes as llama.cpp's CPU backend does: x, and each slot's
hidden vector after the up phase, are rounded once per call to the 8-bit activations ggml pairs
with the matrix's format (Q8_0; Q8_K for the k-quants), and the row dots are integer dot
products per 32 (or 16) values times the block scales (moe_q8.c): 1.3-2x faster per core,
llama.cpp's numerics rather than float32 ones (docs/kernels.md). `moe_hidden` and `moe_down`
run one phase each (the up phase's hidden vectors, or the down phase fed with given ones), for
tests and inspection.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.kernels_c.build import library
from nemoq.quant.moe_reference import ACTIVATIONS, expert_shapes, moe_matvec_reference, row_bytes

__all__ = ["ACTIVATIONS", "MOE_FORMATS", "Routing", "route", "moe_matvec", "moe_hidden", "moe_down", "available",
           "row_dots"]

# The block formats the kernel reads, by name; C knows them by ggml type id.
MOE_FORMATS = ("q8_0", "q5_0", "iq4_nl", "mxfp4", "nvfp4", "q4_k", "q5_k", "q6_k")
TYPE_IDS = {name: GGMLQuantizationType[name.upper()].value for name in MOE_FORMATS}
# The C files of the MoE kernels (a library of these alone has every function below).
SOURCES = ("moe.c", "moe_q8.c", "moe_run.c", "pool.c")

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_SIGNATURES = {
    "nemoq_moe_supports": ([ctypes.c_int], ctypes.c_int),
    "nemoq_moe_avx2": ([], ctypes.c_int),
    # up, type, n_ff, hidden, x, n_groups, group_expert, group_start, slot_token, scale, h, r0, r1
    "nemoq_moe_up": ([_p, ctypes.c_int, _i64, _i64, _p, _i64, _p, _p, _p, _p, _p, _i64, _i64], ctypes.c_int),
    # down, type, hidden, n_ff, h, n_groups, group_expert, group_start, slot_token, slot_weight, scale, out, r0, r1
    "nemoq_moe_down": ([_p, ctypes.c_int, _i64, _i64, _p, _i64, _p, _p, _p, _p, _p, _p, _i64, _i64], ctypes.c_int),
    # x, rows, n, type of the weights it will meet, q, d, ds, s16
    "nemoq_q8_quantize": ([_p, _i64, _i64, ctypes.c_int, _p, _p, _p, _p], None),
    # up, type, n_ff, hidden, xq, xd, xds, xs16, n_groups, group_expert, group_start, slot_token, scale, h, r0, r1
    "nemoq_moe_q8_up": ([_p, ctypes.c_int, _i64, _i64, _p, _p, _p, _p, _i64, _p, _p, _p, _p, _p, _i64, _i64],
                        ctypes.c_int),
    # down, type, hidden, n_ff, hq, hd, hds, hs16, n_groups, group_expert, group_start, slot_token, slot_weight,
    # scale, dots, out, r0, r1
    "nemoq_moe_q8_down": ([_p, ctypes.c_int, _i64, _i64, _p, _p, _p, _p, _i64, _p, _p, _p, _p, _p, _p, _p, _i64,
                           _i64], ctypes.c_int),
    "nemoq_moe_matvec": ([_p], ctypes.c_int),   # a _Call
}


class _Call(ctypes.Structure):
    """moe_run.c's nemoq_moe_call: one whole moe_matvec."""
    _fields_ = [("up", _p), ("down", _p), ("up_type", ctypes.c_int32), ("down_type", ctypes.c_int32),
                ("n_experts", _i64), ("n_ff", _i64), ("hidden", _i64), ("n_tokens", _i64), ("top_k", _i64),
                ("x", _p), ("expert_ids", _p), ("expert_weights", _p), ("up_scale", _p), ("down_scale", _p),
                ("q8", ctypes.c_int32), ("threads", ctypes.c_int32), ("out", _p)]


_C_ERRORS = {-1: "a format or width it does not read", -2: "out of memory", -3: "an expert id out of range"}


def _bind(lib: ctypes.CDLL) -> dict:
    """The functions `lib` has (a library built from moe.c alone lacks moe_q8.c's)."""
    fns = {}
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        fn.argtypes, fn.restype = args, res
        fns[name] = fn
    return fns


@lru_cache(maxsize=1)
def _functions() -> dict | None:
    lib = library()
    return None if lib is None else _bind(lib)


def available() -> bool:
    return _functions() is not None


def row_dots() -> str | None:
    """Which row dot products this build runs ("AVX2" or "portable C"), None without the library."""
    fns = _functions()
    if fns is None or "nemoq_moe_avx2" not in fns:
        return None
    return "AVX2" if fns["nemoq_moe_avx2"]() else "portable C"


@dataclass(frozen=True)
class Routing:
    """Token slots grouped by expert: group g is expert group_expert[g] with slots
    group_start[g] .. group_start[g + 1] - 1; slot s is token slot_token[s] with weight slot_weight[s]."""
    group_expert: np.ndarray   # int32 (G,)
    group_start: np.ndarray    # int64 (G + 1,)
    slot_token: np.ndarray     # int32 (S,)
    slot_weight: np.ndarray    # float32 (S,)
    slot_index: np.ndarray     # int64 (S,): t * k + j for the slot of expert_ids[t, j]

    @property
    def n_slots(self) -> int:
        return len(self.slot_token)


def _routing_inputs(expert_ids, expert_weights, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, k) ids and weights as checked arrays (ids of any integer type, weights float32)."""
    ids = np.asarray(expert_ids)
    w = np.asarray(expert_weights, dtype=np.float32)
    if ids.ndim != 2 or ids.shape[0] != n_tokens or w.shape != ids.shape:
        raise ValueError(f"expert_ids {ids.shape} and expert_weights {w.shape} must both be (tokens={n_tokens}, k)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert_ids must be integers, got {ids.dtype}")
    return ids, w


def _bad_ids(ids: np.ndarray, n_experts: int) -> ValueError:
    return ValueError(f"expert ids must be in 0..{n_experts - 1}, got {ids.min()}..{ids.max()}")


def route(expert_ids, expert_weights, n_experts: int, n_tokens: int) -> Routing:
    """Group the (T, k) routing by expert, dropping zero weights; slots stay in token order."""
    ids, w = _routing_inputs(expert_ids, expert_weights, n_tokens)
    if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
        raise _bad_ids(ids, n_experts)
    keep = (w != 0).ravel()
    tokens = np.repeat(np.arange(n_tokens, dtype=np.int32), ids.shape[1])[keep]
    experts, weights = ids.ravel()[keep].astype(np.int32), w.ravel()[keep]
    order = np.argsort(experts, kind="stable")
    group_expert, counts = np.unique(experts[order], return_counts=True)
    return Routing(group_expert.astype(np.int32), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.ascontiguousarray(tokens[order]), np.ascontiguousarray(weights[order]),
                   np.flatnonzero(keep)[order].astype(np.int64))


@lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nemoq-moe")


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """n rows as at most `parts` contiguous ranges of near-equal size."""
    parts = max(1, min(parts, n))
    edges = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _scale(scale, n_experts: int, name: str):
    if scale is None:
        return None, None
    s = np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
    if s.shape != (n_experts,):
        raise ValueError(f"{name} must hold one scale per expert ({n_experts}), got shape {np.shape(scale)}")
    return s, s.ctypes.data


def _check_formats(activations: str, **formats: str) -> None:
    for name, fmt in formats.items():
        if fmt not in TYPE_IDS:
            raise ValueError(f"{name} {fmt!r}: the MoE kernel reads {', '.join(MOE_FORMATS)}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations {activations!r}: expected one of {', '.join(ACTIVATIONS)}")


def _stack(stack: np.ndarray, fmt: str, width: int, name: str) -> tuple[int, int]:
    """(experts, rows) of a uint8 stack of rows of `width` values in `fmt`."""
    if stack.dtype != np.uint8 or stack.ndim != 3 or stack.shape[2] != row_bytes(fmt, width):
        raise ValueError(f"{name}: expected uint8 (experts, rows, {row_bytes(fmt, width)}) for rows of {width} "
                         f"{fmt} values, got {stack.dtype} {stack.shape}")
    if not stack.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (a GGUF tensor or memmap of it is)")
    return stack.shape[0], stack.shape[1]


def _library(activations: str) -> dict:
    fns = _functions()
    if fns is None or (activations == "q8" and "nemoq_moe_q8_up" not in fns):
        raise RuntimeError("nemoq_moe: the C kernels are unavailable")
    return fns


def _run(phase, n_rows: int, threads: int, what: str) -> None:
    """phase((r0, r1)) over n_rows rows split across threads; each returns 0 or a C error code."""
    ranges = _ranges(n_rows, threads)
    # the calling thread takes the first range itself: while it works, the pool's threads wake
    # up (on a small VM a wake-up costs ~0.1 ms, a tenth of a phase at T = 1)
    others = [_pool(threads).submit(phase, rr) for rr in ranges[1:]]
    codes = [phase(ranges[0])] + [f.result() for f in others]
    if any(codes):
        raise RuntimeError(f"nemoq_moe: the C kernel refused {what} (code {codes})")


def _q8(fns: dict, v: np.ndarray, fmt: str) -> tuple[np.ndarray, ...]:
    """(rows, n) float32 -> the 8-bit activations ggml pairs with weights in `fmt` (Q8_0, or Q8_K
    for the k-quants) as the C kernels read them: q int8 (rows, n; for some formats in the row
    dot's own order within a block), per 32 values the block scale d and d * sum(q) float32
    (rows, n / 32), sums of q per 16 values float32 (rows, n / 16)."""
    rows, n = v.shape
    q, d, ds = np.empty((rows, n), np.int8), np.empty((rows, n // 32), np.float32), np.empty((rows, n // 32), np.float32)
    s16 = np.empty((rows, n // 16), np.float32)
    fns["nemoq_q8_quantize"](v.ctypes.data, rows, n, TYPE_IDS[fmt], q.ctypes.data, d.ctypes.data, ds.ctypes.data,
                             s16.ctypes.data)
    return q, d, ds, s16


def _groups(r: Routing) -> tuple:
    return len(r.group_expert), r.group_expert.ctypes.data, r.group_start.ctypes.data, r.slot_token.ctypes.data


def _up_phase(fns, x, r: Routing, up, fmt: str, scale_ptr, threads: int, activations: str) -> np.ndarray:
    """(S, I) float32: every slot's hidden vector relu(scale * up_e @ x_token)^2."""
    hidden, n_ff = x.shape[1], up.shape[1]
    h = np.empty((r.n_slots, n_ff), np.float32)
    if activations == "f32":
        def rows(rr):
            return fns["nemoq_moe_up"](up.ctypes.data, TYPE_IDS[fmt], n_ff, hidden, x.ctypes.data, *_groups(r),
                                       scale_ptr, h.ctypes.data, *rr)
    else:
        xq = _q8(fns, x, fmt)

        def rows(rr):
            return fns["nemoq_moe_q8_up"](up.ctypes.data, TYPE_IDS[fmt], n_ff, hidden, *(a.ctypes.data for a in xq),
                                          *_groups(r), scale_ptr, h.ctypes.data, *rr)
    _run(rows, n_ff, threads, f"up {fmt}")
    return h


def _down_phase(fns, h, r: Routing, n_tokens: int, down, fmt: str, scale_ptr, threads: int,
                activations: str) -> np.ndarray:
    """(T, H) float32: out[token(s)] += w_s * scale * down_e @ h[s] over the slots."""
    hidden, n_ff = down.shape[1], h.shape[1]
    out = np.zeros((n_tokens, hidden), np.float32)
    if activations == "f32":
        def rows(rr):
            return fns["nemoq_moe_down"](down.ctypes.data, TYPE_IDS[fmt], hidden, n_ff, h.ctypes.data, *_groups(r),
                                         r.slot_weight.ctypes.data, scale_ptr, out.ctypes.data, *rr)
    else:
        hq, dots = _q8(fns, h, fmt), np.empty((r.n_slots, hidden), np.float32)

        def rows(rr):
            return fns["nemoq_moe_q8_down"](down.ctypes.data, TYPE_IDS[fmt], hidden, n_ff,
                                            *(a.ctypes.data for a in hq), *_groups(r), r.slot_weight.ctypes.data,
                                            scale_ptr, dots.ctypes.data, out.ctypes.data, *rr)
    _run(rows, hidden, threads, f"down {fmt}")
    return out


def _threads(threads: int | None) -> int:
    return max(1, threads or os.cpu_count() or 1)


def moe_matvec(x, expert_ids, expert_weights, up, down, up_format: str, down_format: str, *,
               up_scale=None, down_scale=None, threads: int | None = None, activations: str = "f32") -> np.ndarray:
    """(T, H) float32: sum_j w_j * down[e_j] @ relu(up_scale[e_j] * up[e_j] @ x_t)^2 * down_scale[e_j].

    See the module docstring for the arguments. Falls back to the numpy reference (with one
    warning) when the C kernels cannot be built.
    """
    _check_formats(activations, up_format=up_format, down_format=down_format)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tokens, hidden, n_experts, n_ff = expert_shapes(x, up, down, up_format, down_format)
    fns = _functions()
    if fns is None:
        return moe_matvec_reference(x, expert_ids, expert_weights, up, down, up_format, down_format,
                                    up_scale, down_scale, activations)
    fns = _library(activations)
    _stack(up, up_format, hidden, "up")
    _stack(down, down_format, n_ff, "down")
    ids, w = _routing_inputs(expert_ids, expert_weights, n_tokens)
    if ids.dtype != np.int32:   # a wider id must not wrap into range
        if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
            raise _bad_ids(ids, n_experts)
        ids = ids.astype(np.int32)
    ids, w = np.ascontiguousarray(ids), np.ascontiguousarray(w)
    up_s, up_s_ptr = _scale(up_scale, n_experts, "up_scale")
    down_s, down_s_ptr = _scale(down_scale, n_experts, "down_scale")
    out = np.empty((n_tokens, hidden), np.float32)
    call = _Call(up.ctypes.data, down.ctypes.data, TYPE_IDS[up_format], TYPE_IDS[down_format], n_experts, n_ff,
                 hidden, n_tokens, ids.shape[1], x.ctypes.data, ids.ctypes.data, w.ctypes.data, up_s_ptr,
                 down_s_ptr, activations == "q8", _threads(threads), out.ctypes.data)
    code = fns["nemoq_moe_matvec"](ctypes.addressof(call))
    if code == -3:
        raise _bad_ids(ids, n_experts)
    if code:
        raise RuntimeError(f"nemoq_moe: the C kernel refused {up_format}/{down_format}: "
                           f"{_C_ERRORS.get(code, f'code {code}')}")
    return out


def moe_hidden(x, expert_ids, expert_weights, up, up_format: str, *, up_scale=None, threads: int | None = None,
               activations: str = "f32") -> np.ndarray:
    """(T, k, I) float32: the up phase alone, hidden[t, j] = relu(up_scale[e] * up[e] @ x_t)^2 for
    e = expert_ids[t, j] (zeros where the weight is 0: that slot is skipped). C kernels only."""
    _check_formats(activations, up_format=up_format)
    fns = _library(activations)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be (tokens, hidden), got shape {x.shape}")
    n_experts, n_ff = _stack(up, up_format, x.shape[1], "up")
    r = route(expert_ids, expert_weights, n_experts, len(x))
    up_s, up_s_ptr = _scale(up_scale, n_experts, "up_scale")
    out = np.zeros((len(x) * np.shape(expert_ids)[1], n_ff), np.float32)
    if r.n_slots:
        out[r.slot_index] = _up_phase(fns, x, r, up, up_format, up_s_ptr, _threads(threads), activations)
    return out.reshape(len(x), -1, n_ff)


def moe_down(hidden, expert_ids, expert_weights, down, down_format: str, *, down_scale=None,
             threads: int | None = None, activations: str = "f32") -> np.ndarray:
    """(T, H) float32: the down phase alone, sum_j w_j * down_scale[e] * down[e] @ hidden[t, j] for
    given hidden vectors (T, k, I) (rounded as ggml does first for activations="q8"). C kernels only."""
    _check_formats(activations, down_format=down_format)
    fns = _library(activations)
    hidden = np.asarray(hidden, dtype=np.float32)
    if hidden.ndim != 3 or hidden.shape[:2] != np.shape(expert_ids):
        raise ValueError(f"hidden must be (tokens, k, I) for expert_ids {np.shape(expert_ids)}, got {hidden.shape}")
    n_tokens, n_ff = hidden.shape[0], hidden.shape[2]
    n_experts, width = _stack(down, down_format, n_ff, "down")
    r = route(expert_ids, expert_weights, n_experts, n_tokens)
    down_s, down_s_ptr = _scale(down_scale, n_experts, "down_scale")
    if r.n_slots == 0:
        return np.zeros((n_tokens, width), np.float32)
    h = np.ascontiguousarray(hidden.reshape(-1, n_ff)[r.slot_index])
    return _down_phase(fns, h, r, n_tokens, down, down_format, down_s_ptr, _threads(threads), activations)
