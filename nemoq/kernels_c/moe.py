"""Routed experts straight from the quantized stacks: the C kernel of moe.c, through ctypes.

    from nemoq.kernels_c.moe import moe_matvec
    y = moe_matvec(x, expert_ids, expert_weights, up, down, "q4_k", "q6_k")   # (T, H) float32

x: (T, H) float32 tokens; expert_ids: (T, k) ints; expert_weights: (T, k) router weights (already
normalised and scaled); up: ffn_up_exps as uint8 (E, I, H / block * bytes); down: ffn_down_exps
as uint8 (E, H, I / block * bytes), e.g. the arrays gguf-py's GGUFReader returns (or np.memmap
views of the file). y_t = sum_j w_j * down[e_j] @ relu(up[e_j] @ x_t)^2, defined by
nemoq/quant/moe_reference.py. Slots with weight 0 are skipped: they add exactly nothing.

Threads: the tokens' (expert, weight) slots are grouped by expert in numpy, then two C calls
per thread run: the up phase splits the I rows of every routed expert into `threads` ranges,
the down phase the H output rows, with a join between. Each thread reads its slice of each
expert once, for all tokens routed to it, and owns its output rows, so the result does not
depend on `threads`. ctypes releases the GIL for each call.
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
from nemoq.quant.moe_reference import expert_shapes, moe_matvec_reference

__all__ = ["MOE_FORMATS", "Routing", "route", "moe_matvec", "available"]

# The block formats the kernel reads, by name; C knows them by ggml type id.
MOE_FORMATS = ("q8_0", "q5_0", "iq4_nl", "mxfp4", "nvfp4", "q4_k", "q5_k", "q6_k")
TYPE_IDS = {name: GGMLQuantizationType[name.upper()].value for name in MOE_FORMATS}

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_SIGNATURES = {
    "nemoq_moe_supports": ([ctypes.c_int], ctypes.c_int),
    # up, type, n_ff, hidden, x, n_groups, group_expert, group_start, slot_token, scale, h, r0, r1
    "nemoq_moe_up": ([_p, ctypes.c_int, _i64, _i64, _p, _i64, _p, _p, _p, _p, _p, _i64, _i64], ctypes.c_int),
    # down, type, hidden, n_ff, h, n_groups, group_expert, group_start, slot_token, slot_weight, scale, out, r0, r1
    "nemoq_moe_down": ([_p, ctypes.c_int, _i64, _i64, _p, _i64, _p, _p, _p, _p, _p, _p, _i64, _i64], ctypes.c_int),
}


def _bind(lib: ctypes.CDLL) -> dict:
    fns = {}
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
        fns[name] = fn
    return fns


@lru_cache(maxsize=1)
def _functions() -> dict | None:
    lib = library()
    return None if lib is None else _bind(lib)


def available() -> bool:
    return _functions() is not None


@dataclass(frozen=True)
class Routing:
    """Token slots grouped by expert: group g is expert group_expert[g] with slots
    group_start[g] .. group_start[g + 1] - 1; slot s is token slot_token[s] with weight slot_weight[s]."""
    group_expert: np.ndarray   # int32 (G,)
    group_start: np.ndarray    # int64 (G + 1,)
    slot_token: np.ndarray     # int32 (S,)
    slot_weight: np.ndarray    # float32 (S,)

    @property
    def n_slots(self) -> int:
        return len(self.slot_token)


def route(expert_ids, expert_weights, n_experts: int, n_tokens: int) -> Routing:
    """Group the (T, k) routing by expert, dropping zero weights; slots stay in token order."""
    ids = np.asarray(expert_ids)
    w = np.asarray(expert_weights, dtype=np.float32)
    if ids.ndim != 2 or ids.shape[0] != n_tokens or w.shape != ids.shape:
        raise ValueError(f"expert_ids {ids.shape} and expert_weights {w.shape} must both be (tokens={n_tokens}, k)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert_ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
        raise ValueError(f"expert ids must be in 0..{n_experts - 1}, got {ids.min()}..{ids.max()}")
    keep = (w != 0).ravel()
    tokens = np.repeat(np.arange(n_tokens, dtype=np.int32), ids.shape[1])[keep]
    experts, weights = ids.ravel()[keep].astype(np.int32), w.ravel()[keep]
    order = np.argsort(experts, kind="stable")
    group_expert, counts = np.unique(experts[order], return_counts=True)
    return Routing(group_expert.astype(np.int32), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.ascontiguousarray(tokens[order]), np.ascontiguousarray(weights[order]))


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


def moe_matvec(x, expert_ids, expert_weights, up, down, up_format: str, down_format: str, *,
               up_scale=None, down_scale=None, threads: int | None = None) -> np.ndarray:
    """(T, H) float32: sum_j w_j * down[e_j] @ relu(up_scale[e_j] * up[e_j] @ x_t)^2 * down_scale[e_j].

    See the module docstring for the arguments. Falls back to the numpy reference (with one
    warning) when the C kernels cannot be built.
    """
    for name, fmt in (("up_format", up_format), ("down_format", down_format)):
        if fmt not in TYPE_IDS:
            raise ValueError(f"{name} {fmt!r}: the MoE kernel reads {', '.join(MOE_FORMATS)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tokens, hidden, n_experts, n_ff = expert_shapes(x, up, down, up_format, down_format)
    fns = _functions()
    if fns is None:
        return moe_matvec_reference(x, expert_ids, expert_weights, up, down, up_format, down_format,
                                    up_scale, down_scale)
    if not (up.flags.c_contiguous and down.flags.c_contiguous):
        raise ValueError("up and down must be C-contiguous (a GGUF tensor or memmap of it is)")
    r = route(expert_ids, expert_weights, n_experts, n_tokens)
    up_s, up_s_ptr = _scale(up_scale, n_experts, "up_scale")
    down_s, down_s_ptr = _scale(down_scale, n_experts, "down_scale")
    h = np.empty((r.n_slots, n_ff), np.float32)
    out = np.zeros((n_tokens, hidden), np.float32)
    if r.n_slots == 0:
        return out
    groups = (len(r.group_expert), r.group_expert.ctypes.data, r.group_start.ctypes.data, r.slot_token.ctypes.data)

    def up_rows(rows):
        return fns["nemoq_moe_up"](up.ctypes.data, TYPE_IDS[up_format], n_ff, hidden, x.ctypes.data,
                                   *groups, up_s_ptr, h.ctypes.data, *rows)

    def down_rows(rows):
        return fns["nemoq_moe_down"](down.ctypes.data, TYPE_IDS[down_format], hidden, n_ff, h.ctypes.data,
                                     *groups, r.slot_weight.ctypes.data, down_s_ptr, out.ctypes.data, *rows)

    threads = max(1, threads or os.cpu_count() or 1)
    for phase, n_rows in ((up_rows, n_ff), (down_rows, hidden)):
        ranges = _ranges(n_rows, threads)
        codes = [phase(ranges[0])] if len(ranges) == 1 else list(_pool(threads).map(phase, ranges))
        if any(codes):
            raise RuntimeError(f"nemoq_moe: the C kernel refused {up_format}/{down_format} (code {codes})")
    return out
