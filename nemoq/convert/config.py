"""Read a Nemotron-H config.json into the dimensions every other stage works from."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemoq.errors import NemoqError
from nemoq.inputs import read_json_object

# architectures[0] in config.json -> GGUF architecture name
SUPPORTED_ARCHITECTURES = {"NemotronHForCausalLM": "nemotron_h_moe", "NemotronHPuzzleForCausalLM": "nemotron_h_moe"}
# Puzzle checkpoints describe their layers in `block_configs` (one dict per layer: block_type and,
# for MoE layers, its own expert width and top-k) instead of one pattern and one size.
PUZZLE_ARCHITECTURE = "NemotronHPuzzleForCausalLM"
# llama.cpp reads these two per layer (expert_feed_forward_length, expert_used_count arrays); any
# other per-block value must equal the model-wide one, which is all its graph can hold.
PUZZLE_PER_LAYER = {"moe_intermediate_size": "expert_ff", "num_experts_per_tok": "n_experts_used"}

# Both spellings of the layer pattern: the hub's `hybrid_override_pattern` characters and
# transformers-5's `layers_block_type` names (older exports say "mamba" / "attention").
LAYER_KIND_BY_PATTERN_CHAR = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
LAYER_KIND_BY_BLOCK_TYPE = {
    "linear_attention": "mamba", "mamba": "mamba",
    "moe": "moe",
    "full_attention": "attention", "attention": "attention",
    "mlp": "mlp",
}
# How llama.cpp's converter finds the layer count (TextModel: the first of these keys present). Its
# NemotronH class replaces it by len(layers_block_type) when that list is there, then asserts that
# the pattern (hybrid_override_pattern, else layers_block_type) has that many layers.
LAYER_COUNT_KEYS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers")

# llama.cpp's nemotron_h_moe graph hard-codes its activations (src/models/nemotron-h.cpp: squared
# ReLU in the routed and shared experts; graph-context-mamba.cpp: SiLU after the Mamba conv1d).
# config.json key -> (the names transformers' ACT2FN maps to that function, what llama.cpp computes);
# an absent key means transformers' default, the first name. The gated norm's SiLU has no key.
ACTIVATIONS = {
    "mamba_hidden_act": (("silu", "swish"), "silu after the Mamba conv1d"),
    "mlp_hidden_act": (("relu2",), "relu2 (squared ReLU) in the routed and shared experts"),
}

# Sizes end up in uint32 GGUF fields and int32 ggml dimensions; llama.cpp loads at most
# LLAMA_MAX_LAYERS layers and LLAMA_MAX_EXPERTS experts (src/llama-hparams.h), both 512.
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 512
MAX_EXPERTS = 512
REQUIRED = None
# ModelConfig field: config.json keys (the first that is set wins), type, default (REQUIRED,
# a value, or a function of the fields before it), smallest and largest value.
FIELDS: tuple[tuple[str, tuple[str, ...], type, Any, float, float], ...] = (
    ("hidden", ("hidden_size",), int, REQUIRED, 1, MAX_SIZE),
    ("vocab", ("vocab_size",), int, REQUIRED, 1, MAX_SIZE),
    ("context_length", ("max_position_embeddings",), int, 4096, 1, MAX_SIZE),
    ("norm_eps", ("layer_norm_epsilon", "norm_eps"), float, 1e-5, 0, 1),
    ("n_heads", ("num_attention_heads",), int, REQUIRED, 1, MAX_SIZE),
    ("n_kv_heads", ("num_key_value_heads",), int, lambda v: v["n_heads"], 1, MAX_SIZE),
    ("head_dim", ("head_dim", "attention_head_dim"), int, lambda v: v["hidden"] // v["n_heads"], 1, MAX_SIZE),
    ("mamba_heads", ("mamba_num_heads",), int, REQUIRED, 1, MAX_SIZE),
    ("mamba_head_dim", ("mamba_head_dim",), int, REQUIRED, 1, MAX_SIZE),
    ("ssm_state", ("ssm_state_size",), int, REQUIRED, 1, MAX_SIZE),
    ("ssm_groups", ("n_groups", "mamba_n_groups"), int, REQUIRED, 1, MAX_SIZE),
    ("conv_kernel", ("conv_kernel", "mamba_d_conv"), int, REQUIRED, 1, MAX_SIZE),
    ("n_experts", ("n_routed_experts",), int, REQUIRED, 1, MAX_EXPERTS),
    ("n_experts_used", ("num_experts_per_tok",), int, REQUIRED, 1, MAX_EXPERTS),
    ("expert_ff", ("moe_intermediate_size",), int, REQUIRED, 1, MAX_SIZE),
    ("shared_ff", ("moe_shared_expert_intermediate_size",), int, REQUIRED, 1, MAX_SIZE),
    ("n_shared_experts", ("n_shared_experts",), int, 1, 0, MAX_EXPERTS),
    ("routed_scaling", ("routed_scaling_factor",), float, 1.0, -1e30, 1e30),
    ("norm_topk", ("norm_topk_prob",), bool, True, 0, 1),
    ("n_expert_groups", ("n_group",), int, 1, 1, MAX_EXPERTS),
    ("n_expert_groups_used", ("topk_group",), int, 1, 1, MAX_EXPERTS),
    ("n_mtp_layers", ("num_nextn_predict_layers",), int, 0, 0, MAX_LAYERS),
    ("latent", ("moe_latent_size",), int, 0, 0, MAX_SIZE),
    ("tied_embeddings", ("tie_word_embeddings",), bool, False, 0, 1),
)
# Token ids gguf-py's SpecialVocab reads from config.json (it refuses negative ones).
SPECIAL_TOKEN_KEYS = tuple(f"{t}_token_id" for t in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"))
# Fields where an explicit 0 means "not set", as configs in the wild use it.
ZERO_IS_UNSET = {"context_length", "n_kv_heads", "head_dim", "n_mtp_layers", "latent"}


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
    tied_embeddings: bool = False   # lm_head may be absent: llama.cpp then reads token_embd for the output
    latent: int = 0                 # LatentMoE (moe_latent_size): routed experts work in this width; 0: none
    # Puzzle: (expert width, top-k) of every layer, (0, 0) on non-MoE layers; () when uniform
    per_layer_moe: tuple[tuple[int, int], ...] = ()

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
    def is_puzzle(self) -> bool:
        return bool(self.per_layer_moe)

    @property
    def mtp_layer(self) -> int | None:
        """The GGUF layer index of the multi-token-prediction block llama.cpp appends, if any.
        Puzzle's MTP head is laid out otherwise and llama.cpp drops it, so nemoq does too."""
        return self.n_layers if self.n_mtp_layers and not self.is_puzzle else None

    def expert_ff_of(self, layer: int) -> int:
        return self.per_layer_moe[layer][0] if self.is_puzzle and layer < self.n_layers else self.expert_ff

    def experts_used_of(self, layer: int) -> int:
        return self.per_layer_moe[layer][1] if self.is_puzzle and layer < self.n_layers else self.n_experts_used

    def dims_of(self, layer: int | None) -> dict[str, int]:
        """dims, with this layer's own expert width (Puzzle)."""
        return self.dims if layer is None else {**self.dims, "expert_ff": self.expert_ff_of(layer)}

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
            # routed experts read and write the latent width when the model has one (LatentMoE)
            "expert_io": self.latent or self.hidden, "latent": self.latent, "hidden_x2": 2 * self.hidden,
        }


def _kinds(key: str, items: list, table: dict[str, str], path: Path) -> tuple[str, ...]:
    unknown = sorted({i for i in items if i not in table})
    if unknown:
        raise NemoqError(f"unknown layer kinds {unknown} in {key}", path)
    if len(items) > MAX_LAYERS:
        raise NemoqError(f"{key} has {len(items)} layers; llama.cpp loads at most {MAX_LAYERS}", path)
    return tuple(table[i] for i in items)


def _layer_kinds(cfg: dict, path: Path) -> tuple[str, ...]:
    """The layer pattern, from either spelling. nemoq and llama.cpp read hybrid_override_pattern
    first, transformers layers_block_type: when both are there they must agree."""
    pattern, block_types = cfg.get("hybrid_override_pattern"), cfg.get("layers_block_type")
    if pattern is not None and not isinstance(pattern, str):
        raise NemoqError(f"hybrid_override_pattern must be a string like \"MEM*E\", not {pattern!r}", path)
    if block_types is not None and not (isinstance(block_types, list) and all(isinstance(i, str) for i in block_types)):
        raise NemoqError("layers_block_type must be a list of layer kind names", path)
    if pattern is None and block_types is None:
        raise NemoqError("has neither hybrid_override_pattern nor layers_block_type", path)
    listed = None if block_types is None else _kinds("layers_block_type", block_types, LAYER_KIND_BY_BLOCK_TYPE, path)
    kinds = listed if pattern is None else _kinds("hybrid_override_pattern", list(pattern), LAYER_KIND_BY_PATTERN_CHAR, path)
    if listed is not None and listed != kinds:
        raise NemoqError(f"hybrid_override_pattern ({pattern}) and layers_block_type ({pattern_of(listed)}) "
                         "describe different layers (llama.cpp reads the first, transformers the second); "
                         "remove the wrong one", path)
    _check_layer_count(cfg, kinds, path)
    if "mlp" in kinds:
        raise NemoqError("dense MLP layers ('-') belong to the non-MoE nemotron_h architecture, "
                         "which nemoq does not convert (supported: nemotron_h_moe)", path)
    if "moe" not in kinds:
        raise NemoqError("the layer pattern has no MoE layer ('E'); nemoq converts nemotron_h_moe only", path)
    return kinds


def _check_layer_count(cfg: dict, kinds: tuple[str, ...], path: Path) -> None:
    """num_hidden_layers against the pattern string, as llama.cpp's converter asserts. With a
    layers_block_type list, llama.cpp and transformers both take the count from the list."""
    key = next((k for k in LAYER_COUNT_KEYS if cfg.get(k) is not None), None)
    if cfg.get("layers_block_type") is not None or key is None:
        return
    count = _typed(cfg[key], int, key, 0, MAX_SIZE, path)
    if count != len(kinds):
        raise NemoqError(f"{key} is {count}, but hybrid_override_pattern has {len(kinds)} layers; "
                         "llama.cpp's converter refuses the mismatch: correct whichever is wrong", path)


def _check_activations(cfg: dict, path: Path) -> None:
    """Activations other than those llama.cpp hard-codes would give a GGUF computing another model."""
    for key, (accepted, computed) in ACTIVATIONS.items():
        value = cfg.get(key)
        if value is not None and value not in accepted:
            raise NemoqError(f"{key} is {json.dumps(value)[:40]}; llama.cpp's nemotron_h_moe always computes "
                             f"{computed}, so the GGUF would compute another model", path)


def _typed(value: Any, kind: type, key: str, lo: float, hi: float, path: Path):
    """`value` as `kind` when it is one (JSON booleans are not numbers) and lies in [lo, hi]."""
    if kind is bool:
        ok = isinstance(value, bool) or value in (0, 1) and not isinstance(value, float)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    else:
        ok = (isinstance(value, float) and math.isfinite(value)
              or isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**1000)
    if not ok:
        raise NemoqError(f"{key} must be {'an integer' if kind is int else 'a number' if kind is float else 'true or false'}, "
                         f"not {json.dumps(value)[:40]}", path)
    value = kind(value)
    if not lo <= value <= hi:
        raise NemoqError(f"{key} is {value}, outside the range nemoq accepts ({lo} to {hi})", path)
    return value


def expert_count_problem(counts: dict[str, int], names: dict[str, str]) -> str | None:
    """What llama.cpp's load_hparams asserts on expert counts (a GGML_ASSERT aborts the process
    instead of reporting), checked first. `counts` and `names` (how the file spells each key)
    are keyed by ModelConfig field; None when llama.cpp accepts them."""
    e, u, g, gu = (counts[k] for k in ("n_experts", "n_experts_used", "n_expert_groups", "n_expert_groups_used"))
    n = names
    rules = (
        (0 < e <= MAX_EXPERTS, f"{n['n_experts']} is {e}; llama.cpp loads 1 to {MAX_EXPERTS} experts"),
        (0 < u <= e, f"{n['n_experts_used']} is {u}; it must be 1 to {n['n_experts']} ({e})"),
        (g < e, f"{n['n_expert_groups']} is {g}; llama.cpp needs fewer groups than experts ({e})"),
        (g <= 1 or e % g == 0, f"{n['n_experts']} ({e}) is not a multiple of {n['n_expert_groups']} ({g})"),
        (g <= 1 or 0 < gu < g, f"{n['n_expert_groups_used']} is {gu}; with {g} groups llama.cpp needs 1 to {g - 1}"),
    )
    return next((message for ok, message in rules if not ok), None)


def _fields(cfg: dict, path: Path) -> dict[str, Any]:
    """Every number nemoq reads from config.json, type- and range-checked, by ModelConfig field."""
    values: dict[str, Any] = {}
    for name, keys, kind, default, lo, hi in FIELDS:
        key = next((k for k in keys if cfg.get(k) is not None and not (name in ZERO_IS_UNSET and cfg[k] == 0)),
                   None)
        if key is None and default is REQUIRED:
            raise NemoqError(f"missing required key {keys[0]!r}", path)
        if key is not None:
            value = cfg[key]
        else:
            key, value = keys[0], default(values) if callable(default) else default
        values[name] = _typed(value, kind, key, lo, hi, path)
    check_relations(values, FIELD_KEYS, path)
    return values


def check_field(name: str, value: Any, key: str, path: Path):
    """One ModelConfig field's value, read from `key` of any file, checked as config.json's is."""
    kind, lo, hi = FIELD_RULES[name]
    return _typed(value, kind, key, lo, hi, path)


def check_relations(values: dict[str, Any], names: dict[str, str], path: Path) -> None:
    """What must hold between the fields (by ModelConfig field; `names`: how the file calls them)."""
    problem = expert_count_problem(values, names)
    if problem:
        raise NemoqError(problem, path)
    d_inner = values["mamba_heads"] * values["mamba_head_dim"]
    derived = {f"{names['mamba_heads']} x {names['mamba_head_dim']}": d_inner,
               "the Mamba in_proj rows": 2 * d_inner + 2 * values["ssm_groups"] * values["ssm_state"]
               + values["mamba_heads"],
               f"{names['n_heads']} x {names['head_dim']}": values["n_heads"] * values["head_dim"]}
    for what, size in derived.items():
        if size > MAX_SIZE:
            raise NemoqError(f"{what} is {size}, more than a GGUF dimension holds", path)
    if d_inner % values["ssm_groups"]:
        raise NemoqError(f"{names['ssm_groups']} ({values['ssm_groups']}) does not divide the Mamba inner "
                         f"size {d_inner}", path)


def _check_token_ids(cfg: dict, path: Path) -> None:
    if "text_config" in cfg and not isinstance(cfg["text_config"], dict):
        raise NemoqError("text_config must be an object", path)
    for section in (cfg, cfg.get("text_config") or {}):
        for key in SPECIAL_TOKEN_KEYS:
            value = section.get(key)
            if isinstance(value, int) and value < 0:
                raise NemoqError(f"{key} is {value}; token ids are never negative", path)


FIELD_KEYS = {name: keys[0] for name, keys, *_ in FIELDS}
FIELD_RULES = {name: (kind, lo, hi) for name, _, kind, _, lo, hi in FIELDS}


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise NemoqError("config.json not found; is this a Hugging Face checkpoint folder?", path.parent)
    cfg = read_json_object(path)
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise NemoqError(f"architectures must be a list of names, not {json.dumps(archs)[:40]}", path)
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise NemoqError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}", path)
    _check_token_ids(cfg, path)
    _check_activations(cfg, path)
    per_layer: tuple[tuple[int, int], ...] = ()
    if arch == PUZZLE_ARCHITECTURE:
        cfg, per_layer = puzzle_layers(cfg, path)
    return ModelConfig(path=path, architecture=SUPPORTED_ARCHITECTURES[arch], layer_kinds=_layer_kinds(cfg, path),
                       raw=cfg, per_layer_moe=per_layer, **_fields(cfg, path))


def puzzle_layers(cfg: dict, path: Path) -> tuple[dict, tuple[tuple[int, int], ...]]:
    """A Puzzle config as a uniform one (layers_block_type from block_configs, the first MoE layer's
    sizes as the model-wide ones) plus each layer's (expert width, top-k), as llama.cpp reads it."""
    blocks = cfg.get("block_configs")
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, dict) for b in blocks):
        raise NemoqError(f"{PUZZLE_ARCHITECTURE} needs block_configs, a list of one object per layer", path)
    kinds = _kinds("block_configs", [str(b.get("block_type")) for b in blocks], LAYER_KIND_BY_BLOCK_TYPE, path)
    per_layer = []
    for i, (kind, block) in enumerate(zip(kinds, blocks)):
        for key, value in block.items():
            if key not in ("block_type", *PUZZLE_PER_LAYER) and value is not None and value != cfg.get(key):
                raise NemoqError(f"block_configs[{i}] sets {key} to {json.dumps(value)[:40]}; llama.cpp reads only "
                                 f"{' and '.join(PUZZLE_PER_LAYER)} per layer", path)
        if kind != "moe":
            per_layer.append((0, 0))
            continue
        missing = [k for k in PUZZLE_PER_LAYER if block.get(k) is None]
        if missing:
            raise NemoqError(f"block_configs[{i}] is an MoE layer without {' or '.join(missing)}", path)
        per_layer.append(tuple(_typed(block[k], int, f"block_configs[{i}].{k}", 1, MAX_SIZE, path)
                               for k in PUZZLE_PER_LAYER))
    if "moe" not in kinds:
        raise NemoqError("the layer pattern has no MoE layer ('E'); nemoq converts nemotron_h_moe only", path)
    first_moe = blocks[kinds.index("moe")]
    uniform = {**cfg, **{k: first_moe[k] for k in PUZZLE_PER_LAYER},
               "layers_block_type": [b["block_type"] for b in blocks]}
    # llama.cpp takes the layers from block_configs; a pattern string beside it must say the same
    uniform.pop("num_hidden_layers", None)
    for i, (width, top_k) in enumerate(per_layer):
        if top_k > uniform.get("n_routed_experts", top_k):
            raise NemoqError(f"block_configs[{i}].num_experts_per_tok is {top_k}, more than n_routed_experts", path)
    return uniform, tuple(per_layer)
