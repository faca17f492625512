"""Read a Nemotron-H config.json into the dimensions every other stage works from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nemoq.errors import NemoqError

# architectures[0] in config.json -> GGUF architecture name
SUPPORTED_ARCHITECTURES = {"NemotronHForCausalLM": "nemotron_h_moe"}

# Both spellings of the layer pattern: the hub's `hybrid_override_pattern` characters and
# transformers-5's `layers_block_type` names (older exports say "mamba" / "attention").
LAYER_KIND_BY_PATTERN_CHAR = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
LAYER_KIND_BY_BLOCK_TYPE = {
    "linear_attention": "mamba", "mamba": "mamba",
    "moe": "moe",
    "full_attention": "attention", "attention": "attention",
    "mlp": "mlp",
}


def pattern_of(layer_kinds: tuple[str, ...]) -> str:
    """Layer kinds as a hybrid_override_pattern string (MEM*E...)."""
    char = {kind: c for c, kind in LAYER_KIND_BY_PATTERN_CHAR.items()}
    return "".join(char[k] for k in layer_kinds)


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    architecture: str
    layer_kinds: tuple[str, ...]
    hidden: int
    vocab: int
    context_length: int
    norm_eps: float
    # attention
    n_heads: int
    n_kv_heads: int
    head_dim: int
    # mamba-2
    mamba_heads: int
    mamba_head_dim: int
    ssm_state: int
    ssm_groups: int
    conv_kernel: int
    # mixture of experts
    n_experts: int
    n_experts_used: int
    expert_ff: int
    shared_ff: int
    n_shared_experts: int
    routed_scaling: float
    norm_topk: bool
    n_expert_groups: int
    n_expert_groups_used: int
    n_mtp_layers: int
    raw: dict

    @property
    def n_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def d_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ssm_groups * self.ssm_state

    @property
    def in_proj_dim(self) -> int:
        # z (gate), xBC (conv input), dt: one row block each
        return self.d_inner + self.conv_dim + self.mamba_heads

    def layers_of(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.layer_kinds) if k == kind]

    @property
    def dims(self) -> dict[str, int]:
        """Named sizes that mapping tables use to state the shape every tensor must have."""
        return {
            "hidden": self.hidden, "vocab": self.vocab,
            "q_dim": self.n_heads * self.head_dim, "kv_dim": self.n_kv_heads * self.head_dim,
            "d_inner": self.d_inner, "conv_dim": self.conv_dim, "in_proj": self.in_proj_dim,
            "mamba_heads": self.mamba_heads, "ssm_groups": self.ssm_groups,
            "group_width": self.d_inner // self.ssm_groups, "conv_kernel": self.conv_kernel,
            "experts": self.n_experts, "expert_ff": self.expert_ff, "shared_ff": self.shared_ff,
        }


def _layer_kinds(cfg: dict, path: Path) -> tuple[str, ...]:
    pattern = cfg.get("hybrid_override_pattern")
    if isinstance(pattern, str):
        table, items = LAYER_KIND_BY_PATTERN_CHAR, list(pattern)
    elif isinstance(cfg.get("layers_block_type"), list):
        table, items = LAYER_KIND_BY_BLOCK_TYPE, cfg["layers_block_type"]
    else:
        raise NemoqError("has neither hybrid_override_pattern nor layers_block_type", path)
    unknown = sorted({str(i) for i in items if i not in table})
    if unknown:
        raise NemoqError(f"unknown layer kinds {unknown} in the layer pattern", path)
    kinds = tuple(table[i] for i in items)
    if "mlp" in kinds:
        raise NemoqError("dense MLP layers ('-') belong to the non-MoE nemotron_h architecture, "
                         "which nemoq does not convert (supported: nemotron_h_moe)", path)
    if "moe" not in kinds:
        raise NemoqError("the layer pattern has no MoE layer ('E'); nemoq converts nemotron_h_moe only", path)
    return kinds


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise NemoqError("config.json not found; is this a Hugging Face checkpoint folder?", path.parent)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NemoqError(f"not valid JSON ({e})", path) from None
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise NemoqError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}", path)

    def need(*keys: str):
        for key in keys:
            if cfg.get(key) is not None:
                return cfg[key]
        raise NemoqError(f"missing required key {keys[0]!r}", path)

    if cfg.get("moe_latent_size") is not None:
        raise NemoqError("moe_latent_size (latent MoE projections) is not supported yet", path)
    n_heads = int(need("num_attention_heads"))
    return ModelConfig(
        path=path,
        architecture=SUPPORTED_ARCHITECTURES[arch],
        layer_kinds=_layer_kinds(cfg, path),
        hidden=int(need("hidden_size")),
        vocab=int(need("vocab_size")),
        context_length=int(cfg.get("max_position_embeddings") or 4096),
        norm_eps=float(cfg.get("layer_norm_epsilon", cfg.get("norm_eps", 1e-5))),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or cfg.get("attention_head_dim") or need("hidden_size") // n_heads),
        mamba_heads=int(need("mamba_num_heads")),
        mamba_head_dim=int(need("mamba_head_dim")),
        ssm_state=int(need("ssm_state_size")),
        ssm_groups=int(need("n_groups", "mamba_n_groups")),
        conv_kernel=int(need("conv_kernel", "mamba_d_conv")),
        n_experts=int(need("n_routed_experts")),
        n_experts_used=int(need("num_experts_per_tok")),
        expert_ff=int(need("moe_intermediate_size")),
        shared_ff=int(need("moe_shared_expert_intermediate_size")),
        n_shared_experts=int(cfg.get("n_shared_experts", 1)),
        routed_scaling=float(cfg.get("routed_scaling_factor", 1.0)),
        norm_topk=bool(cfg.get("norm_topk_prob", True)),
        n_expert_groups=int(cfg.get("n_group", 1)),
        n_expert_groups_used=int(cfg.get("topk_group", 1)),
        n_mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
        raw=cfg,
    )
