"""The MoE reference kernel (moe.c) through ctypes: routed experts straight from the quantized stacks.

    from nemoq.kernels_c.moe import moe_matvec
    y = moe_matvec(x, expert_ids, expert_weights, up, down, "q4_k", "q6_k")   # (T, H) float32

x: (T, H) float32 tokens; expert_ids: (T, k) ints; expert_weights: (T, k) router weights (already
normalised and scaled); up: ffn_up_exps as uint8 (E, I, H / block * bytes); down: ffn_down_exps as
uint8 (E, H, I / block * bytes), e.g. the arrays gguf-py's GGUFReader returns; optional (E,)
per-expert scales (llama.cpp's `.scale` companions). y_t = sum_j w_j * down[e_j] @ relu(up[e_j] @
x_t)^2, defined in numpy by nemoq/quant/moe_reference.py. A slot with weight 0 adds nothing.

No nemoq command runs this: llama.cpp does the inference. It is the reference a runtime port can
check its own kernel against, so it stays plain (one thread, one block dequantized at a time;
docs/kernels.md). Its CUDA twin is nemoq.kernels_c.cuda.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType

from nemoq.kernels_c import KERNEL_FORMATS
from nemoq.kernels_c.build import library

__all__ = ["MOE_FORMATS", "TYPE_IDS", "MoeInputs", "available", "expert_shapes", "moe_inputs", "moe_matvec",
           "row_bytes", "row_dots"]

# Every format with a C dequantizer: all the block formats nemoq's recipes write. C knows them by ggml type id.
MOE_FORMATS = tuple(KERNEL_FORMATS)
TYPE_IDS = {name: int(GGMLQuantizationType[name.upper()]) for name in MOE_FORMATS}

_p, _i64 = ctypes.c_void_p, ctypes.c_int64
# up, up type, down, down type, E, I, H, x, T, k, expert_ids, expert_weights, up_scale, down_scale, out
_ARGS = [_p, ctypes.c_int, _p, ctypes.c_int, _i64, _i64, _i64, _p, _i64, _i64, _p, _p, _p, _p, _p]
_C_ERRORS = {-1: "a format or width it does not read", -2: "out of memory", -3: "an expert id out of range"}


def row_bytes(fmt: str, n: int) -> int:
    """Bytes of one row of n values in block format `fmt` (a whole number of blocks)."""
    block, size = KERNEL_FORMATS[fmt]
    if n % block:
        raise ValueError(f"{fmt}: row width {n} is not a multiple of the block size {block}")
    return n // block * size


def expert_shapes(x: np.ndarray, up: np.ndarray, down: np.ndarray, up_format: str, down_format: str):
    """(T, H, E, I) after checking that the stacks hold (E, I, H) and (E, H, I) in their formats."""
    for name, fmt in (("up_format", up_format), ("down_format", down_format)):
        if fmt not in KERNEL_FORMATS:
            raise ValueError(f"{name} {fmt!r}: the MoE kernel reads {', '.join(MOE_FORMATS)}")
    if x.ndim != 2:
        raise ValueError(f"x must be (tokens, hidden), got shape {x.shape}")
    n_tokens, hidden = x.shape
    if up.dtype != np.uint8 or up.ndim != 3 or down.dtype != np.uint8 or down.ndim != 3:
        raise ValueError("up and down must be uint8 stacks (experts, rows, row bytes)")
    n_experts, n_ff = up.shape[:2]
    if up.shape[2] != row_bytes(up_format, hidden):
        raise ValueError(f"up: {up.shape[2]} bytes per row, expected {row_bytes(up_format, hidden)} "
                         f"for {hidden} {up_format} values")
    if down.shape != (n_experts, hidden, row_bytes(down_format, n_ff)):
        raise ValueError(f"down: shape {down.shape}, expected {(n_experts, hidden, row_bytes(down_format, n_ff))} "
                         f"for ({n_experts}, {hidden}, {n_ff}) {down_format} values")
    return n_tokens, hidden, n_experts, n_ff


@dataclass(frozen=True)
class MoeInputs:
    """One call's arrays, checked and laid out as moe.c and moe.cu read them."""
    x: np.ndarray                   # float32 (T, H)
    expert_ids: np.ndarray          # int32 (T, k)
    expert_weights: np.ndarray      # float32 (T, k)
    up: np.ndarray                  # uint8 (E, I, row bytes)
    down: np.ndarray                # uint8 (E, H, row bytes)
    up_type: int
    down_type: int
    up_scale: np.ndarray | None     # float32 (E,)
    down_scale: np.ndarray | None

    @property
    def n_experts(self) -> int:
        return self.up.shape[0]

    @property
    def n_ff(self) -> int:
        return self.up.shape[1]


def _scale(scale, n_experts: int, name: str) -> np.ndarray | None:
    if scale is None:
        return None
    s = np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
    if s.shape != (n_experts,):
        raise ValueError(f"{name} must hold one scale per expert ({n_experts}), got shape {np.shape(scale)}")
    return s


def moe_inputs(x, expert_ids, expert_weights, up, down, up_format: str, down_format: str,
               up_scale=None, down_scale=None) -> MoeInputs:
    """The arguments of moe_matvec checked (one line saying what is wrong) and made contiguous."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tokens, _, n_experts, _ = expert_shapes(x, np.asarray(up), np.asarray(down), up_format, down_format)
    ids, w = np.asarray(expert_ids), np.asarray(expert_weights, dtype=np.float32)
    if ids.ndim != 2 or ids.shape[0] != n_tokens or w.shape != ids.shape:
        raise ValueError(f"expert_ids {ids.shape} and expert_weights {w.shape} must both be (tokens={n_tokens}, k)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert_ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_experts):   # before the cast: a wide id must not wrap
        raise ValueError(f"expert ids must be in 0..{n_experts - 1}, got {ids.min()}..{ids.max()}")
    return MoeInputs(x, np.ascontiguousarray(ids, dtype=np.int32), np.ascontiguousarray(w),
                     np.ascontiguousarray(up), np.ascontiguousarray(down), TYPE_IDS[up_format], TYPE_IDS[down_format],
                     _scale(up_scale, n_experts, "up_scale"), _scale(down_scale, n_experts, "down_scale"))


def pointer(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


@lru_cache(maxsize=1)
def _function():
    lib = library()
    if lib is None:
        return None
    fn = lib.nemoq_moe_reference
    fn.argtypes, fn.restype = _ARGS, ctypes.c_int
    return fn


def available() -> bool:
    return _function() is not None


def row_dots() -> str | None:
    """How the kernel computes its row dots, as `nemoq info --kernels` shows it; None without the library."""
    return "plain C, one block dequantized at a time" if available() else None


def moe_matvec(x, expert_ids, expert_weights, up, down, up_format: str, down_format: str, *,
               up_scale=None, down_scale=None) -> np.ndarray:
    """(T, H) float32: sum_j w_j * down_scale[e_j] * down[e_j] @ relu(up_scale[e_j] * up[e_j] @ x_t)^2.

    See the module docstring for the arguments; RuntimeError when the C kernels cannot be built
    (nemoq.quant.moe_reference computes the same in numpy)."""
    a = moe_inputs(x, expert_ids, expert_weights, up, down, up_format, down_format, up_scale, down_scale)
    fn = _function()
    if fn is None:
        raise RuntimeError("nemoq MoE reference kernel: the C kernels are unavailable (nemoq info --kernels says why)")
    n_tokens, hidden = a.x.shape
    out = np.empty((n_tokens, hidden), np.float32)
    code = fn(pointer(a.up), a.up_type, pointer(a.down), a.down_type, a.n_experts, a.n_ff, hidden, pointer(a.x),
              n_tokens, a.expert_ids.shape[1], pointer(a.expert_ids), pointer(a.expert_weights),
              pointer(a.up_scale), pointer(a.down_scale), pointer(out))
    if code:
        raise RuntimeError(f"nemoq MoE reference kernel refused {up_format}/{down_format}: "
                           f"{_C_ERRORS.get(code, f'code {code}')}")
    return out
