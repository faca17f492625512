"""Source tensor names -> llama.cpp `nemotron_h_moe` tensors, as tables.

One table per block kind. Each row names the source tensor (relative to its layer), the
GGUF tensor (gguf-py's own constant), the shape the config says it must have, a named
transform and whether it stays F32. Adding an architecture variant is adding rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Callable

import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR, TENSOR_NAMES

MT = MODEL_TENSOR


def neg_exp(x: np.ndarray) -> np.ndarray:
    """-exp(x) in float32 through Python's decimal arithmetic: numpy's exp rounds differently on
    different CPUs (its SIMD paths) and releases, and these few values per layer are file bytes."""
    values = [-float(Decimal(float(v)).exp()) for v in x.ravel()]
    with np.errstate(over="ignore"):
        return np.array(values, dtype=np.float64).astype(np.float32).reshape(x.shape)


@dataclass(frozen=True)
class Transform:
    """How a source tensor becomes the GGUF tensor: a new shape and, rarely, new values."""
    reshape: Callable[[tuple[int, ...], dict], tuple[int, ...]]
    values: Callable[[np.ndarray], np.ndarray] | None = None  # applied to float32 data


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda s, d: s),
    # Conv1d weight (C, 1, K) -> (C, K): llama.cpp's ssm_conv works on 2-D kernels
    "squeeze_conv": Transform(lambda s, d: (s[0], s[-1])),
    # llama.cpp's ssm_scan takes A itself, not its log; one value per head as a (H, 1) column
    "neg_exp_column": Transform(lambda s, d: (s[0], 1), neg_exp),
    "column": Transform(lambda s, d: (s[0], 1)),
    # The gated RMSNorm normalises per group: llama.cpp wants one row per group
    "group_rows": Transform(lambda s, d: (d["ssm_groups"], s[0] // d["ssm_groups"])),
}


@dataclass(frozen=True)
class Row:
    source: str                     # name under `<prefix>.layers.N.` (or the full name for globals)
    tensor: MODEL_TENSOR
    suffix: str | None              # ".weight" / ".bias" after the GGUF base name; None for ssm_a/ssm_d
    shape: tuple[str | int, ...]    # expected source shape, in ModelConfig.dims names
    transform: str = "identity"
    keep_f32: bool = False          # small or precision-critical: never stored below F32
    stacked: bool = False           # one source tensor per expert ({xid}), stacked on a new axis 0
    if_config: str | None = None    # row applies only when this config key is true
    if_field: str | None = None     # row applies only when this ModelConfig field is set (non-zero)
    absent_if: str | None = None    # the source may be missing when this ModelConfig field is true

    def gguf_name(self, layer: int | None) -> str:
        base = TENSOR_NAMES[self.tensor].format(bid=layer)
        return f"{base}.{self.suffix}" if self.suffix else base


LAYER_ROWS = (
    Row("norm.weight", MT.ATTN_NORM, "weight", ("hidden",), keep_f32=True),
)

MAMBA_ROWS = (
    Row("mixer.in_proj.weight", MT.SSM_IN, "weight", ("in_proj", "hidden")),
    Row("mixer.conv1d.weight", MT.SSM_CONV1D, "weight", ("conv_dim", 1, "conv_kernel"), "squeeze_conv", keep_f32=True),
    Row("mixer.conv1d.bias", MT.SSM_CONV1D, "bias", ("conv_dim",), keep_f32=True, if_config="use_conv_bias"),
    Row("mixer.A_log", MT.SSM_A, None, ("mamba_heads",), "neg_exp_column", keep_f32=True),
    Row("mixer.D", MT.SSM_D, None, ("mamba_heads",), "column", keep_f32=True),
    Row("mixer.dt_bias", MT.SSM_DT, "bias", ("mamba_heads",), keep_f32=True),
    Row("mixer.norm.weight", MT.SSM_NORM, "weight", ("d_inner",), "group_rows", keep_f32=True),
    Row("mixer.out_proj.weight", MT.SSM_OUT, "weight", ("hidden", "d_inner")),
)

ATTENTION_ROWS = (
    Row("mixer.q_proj.weight", MT.ATTN_Q, "weight", ("q_dim", "hidden")),
    Row("mixer.k_proj.weight", MT.ATTN_K, "weight", ("kv_dim", "hidden")),
    Row("mixer.v_proj.weight", MT.ATTN_V, "weight", ("kv_dim", "hidden")),
    Row("mixer.o_proj.weight", MT.ATTN_OUT, "weight", ("hidden", "q_dim")),
)

# Router and shared expert read the full-width input, also in a LatentMoE layer.
MOE_ROWS = (
    Row("mixer.gate.weight", MT.FFN_GATE_INP, "weight", ("experts", "hidden"), keep_f32=True),
    Row("mixer.gate.e_score_correction_bias", MT.FFN_EXP_PROBS_B, "bias", ("experts",), keep_f32=True),
    Row("mixer.shared_experts.up_proj.weight", MT.FFN_UP_SHEXP, "weight", ("shared_ff", "hidden")),
    Row("mixer.shared_experts.down_proj.weight", MT.FFN_DOWN_SHEXP, "weight", ("hidden", "shared_ff")),
    # LatentMoE (Nemotron 3 Super): the routed experts run between these two projections
    Row("mixer.fc1_latent_proj.weight", MT.MOE_LATENT_DOWN, "weight", ("latent", "hidden"), if_field="latent"),
    Row("mixer.fc2_latent_proj.weight", MT.MOE_LATENT_UP, "weight", ("hidden", "latent"), if_field="latent"),
)

# The hub checkpoint stores one tensor per expert; llama.cpp wants one (E, out, in) stack. Experts
# read and write "expert_io": the hidden width, or the latent width of a LatentMoE model.
PER_EXPERT_ROWS = (
    Row("mixer.experts.{xid}.up_proj.weight", MT.FFN_UP_EXP, "weight", ("expert_ff", "expert_io"), stacked=True),
    Row("mixer.experts.{xid}.down_proj.weight", MT.FFN_DOWN_EXP, "weight", ("expert_io", "expert_ff"), stacked=True),
)

# transformers-5 save_pretrained already fuses them in llama.cpp's order.
FUSED_EXPERT_ROWS = (
    Row("mixer.experts.up_proj", MT.FFN_UP_EXP, "weight", ("experts", "expert_ff", "expert_io")),
    Row("mixer.experts.down_proj", MT.FFN_DOWN_EXP, "weight", ("experts", "expert_io", "expert_ff")),
)

ROWS_BY_LAYER_KIND = {
    "mamba": LAYER_ROWS + MAMBA_ROWS,
    "attention": LAYER_ROWS + ATTENTION_ROWS,
    "moe": LAYER_ROWS + MOE_ROWS,
}


def _under(prefix: str, rows: tuple[Row, ...]) -> tuple[Row, ...]:
    return tuple(replace(row, source=prefix + row.source) for row in rows)


# The multi-token-prediction block, as NVIDIA's hub checkpoints name it (under `mtp.layers.`):
# sub-layer 0 fuses the next token's embedding with the trunk's hidden state (enorm, hnorm, eh_proj)
# and runs attention, sub-layer 1 an MoE and the head's own final norm. llama.cpp folds both into
# one extra block (layer index = block count of the trunk; llama.cpp's converter does the same).
MTP_ROWS = (
    Row("0.enorm.weight", MT.NEXTN_ENORM, "weight", ("hidden",), keep_f32=True),
    Row("0.hnorm.weight", MT.NEXTN_HNORM, "weight", ("hidden",), keep_f32=True),
    Row("0.eh_proj.weight", MT.NEXTN_EH_PROJ, "weight", ("hidden", "hidden_x2")),
    *_under("0.", LAYER_ROWS + ATTENTION_ROWS),
    Row("1.norm.weight", MT.ATTN_POST_NORM, "weight", ("hidden",), keep_f32=True),   # the MoE's input norm
    *_under("1.", MOE_ROWS),
    # llama.cpp applies it as a mean-centred LayerNorm (vLLM and TensorRT-LLM: RMSNorm); docs/convert.md
    Row("1.final_layernorm.weight", MT.NEXTN_SHARED_HEAD_NORM, "weight", ("hidden",), keep_f32=True),
)
MTP_EXPERT_LAYOUTS = {layout: _under("1.", rows) for layout, rows in (
    ("per-expert", PER_EXPERT_ROWS), ("fused", FUSED_EXPERT_ROWS))}
MTP_PREFIX = "mtp.layers."

# Whole-model tensors; "{prefix}" is the checkpoint's model prefix (backbone / model).
HEAD_ROWS = (
    Row("{prefix}.embeddings.weight", MT.TOKEN_EMBD, "weight", ("vocab", "hidden")),
)
TAIL_ROWS = (
    Row("{prefix}.norm_f.weight", MT.OUTPUT_NORM, "weight", ("hidden",), keep_f32=True),
    # A tied checkpoint may have no lm_head: llama.cpp's converter then writes no output.weight and
    # llama.cpp multiplies by token_embd instead. An lm_head that is there is converted (transformers
    # and llama.cpp both use it, tied or not).
    Row("lm_head.weight", MT.OUTPUT, "weight", ("vocab", "hidden"), absent_if="tied_embeddings"),
)

# The two checkpoint layouts: how the model prefix and the expert storage are recognised.
MODEL_PREFIXES = ("backbone", "model")
EXPERT_LAYOUTS = {"per-expert": PER_EXPERT_ROWS, "fused": FUSED_EXPERT_ROWS}

# GGUF weights whose `<name>.scale` (one multiplier per matrix) llama.cpp loads and applies to
# the matmul output, checked against llama-cpp-python; `output.scale` makes it refuse the file.
# With the first llama.cpp release (bNNNN) that does so for nemotron_h_moe, read in llama.cpp's
# sources (docs/quantize.md): the Mamba projections and the (shared) experts came with PR #20561
# (b8372); attention with PR #21245 (April 2026: b8827 applies them, b8475 loads and ignores them).
SCALE_LOADED_SINCE = {
    MT.SSM_IN: 8372, MT.SSM_OUT: 8372, MT.FFN_UP_EXP: 8372, MT.FFN_DOWN_EXP: 8372,
    MT.FFN_UP_SHEXP: 8372, MT.FFN_DOWN_SHEXP: 8372,
    MT.ATTN_Q: 8827, MT.ATTN_K: 8827, MT.ATTN_V: 8827, MT.ATTN_OUT: 8827,
}
SCALE_LOADED = frozenset(SCALE_LOADED_SINCE)
# `<name>.input_scale` (ModelOpt's activation scale; weight-only matmuls do not use it): b8827's
# loader takes it, b8475's refuses the file.
INPUT_SCALE_LOADED_SINCE = 8827


def llama_cpp_build_for(tensor_names) -> int:
    """The oldest llama.cpp release (its bNNNN number) that loads and applies every `.scale` and
    `.input_scale` tensor among these GGUF names; 0 when there is none."""
    since = {TENSOR_NAMES[k]: build for k, build in SCALE_LOADED_SINCE.items()}
    needed = 0
    for name in tensor_names:
        base, _, suffix = name.rpartition(".")
        generic = re.sub(r"^blk\.\d+\.", "blk.{bid}.", base)
        if suffix == "scale" and generic in since:
            needed = max(needed, since[generic])
        elif suffix == "input_scale":
            needed = max(needed, INPUT_SCALE_LOADED_SINCE)
    return needed

# Tensors of the multi-token-prediction head when it is not converted (--no-mtp, Puzzle): skipped on
# purpose and reported.
SKIPPED_PREFIXES = ("mtp.",)

GGUF_ARCH = MODEL_ARCH.NEMOTRON_H_MOE
GGUF_ARCH_NAME = "nemotron_h_moe"
