"""Lazy, chunked access to the tensors of a (sharded) safetensors checkpoint.

Shards are validated with the `safetensors` library, but data is read with plain
`readinto` at the offsets the header declares: numpy has no bfloat16 (safetensors'
numpy API refuses BF16), and reading fixed-size chunks into one reusable buffer keeps
peak memory flat whatever the tensor size (an mmap would count every touched page).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from nemoq.errors import NemoqError

# safetensors dtype tag -> numpy storage dtype (bf16 and fp8 are carried as raw bits)
STORAGE_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live; nothing is read until asked."""
    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.dtype])

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def read(self) -> np.ndarray:
        """The whole tensor in its storage dtype (bf16 as uint16 bits)."""
        out = np.empty(self.shape, dtype=self.storage_dtype)
        _read_exact(self.shard, self.offset, memoryview(out.reshape(-1).view(np.uint8)))
        return out

    def iter_rows(self, take_buffer: Callable[[], np.ndarray]) -> Iterator[np.ndarray]:
        """Yield consecutive whole-row slices of the tensor, each read into a buffer (bytes)
        from `take_buffer()`; a yielded array is valid until that buffer is handed out again."""
        row_elems = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        row_bytes = row_elems * self.storage_dtype.itemsize
        n_rows = self.shape[0] if self.shape else 1
        with open(self.shard, "rb", buffering=0) as f:
            f.seek(self.offset)
            start = 0
            while start < n_rows:
                buffer = take_buffer()
                rows = min(max(1, buffer.nbytes // max(row_bytes, 1)), n_rows - start)
                if rows * row_bytes > buffer.nbytes:
                    buffer = np.empty(row_bytes, dtype=np.uint8)  # one row larger than the buffer
                view = memoryview(buffer)[: rows * row_bytes]
                if f.readinto(view) != len(view):
                    raise NemoqError(f"truncated while reading tensor {self.name}", self.shard)
                yield buffer[: rows * row_bytes].view(self.storage_dtype).reshape(rows, *self.shape[1:])
                start += rows


    def iter_mapped(self, window_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
        """(file offset, rows) windows of the tensor memory-mapped, not copied: for scanning
        bytes that are then copied file to file. Each window is unmapped when the next is made."""
        row_bytes = max(1, self.nbytes // (self.shape[0] if self.shape else 1))
        rows_per_window = max(1, window_bytes // row_bytes)
        n_rows = self.shape[0] if self.shape else 1
        for start in range(0, n_rows, rows_per_window):
            rows = min(rows_per_window, n_rows - start)
            offset = self.offset + start * row_bytes
            yield offset, np.memmap(self.shard, dtype=self.storage_dtype, mode="r", offset=offset,
                                    shape=(rows, *self.shape[1:]))


def _read_exact(path: Path, offset: int, view: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        if f.readinto(view) != len(view):
            raise NemoqError("file is truncated", path)


def _entry(name: str, entry, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each of the type the format defines."""
    def natural(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0
    if not isinstance(entry, dict):
        raise NemoqError(f"corrupt header: tensor {name} is not an object", path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
        raise NemoqError(f"tensor {name} has unsupported dtype {dtype}", path)
    if not isinstance(shape, list) or not all(natural(d) for d in shape):
        raise NemoqError(f"corrupt header: tensor {name} has shape {json.dumps(shape)[:60]}", path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(natural(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise NemoqError(f"corrupt header: tensor {name} has data_offsets {json.dumps(offsets)[:60]}", path)
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_shard_header(path: Path) -> dict[str, TensorRef]:
    """Parse and check one shard's header; every inconsistency names the shard."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NemoqError("truncated safetensors file (no header)", path)
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise NemoqError("corrupt or truncated safetensors header", path)
            header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise NemoqError("corrupt safetensors header (not JSON)", path) from None
    except OSError as e:
        raise NemoqError(f"cannot read ({e.strerror or e})", path) from None
    if not isinstance(header, dict):
        raise NemoqError("corrupt safetensors header (not a JSON object)", path)
    data_start = 8 + header_len
    refs: dict[str, TensorRef] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(name, entry, path)
        expected = math.prod(shape) * np.dtype(STORAGE_DTYPES[dtype]).itemsize
        if end - begin != expected:
            raise NemoqError(f"corrupt header: tensor {name} spans {end - begin} bytes, "
                             f"its shape needs {expected}", path)
        if data_start + end > size:
            raise NemoqError(f"truncated: tensor {name} ends at byte {data_start + end}, "
                             f"the file has {size} bytes (incomplete download?)", path)
        refs[name] = TensorRef(name, path, dtype, shape, data_start + begin, end - begin)
    try:  # the library's own validation catches what the checks above do not (overlaps, gaps)
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise NemoqError(f"invalid safetensors file ({e})", path) from None
    return refs


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name, each shard a file beside the index."""
    from nemoq.inputs import read_json_object
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise NemoqError("not a valid safetensors index (no weight_map object)", index)
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise NemoqError(f"weight_map places {name} in {json.dumps(shard)[:60]}, not a shard file name", index)
    return weight_map


def open_checkpoint(model_dir: Path) -> dict[str, TensorRef]:
    """All tensors of a checkpoint folder, by source name."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = _weight_map(index)
        shard_names = sorted(set(weight_map.values()))
    elif (model_dir / SINGLE_NAME).is_file():
        weight_map, shard_names = None, [SINGLE_NAME]
    else:
        shard_names = sorted(p.name for p in model_dir.glob("*.safetensors"))
        weight_map = None
        if not shard_names:
            raise NemoqError("no safetensors weights found (expected model.safetensors or "
                             f"{INDEX_NAME})", model_dir)
    tensors: dict[str, TensorRef] = {}
    for shard_name in shard_names:
        shard = model_dir / shard_name
        if not shard.is_file():
            raise NemoqError(f"shard listed in {INDEX_NAME} is missing", shard)
        tensors.update(read_shard_header(shard))
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            ref = tensors.get(name)
            if ref is None or ref.shard.name != shard_name:
                raise NemoqError(f"{INDEX_NAME} places tensor {name} here, but the shard does not hold it",
                                 model_dir / shard_name)
    return tensors
