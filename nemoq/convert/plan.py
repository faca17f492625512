"""Match a checkpoint's tensors against the mapping tables: the conversion plan.

The plan is computed from headers only (no tensor data is read), so every missing,
unexpected or misshapen tensor is reported before a single byte is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nemoq.convert import mapping
from nemoq.convert.config import ModelConfig
from nemoq.convert.mapping import Row, Transform
from nemoq.convert.modelopt_tensors import DEQUANTIZED_ON_READ
from nemoq.convert.safetensors_reader import TensorRef
from nemoq.errors import NemoqError


def matrices_in(shape: tuple[int, ...]) -> int:
    """How many matrices a tensor holds: one per expert for an (E, out, in) stack, else one."""
    return shape[0] if len(shape) == 3 else 1


@dataclass(frozen=True)
class TensorSpec:
    """What config.json says one GGUF tensor is: enough to plan types and sizes without weights."""
    name: str
    shape: tuple[int, ...]
    keep_f32: bool
    layer: int | None
    layer_kind: str | None
    row: Row
    source_names: tuple[str, ...]     # concatenated on axis 0 (one per expert for stacked rows)
    source_shape: tuple[int, ...]     # the shape each source tensor must have

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def row_width(self) -> int:
        return self.shape[-1]

    @property
    def n_matrices(self) -> int:
        return matrices_in(self.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """A TensorSpec matched to the checkpoint's source tensors."""
    spec: TensorSpec
    sources: tuple[TensorRef, ...]

    name = property(lambda self: self.spec.name)
    shape = property(lambda self: self.spec.shape)
    keep_f32 = property(lambda self: self.spec.keep_f32)
    layer = property(lambda self: self.spec.layer)
    layer_kind = property(lambda self: self.spec.layer_kind)
    n_elements = property(lambda self: self.spec.n_elements)
    row_width = property(lambda self: self.spec.row_width)

    @property
    def transform(self) -> Transform:
        return mapping.TRANSFORMS[self.spec.row.transform]

    @property
    def source_dtype(self) -> str:
        return self.sources[0].dtype

    @property
    def chunk_dtype(self) -> str:
        """The dtype iter_chunks yields: float32 values after a value transform or from a ModelOpt
        NVFP4/FP8 source (dequantized as read), else the source's."""
        dequantized = self.source_dtype in DEQUANTIZED_ON_READ
        return "F32" if self.transform.values is not None or dequantized else self.source_dtype

    def iter_chunks(self, take_buffer: Callable[[], np.ndarray]) -> Iterator[np.ndarray]:
        """Source data in whole rows of the GGUF tensor, in order, in the storage dtype.

        A transformed tensor (ssm_a, ...) is read whole and returned as float32 values.
        """
        if self.transform.values is not None:
            from nemoq.convert.dtypes import to_float32
            data = np.concatenate([to_float32(s.read(), s.dtype).reshape(-1) for s in self.sources])
            yield self.transform.values(data).reshape(-1, self.row_width).astype(np.float32)
            return
        for source in self.sources:
            for chunk in source.iter_rows(take_buffer):
                yield chunk.reshape(-1, self.row_width)


@dataclass
class Plan:
    tensors: list[PlannedTensor]
    layout: str
    skipped: list[str] = field(default_factory=list)   # deliberately not converted (MTP head)
    mtp_layers: int = 0                                # MTP blocks written (appended after the trunk)
    notes: list[str] = field(default_factory=list)     # what the user should know about the plan


def _detect_prefix(tensors: dict[str, TensorRef], model_dir: Path) -> str:
    for prefix in mapping.MODEL_PREFIXES:
        if f"{prefix}.embeddings.weight" in tensors:
            return prefix
    raise NemoqError("no embeddings tensor found (expected "
                     + " or ".join(f"{p}.embeddings.weight" for p in mapping.MODEL_PREFIXES) + ")", model_dir)


def _detect_expert_layout(tensors: dict[str, TensorRef], prefix: str, moe_layer: int) -> str:
    fused_name = f"{prefix}.layers.{moe_layer}.{mapping.FUSED_EXPERT_ROWS[0].source}"
    return "fused" if fused_name in tensors else "per-expert"


def tensor_specs(config: ModelConfig, prefix: str = "backbone", expert_layout: str = "per-expert",
                 mtp: bool = True, mtp_expert_layout: str = "per-expert") -> list[TensorSpec]:
    """Every GGUF tensor the config implies, in file order, from the mapping tables; with `mtp`,
    the multi-token-prediction block the config declares (config.mtp_layer) after the trunk."""
    specs: list[TensorSpec] = []

    def add(row: Row, source_names: list[str], layer: int | None, kind: str | None) -> None:
        if row.if_config and not config.raw.get(row.if_config, True):
            return
        if row.if_field and not getattr(config, row.if_field):
            return
        dims = config.dims_of(layer)
        source_shape = tuple(d if isinstance(d, int) else dims[d] for d in row.shape)
        shape = mapping.TRANSFORMS[row.transform].reshape(source_shape, dims)
        if row.stacked:
            shape = (len(source_names), *shape)
        specs.append(TensorSpec(row.gguf_name(layer), shape, row.keep_f32, layer, kind, row,
                                tuple(source_names), source_shape))

    for row in mapping.HEAD_ROWS:
        add(row, [row.source.format(prefix=prefix)], None, None)
    for layer, kind in enumerate(config.layer_kinds):
        rows = mapping.ROWS_BY_LAYER_KIND[kind] + (mapping.EXPERT_LAYOUTS[expert_layout] if kind == "moe" else ())
        for row in rows:
            base = f"{prefix}.layers.{layer}.{row.source}"
            add(row, [base.format(xid=x) for x in range(config.n_experts)] if row.stacked else [base], layer, kind)
    for row in mapping.TAIL_ROWS:
        add(row, [row.source.format(prefix=prefix)], None, None)
    if mtp and config.mtp_layer is not None:
        for row in mapping.MTP_ROWS + mapping.MTP_EXPERT_LAYOUTS[mtp_expert_layout]:
            base = mapping.MTP_PREFIX + row.source
            add(row, [base.format(xid=x) for x in range(config.n_experts)] if row.stacked else [base],
                config.mtp_layer, "mtp")
    return specs


def _mtp_plan(config: ModelConfig, tensors: dict[str, TensorRef], keep: bool,
              model_dir: Path) -> tuple[bool, str, list[str]]:
    """Whether the MTP block is converted, its expert layout, and a note when the config declares
    one that is not written."""
    present = any(n.startswith(mapping.MTP_PREFIX) for n in tensors)
    if config.mtp_layer is None or not keep:
        return False, "per-expert", []
    if not present:
        return False, "per-expert", [
            f"config.json declares {config.n_mtp_layers} multi-token-prediction layer(s) but the checkpoint has "
            "no mtp.* tensors (transformers drops them on load, so its saves have none): no MTP block written"]
    if config.n_mtp_layers != 1:
        raise NemoqError(f"num_nextn_predict_layers is {config.n_mtp_layers}; llama.cpp loads one MTP block "
                         "(convert with --no-mtp to drop it)", model_dir)
    fused = f"{mapping.MTP_PREFIX}{mapping.MTP_EXPERT_LAYOUTS['fused'][0].source}" in tensors
    return True, "fused" if fused else "per-expert", []


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def build_plan(config: ModelConfig, tensors: dict[str, TensorRef], model_dir: Path, mtp: bool = True) -> Plan:
    """`mtp=False` (--no-mtp) leaves the multi-token-prediction block out, reported as skipped."""
    prefix = _detect_prefix(tensors, model_dir)
    expert_layout = _detect_expert_layout(tensors, prefix, config.layers_of("moe")[0])
    with_mtp, mtp_layout, notes = _mtp_plan(config, tensors, mtp, model_dir)
    specs = [spec for spec in tensor_specs(config, prefix, expert_layout, with_mtp, mtp_layout)
             if not (spec.row.absent_if and getattr(config, spec.row.absent_if)
                     and not any(n in tensors for n in spec.source_names))]
    missing = [n for spec in specs for n in spec.source_names if n not in tensors]
    if missing:
        raise NemoqError(f"checkpoint is missing {len(missing)} tensor(s) the config requires: "
                         f"{_listing(missing)}", model_dir)
    planned: list[PlannedTensor] = []
    for spec in specs:
        refs = tuple(tensors[n] for n in spec.source_names)
        for ref in refs:
            if ref.shape != spec.source_shape:
                raise NemoqError(f"tensor {ref.name} has shape {list(ref.shape)}, but config.json implies "
                                 f"{list(spec.source_shape)} ({', '.join(map(str, spec.row.shape))})", ref.shard)
        planned.append(PlannedTensor(spec, refs))
    used = {n for spec in specs for n in spec.source_names}
    skipped = sorted(n for n in tensors if n not in used and n.startswith(mapping.SKIPPED_PREFIXES))
    unexpected = sorted(n for n in tensors if n not in used and n not in skipped)
    if unexpected:
        raise NemoqError(f"checkpoint has {len(unexpected)} tensor(s) that config.json does not explain "
                         f"(wrong config, or an unsupported variant): {_listing(unexpected)}",
                         tensors[unexpected[0]].shard)
    return Plan(planned, f"{prefix}.* / {expert_layout} experts", skipped, int(with_mtp), notes)
