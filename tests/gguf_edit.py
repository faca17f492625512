"""Rewrite a GGUF file tensor by tensor with gguf-py (metadata copied unchanged), for tests
that need a modified model: dequantized, damaged or without some tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np

# name, tensor -> None (keep as is), False (drop it) or a float32 array (store it as F32)
Edit = Callable[[str, gguf.ReaderTensor], "np.ndarray | bool | None"]


def rewrite_gguf(src: Path, dst: Path, edit: Edit) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    kept = []
    for t in reader.tensors:
        new = edit(t.name, t)
        if new is False:
            continue
        if new is None:
            kept.append((t.name, t.data, t.tensor_type))
        else:
            kept.append((t.name, np.ascontiguousarray(new, dtype=np.float32), gguf.GGMLQuantizationType.F32))
    for name, data, qtype in kept:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in kept:
        writer.write_tensor_data(data)
    writer.close()


def dequantized(t: gguf.ReaderTensor) -> np.ndarray:
    """A tensor's values as float32, in numpy order (gguf-py's dequantize)."""
    shape = tuple(int(n) for n in reversed(t.shape))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
