"""Match a checkpoint's tensors against the mapping tables: the conversion plan.

The plan is computed from headers only (no tensor data is read), so every missing,
unexpected or misshapen tensor is reported before a single byte is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from nemoq.convert import mapping
from nemoq.convert.config import ModelConfig
from nemoq.convert.mapping import Row, Transform
from nemoq.convert.safetensors_reader import TensorRef
from nemoq.errors import NemoqError


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its name and shape, and the source tensors (concatenated on axis 0)."""
    name: str
    shape: tuple[int, ...]
    sources: tuple[TensorRef, ...]
    transform: Transform
    keep_f32: bool
    layer: int | None
    layer_kind: str | None

    @property
    def source_dtype(self) -> str:
        return self.sources[0].dtype

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def row_width(self) -> int:
        return self.shape[-1]

    def iter_chunks(self, buffer: np.ndarray) -> Iterator[np.ndarray]:
        """Source data in whole rows of the GGUF tensor, in order, in the storage dtype.

        A transformed tensor (ssm_a, ...) is read whole and returned as float32 values.
        """
        if self.transform.values is not None:
            from nemoq.convert.dtypes import to_float32
            data = np.concatenate([to_float32(s.read(), s.dtype).reshape(-1) for s in self.sources])
            yield self.transform.values(data).reshape(-1, self.row_width).astype(np.float32)
            return
        for source in self.sources:
            for chunk in source.iter_rows(buffer):
                yield chunk.reshape(-1, self.row_width)


@dataclass
class Plan:
    config: ModelConfig
    tensors: list[PlannedTensor]
    layout: str
    skipped: list[str] = field(default_factory=list)   # deliberately not converted (MTP head)

    @property
    def source_files(self) -> list[Path]:
        return sorted({s.shard for t in self.tensors for s in t.sources})


def _detect_prefix(tensors: dict[str, TensorRef], model_dir: Path) -> str:
    for prefix in mapping.MODEL_PREFIXES:
        if f"{prefix}.embeddings.weight" in tensors:
            return prefix
    raise NemoqError("no embeddings tensor found (expected "
                     + " or ".join(f"{p}.embeddings.weight" for p in mapping.MODEL_PREFIXES) + ")", model_dir)


def _detect_expert_layout(tensors: dict[str, TensorRef], prefix: str, moe_layer: int) -> str:
    fused_name = f"{prefix}.layers.{moe_layer}.{mapping.FUSED_EXPERT_ROWS[0].source}"
    return "fused" if fused_name in tensors else "per-expert"


def _expected_shape(row: Row, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else dims[d] for d in row.shape)


def build_plan(config: ModelConfig, tensors: dict[str, TensorRef], model_dir: Path) -> Plan:
    prefix = _detect_prefix(tensors, model_dir)
    expert_layout = _detect_expert_layout(tensors, prefix, config.layers_of("moe")[0])
    expert_rows = mapping.EXPERT_LAYOUTS[expert_layout]
    dims = config.dims
    used: set[str] = set()
    missing: list[str] = []
    planned: list[PlannedTensor] = []

    def lookup(name: str) -> TensorRef | None:
        ref = tensors.get(name)
        if ref is None:
            missing.append(name)
        return ref

    def add(row: Row, source_names: list[str], layer: int | None, kind: str | None) -> None:
        if row.if_config and not config.raw.get(row.if_config, True):
            return
        refs = [lookup(n) for n in source_names]
        if any(r is None for r in refs):
            return
        expected = _expected_shape(row, dims)
        for ref in refs:
            used.add(ref.name)
            if ref.shape != expected:
                raise NemoqError(f"tensor {ref.name} has shape {list(ref.shape)}, but config.json "
                                 f"implies {list(expected)} ({', '.join(map(str, row.shape))})", ref.shard)
        transform = mapping.TRANSFORMS[row.transform]
        shape = transform.reshape(expected, dims)
        if row.stacked:
            shape = (len(refs), *shape)
        planned.append(PlannedTensor(row.gguf_name(layer), shape, tuple(refs), transform,
                                     row.keep_f32, layer, kind))

    for row in mapping.HEAD_ROWS:
        add(row, [row.source.format(prefix=prefix)], None, None)
    for layer, kind in enumerate(config.layer_kinds):
        rows = mapping.ROWS_BY_LAYER_KIND[kind] + (expert_rows if kind == "moe" else ())
        for row in rows:
            base = f"{prefix}.layers.{layer}.{row.source}"
            names = ([base.format(xid=x) for x in range(config.n_experts)] if row.stacked else [base])
            add(row, names, layer, kind)
    for row in mapping.TAIL_ROWS:
        add(row, [row.source.format(prefix=prefix)], None, None)

    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise NemoqError(f"checkpoint is missing {len(missing)} tensor(s) the config requires: {shown}", model_dir)
    skipped = sorted(n for n in tensors if n not in used and n.startswith(mapping.SKIPPED_PREFIXES))
    unexpected = sorted(n for n in tensors if n not in used and n not in skipped)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise NemoqError(f"checkpoint has {len(unexpected)} tensor(s) that config.json does not explain "
                         f"(wrong config, or an unsupported variant): {shown}", tensors[unexpected[0]].shard)
    return Plan(config, planned, f"{prefix}.* / {expert_layout} experts", skipped)
