"""An existing F32/F16/BF16 GGUF file (or split set) as a source for quantization.

Tensor data is read in row chunks straight from the file, like a safetensors shard; all
metadata (hparams, tokenizer, chat template) is copied unchanged except the file type.
Which tensors stay F32 is looked up in the same mapping tables the converter uses.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import gguf

from nemoq.convert import mapping
from nemoq.convert.config import ModelConfig, check_field, check_relations, pattern_of
from nemoq.convert.plan import Plan, PlannedTensor, TensorSpec, tensor_specs
from nemoq.convert.safetensors_reader import TensorRef
from nemoq.errors import NemoqError
from nemoq.gguf_file import read_gguf

FLOAT_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}
# Keys that describe the file rather than the model: written anew.
NOT_COPIED = ("GGUF.", "general.file_type", "general.quantization_version", "general.size_label", "split.",
              "nemoq.")
ALL_ROWS = (mapping.HEAD_ROWS + mapping.TAIL_ROWS + mapping.LAYER_ROWS + mapping.MAMBA_ROWS
            + mapping.ATTENTION_ROWS + mapping.MOE_ROWS + mapping.PER_EXPERT_ROWS + mapping.MTP_ROWS)
LAYER_NAME = re.compile(r"^blk\.(\d+)\.")

# ModelConfig field -> GGUF key (after "<arch>."), as nemoq.convert.metadata writes them; the
# Mamba head size and the KV heads are derived in config_from_gguf.
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
# The family's keys, absent from Nano's files: LatentMoE's width and the MTP blocks appended
FAMILY_GGUF = {"latent": "moe_latent_size", "n_mtp_layers": "nextn_predict_layers"}
# Puzzle's files hold these two per layer (ModelConfig.per_layer_moe)
PER_LAYER_GGUF = ("expert_ff", "n_experts_used")


def mtp_layers_in(metadata: dict) -> int:
    value = metadata.get(f"{metadata.get('general.architecture')}.nextn_predict_layers", 0)
    return value if isinstance(value, int) and value >= 0 else 0


def layer_kinds_from_metadata(metadata: dict, arch: str, path: Path) -> tuple[str, ...]:
    """As llama.cpp: feed_forward_length > 0 marks MoE, head_count_kv > 0 attention, else Mamba."""
    ff, kv = metadata.get(f"{arch}.feed_forward_length"), metadata.get(f"{arch}.attention.head_count_kv")
    if not isinstance(ff, list) or not isinstance(kv, list) or len(ff) != len(kv) or not all(
            isinstance(x, int) for x in ff + kv):
        raise NemoqError(f"{arch}.feed_forward_length / attention.head_count_kv are not per-layer arrays", path)
    trunk = len(ff) - mtp_layers_in(metadata)   # the MTP blocks come last (nextn_predict_layers)
    return tuple("moe" if f > 0 else "attention" if k > 0 else "mamba" for f, k in zip(ff[:trunk], kv[:trunk]))


def config_from_gguf(metadata: dict, layer_kinds: tuple[str, ...], path: Path) -> ModelConfig:
    """The ModelConfig a nemotron_h_moe GGUF's metadata describes, each value checked as config.json's."""
    arch = metadata.get("general.architecture")
    names = {field: f"{arch}.{key}" for field, key in GGUF_KEYS.items()}
    values, per_layer = {}, {}
    for field, name in names.items():
        value = metadata.get(name, OPTIONAL_GGUF.get(field))
        if value is None:
            raise NemoqError(f"GGUF metadata lacks {name}", path)
        if field in PER_LAYER_GGUF and isinstance(value, list):   # Puzzle
            per_layer[field] = [check_field(field, v, name, path) if v else 0 for v in value[:len(layer_kinds)]]
            value = next((v for v, k in zip(value, layer_kinds) if k == "moe"), 0)
        values[field] = check_field(field, value, name, path)
    for field, key in FAMILY_GGUF.items():
        values[field] = check_field(field, metadata.get(f"{arch}.{key}", 0), f"{arch}.{key}", path)
    inner_name = f"{arch}.ssm.inner_size"
    inner = check_field("mamba_head_dim", metadata.get(inner_name), inner_name, path)
    if inner % values["mamba_heads"]:
        raise NemoqError(f"{inner_name} ({inner}) is not a multiple of {names['mamba_heads']} "
                         f"({values['mamba_heads']})", path)
    values["mamba_head_dim"] = inner // values["mamba_heads"]
    names["mamba_head_dim"] = f"{inner_name} / {names['mamba_heads']}"
    kv = metadata.get(f"{arch}.attention.head_count_kv")
    kv = max(kv, default=0) if isinstance(kv, list) else kv
    values["n_kv_heads"] = check_field("n_kv_heads", kv, f"{arch}.attention.head_count_kv", path) if kv \
        else values["n_heads"]
    check_relations(values, names, path)
    moe = tuple(zip(*(per_layer[f] for f in PER_LAYER_GGUF))) if len(per_layer) == len(PER_LAYER_GGUF) else ()
    return ModelConfig(path=path, architecture=arch, layer_kinds=layer_kinds, raw={}, per_layer_moe=moe, **values)


def check_shapes(config: ModelConfig, entries, path: Path) -> None:
    """Each tensor has the shape the metadata implies (as llama.cpp checks when it loads them)."""
    expected = {spec.name: spec.shape for spec in tensor_specs(config)}
    for entry in entries:
        shape = tuple(reversed(entry.shape))
        if entry.name in expected and shape != expected[entry.name]:
            raise NemoqError(f"tensor {entry.name} has shape {list(shape)}, but the metadata implies "
                             f"{list(expected[entry.name])}", path)


def _spec(entry, layer_kinds: tuple[str, ...], path: Path) -> TensorSpec:
    m = LAYER_NAME.match(entry.name)
    layer = int(m.group(1)) if m else None
    row = next((r for r in ALL_ROWS if r.gguf_name(layer) == entry.name), None)
    if row is None or layer is not None and layer > len(layer_kinds):
        raise NemoqError(f"tensor {entry.name} is not a nemotron_h_moe tensor nemoq knows", path)
    shape = tuple(reversed(entry.shape))
    kind = None if layer is None else layer_kinds[layer] if layer < len(layer_kinds) else "mtp"
    # The data is already in llama.cpp's form: no transform is applied a second time.
    return TensorSpec(entry.name, shape, row.keep_f32, layer, kind,
                      dataclasses.replace(row, transform="identity", stacked=False), (entry.name,), shape)


def open_gguf_source(path: Path):
    from nemoq.convert.pipeline import Source
    contents = read_gguf(path)
    arch = contents.metadata.get("general.architecture")
    if arch != mapping.GGUF_ARCH_NAME:
        raise NemoqError(f"architecture {arch!r} is not {mapping.GGUF_ARCH_NAME}", path)
    quantized = sorted({t.type_name for t in contents.tensors} - set(FLOAT_TYPES))
    if quantized:
        raise NemoqError(f"input is already quantized ({', '.join(quantized)} tensors); quantize from an "
                         "F32/F16/BF16 GGUF or from the checkpoint", path)
    kinds = layer_kinds_from_metadata(contents.metadata, arch, path)
    check_shapes(config_from_gguf(contents.metadata, kinds, path), contents.tensors, path)
    planned = []
    for entry, reader_tensor in zip(contents.tensors, (t for r in contents.readers for t in r.tensors)):
        spec = _spec(entry, kinds, path)
        ref = TensorRef(entry.name, entry.file, FLOAT_TYPES[entry.type_name], spec.shape,
                        int(reader_tensor.data_offset), entry.nbytes)
        planned.append(PlannedTensor(spec, (ref,)))
    fields = [(name, f) for r in contents.readers[:1] for name, f in r.fields.items()
              if not name.startswith(NOT_COPIED) and name != "general.architecture"]

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        for name, f in fields:
            main = f.types[0]
            sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, f.contents(), main, sub_type=sub)
    plan = Plan(planned, "GGUF", mtp_layers=mtp_layers_in(contents.metadata))
    return Source(path, path.stem, arch, kinds, plan, add_metadata,
                  f"{len(kinds)} layers ({pattern_of(kinds)}), from {len(contents.files)} GGUF file(s)")
