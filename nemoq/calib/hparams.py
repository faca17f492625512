"""The model's hyper-parameters for the forward pass, from config.json or from GGUF metadata.

A checkpoint is read with the converter's own config loader; a GGUF source carries the same
numbers under `nemotron_h_moe.*` (written by nemoq.convert.metadata), read back with one table.
"""

from __future__ import annotations

from pathlib import Path

from nemoq.convert.config import ModelConfig, load_config
from nemoq.errors import NemoqError

# ModelConfig field -> GGUF key (after "<arch>."); fields not listed are derived below.
GGUF_KEYS = {
    "hidden": "embedding_length", "vocab": "vocab_size", "context_length": "context_length",
    "norm_eps": "attention.layer_norm_rms_epsilon", "n_heads": "attention.head_count",
    "head_dim": "attention.key_length", "mamba_heads": "ssm.time_step_rank", "ssm_state": "ssm.state_size",
    "ssm_groups": "ssm.group_count", "conv_kernel": "ssm.conv_kernel", "n_experts": "expert_count",
    "n_experts_used": "expert_used_count", "expert_ff": "expert_feed_forward_length",
    "shared_ff": "expert_shared_feed_forward_length", "n_shared_experts": "expert_shared_count",
    "routed_scaling": "expert_weights_scale", "norm_topk": "expert_weights_norm",
    "n_expert_groups": "expert_group_count", "n_expert_groups_used": "expert_group_used_count",
}
OPTIONAL_GGUF = {"n_expert_groups": 1, "n_expert_groups_used": 1, "n_shared_experts": 1,
                 "routed_scaling": 1.0, "norm_topk": True, "context_length": 4096}


def config_of(source) -> ModelConfig:
    """The ModelConfig of an opened source (nemoq.convert.pipeline.Source)."""
    if source.plan.layout != "GGUF":
        return load_config(source.path)
    from nemoq.gguf_file import read_gguf
    return config_from_gguf(read_gguf(source.path).metadata, source.layer_kinds, source.path)


def config_from_gguf(metadata: dict, layer_kinds: tuple[str, ...], path: Path) -> ModelConfig:
    arch = metadata.get("general.architecture")
    values = {}
    for field, key in GGUF_KEYS.items():
        value = metadata.get(f"{arch}.{key}", OPTIONAL_GGUF.get(field))
        if value is None:
            raise NemoqError(f"GGUF metadata lacks {arch}.{key}, needed for the forward pass", path)
        values[field] = value
    kv = metadata.get(f"{arch}.attention.head_count_kv")
    kv_heads = max(kv) if isinstance(kv, list) else kv
    inner = int(metadata.get(f"{arch}.ssm.inner_size", 0))
    return ModelConfig(
        path=path, architecture=arch, layer_kinds=layer_kinds, n_kv_heads=int(kv_heads or values["n_heads"]),
        mamba_head_dim=inner // int(values["mamba_heads"]), n_mtp_layers=0, raw={},
        **{f: _cast(f, v) for f, v in values.items()})


def _cast(field: str, value):
    kind = ModelConfig.__annotations__[field]   # "int", "float" or "bool" (string annotations)
    return {"int": int, "float": float, "bool": bool}[kind](value)
