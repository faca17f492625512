"""GGUF key/values for `nemotron_h_moe`, as a table of (gguf-py writer method, value).

llama.cpp tells the layer kinds apart from two per-layer arrays: feed_forward_length > 0
marks an MoE layer, attention.head_count_kv > 0 an attention layer, the rest are Mamba. The
multi-token-prediction block it appends after the trunk (block_count + 1, nextn_predict_layers)
holds an attention and an MoE sub-layer, so it counts as both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import gguf

from nemoq.convert.config import ModelConfig

Keys = gguf.Keys.LLM


def _kinds(config: ModelConfig) -> list[str]:
    """Layer kinds of the GGUF's blocks: the trunk, then the MTP block if one is written."""
    return [*config.layer_kinds, *(["mtp"] if config.mtp_layer is not None else [])]


def _per_layer(config: ModelConfig, kind: str, value: int) -> list[int]:
    return [value if k in (kind, "mtp") else 0 for k in _kinds(config)]


def _moe_per_layer(config: ModelConfig, value: Callable[[int], int]) -> list[int]:
    return [value(i) if k in ("moe", "mtp") else 0 for i, k in enumerate(_kinds(config))]


def _scalar_or_per_layer(key: str) -> Callable[[gguf.GGUFWriter, int | list[int]], None]:
    """A writer for a key llama.cpp reads as one value or one per layer (get_key_or_arr)."""
    def add(writer: gguf.GGUFWriter, value: int | list[int]) -> None:
        name = key.format(arch=writer.arch)
        writer.add_array(name, value) if isinstance(value, list) else writer.add_uint32(name, value)
    return add


def _per_layer_if_puzzle(value: Callable[[ModelConfig, int], int], uniform: Callable[[ModelConfig], int]):
    """Puzzle's per-layer expert sizes as arrays (0 on non-MoE layers), as llama.cpp's converter
    writes them; one value otherwise."""
    return lambda c: _moe_per_layer(c, lambda i: value(c, i)) if c.is_puzzle else uniform(c)


# The recipe (and --tensor-type overrides) that typed a quantized file, as the user gave them:
# general.file_type can only name llama.cpp's recipes, not "NQ4".
RECIPE_KEY = "nemoq.recipe"

# A hybrid without positional encoding is not limited by its training length; as llama.cpp's
# converter does, advertise at least 2^20 tokens (the model card's 1M context).
MIN_CONTEXT_LENGTH = 2**20

HPARAMS: tuple[tuple[str | Callable, Callable[[ModelConfig], Any]], ...] = (
    ("add_context_length", lambda c: max(c.context_length, MIN_CONTEXT_LENGTH)),
    ("add_embedding_length", lambda c: c.hidden),
    ("add_block_count", lambda c: len(_kinds(c))),
    ("add_vocab_size", lambda c: c.vocab),
    ("add_feed_forward_length", lambda c: _moe_per_layer(c, c.expert_ff_of)),
    ("add_head_count", lambda c: c.n_heads),
    ("add_head_count_kv", lambda c: _per_layer(c, "attention", c.n_kv_heads)),
    ("add_key_length", lambda c: c.head_dim),
    ("add_value_length", lambda c: c.head_dim),
    ("add_layer_norm_eps", lambda c: c.norm_eps),
    ("add_layer_norm_rms_eps", lambda c: c.norm_eps),
    # No RoPE is applied; public GGUFs of the model carry hidden / heads here all the same.
    ("add_rope_dimension_count", lambda c: c.hidden // c.n_heads),
    ("add_rope_scaling_finetuned", lambda c: False),
    ("add_ssm_conv_kernel", lambda c: c.conv_kernel),
    ("add_ssm_state_size", lambda c: c.ssm_state),
    ("add_ssm_group_count", lambda c: c.ssm_groups),
    ("add_ssm_inner_size", lambda c: c.d_inner),
    # llama.cpp reads the Mamba-2 head count from time_step_rank
    ("add_ssm_time_step_rank", lambda c: c.mamba_heads),
    ("add_expert_count", lambda c: c.n_experts),
    (_scalar_or_per_layer(Keys.EXPERT_USED_COUNT),
     _per_layer_if_puzzle(ModelConfig.experts_used_of, lambda c: c.n_experts_used)),
    ("add_expert_group_count", lambda c: c.n_expert_groups),
    ("add_expert_group_used_count", lambda c: c.n_expert_groups_used),
    (_scalar_or_per_layer(Keys.EXPERT_FEED_FORWARD_LENGTH),
     _per_layer_if_puzzle(ModelConfig.expert_ff_of, lambda c: c.expert_ff)),
    ("add_expert_shared_feed_forward_length", lambda c: c.shared_ff),
    ("add_expert_shared_count", lambda c: c.n_shared_experts),
    ("add_expert_weights_norm", lambda c: c.norm_topk),
    ("add_expert_weights_scale", lambda c: c.routed_scaling),
    # written only when the model has them (None: no key), as llama.cpp's converter does
    ("add_moe_latent_size", lambda c: c.latent or None),
    ("add_nextn_predict_layers", lambda c: c.n_mtp_layers if c.mtp_layer is not None else None),
)


def add_hparams(writer: gguf.GGUFWriter, config: ModelConfig, name: str, mtp_layers: int | None = None) -> None:
    """`mtp_layers`: MTP blocks the file holds (the plan's; None: as many as the config declares)."""
    if mtp_layers is not None:
        config = dataclasses.replace(config, n_mtp_layers=mtp_layers)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    for method, value in HPARAMS:
        v = value(config)
        if v is None:
            continue
        if isinstance(method, str):   # a GGUFWriter method
            getattr(writer, method)(v)
        else:                         # a function of (writer, value)
            method(writer, v)


def add_size_label(writer: gguf.GGUFWriter) -> None:
    """general.size_label (e.g. 128x232M) from the tensors already added to the writer."""
    total, _shared, expert, expert_count = writer.get_total_parameter_count()
    writer.add_size_label(gguf.size_label(total, _shared, expert, expert_count))
