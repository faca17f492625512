"""A bounded walk over a GGUF header, run before any file is handed to gguf-py's reader.

gguf-py trusts the header: a count of 2^60 tensors is a loop of 2^60, a string length past the
end of the file is an IndexError deep in numpy. This walk reads the header with `struct` from a
memory map, checks every count, length, type and offset against the file's size, and raises
one NemoqError naming the file at the first thing that cannot be right. It allocates nothing
in proportion to what the header claims, only to what it really holds.

Layout (GGUF v2/v3, little- or big-endian as the version field tells):
    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv    x (string key | u32 value type | value)
    n_tensors x (string name | u32 n_dims | u64 dims[n_dims] | u32 ggml type | u64 offset)
    padding to general.alignment (default 32), then the data section
A string is u64 length + UTF-8 bytes; an array is u32 item type | u64 count | items.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from nemoq.errors import NemoqError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4              # GGML_MAX_DIMS
MAX_NESTING = 4           # arrays of arrays; llama.cpp writes none
MAX_ELEMENTS = 2**62      # ggml counts elements in int64

V = GGUFValueType
# struct code of each fixed-size value type (strings and arrays are walked)
SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
           V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
# the fewest bytes one value of a type can take, to bound counts before looping over them
MIN_BYTES = {**{t: struct.calcsize(c) for t, c in SCALARS.items()}, V.STRING: 8, V.ARRAY: 12}
MIN_KV_BYTES = 8 + 4 + 1                  # empty key, type, one byte of value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]      # ggml order (ne0 first)
    type: GGMLQuantizationType
    offset: int                # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    byte_order: str            # "<" or ">"
    values: dict[str, Any]     # key -> its scalar or string value (None for an array)
    alignment: int
    data_start: int
    tensors: tuple[TensorInfo, ...]


class _Walk:
    """A cursor over the mapped file; every read checks that the bytes are there."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.order = "<"

    def fail(self, message: str):
        raise NemoqError(f"corrupt GGUF header: {message}", self.path)

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, code: str, what: str):
        n = struct.calcsize(code)
        if n > self.remaining():
            self.fail(f"file ends inside {what} (byte {self.pos} of {self.size})")
        (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += n
        return value

    def skip(self, n: int, what: str) -> None:
        if n > self.remaining():
            self.fail(f"{what} needs {n} bytes at byte {self.pos}, the file has {self.remaining()} left")
        self.pos += n

    def count(self, what: str, min_bytes: int) -> int:
        n = self.take("Q", what)
        if n * min_bytes > self.remaining():
            self.fail(f"{what} is {n}, more than the file's remaining {self.remaining()} bytes can hold")
        return n

    def string(self, what: str) -> str:
        n = self.take("Q", f"the length of {what}")
        start = self.pos
        self.skip(n, what)
        try:
            return bytes(self.buf[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {start} is not UTF-8")

    def value_type(self, what: str) -> GGUFValueType:
        code = self.take("I", f"the type of {what}")
        try:
            return GGUFValueType(code)
        except ValueError:
            self.fail(f"{what} has unknown value type {code}")

    def value(self, kind: GGUFValueType, key: str, depth: int = 0):
        """Walk past one value; return it when it is a scalar or a string (None for an array)."""
        if kind in SCALARS:
            return self.take(SCALARS[kind], f"the value of {key}")
        if kind == V.STRING:
            n = self.take("Q", f"the length of {key}'s string")
            start = self.pos
            self.skip(n, f"{key}'s string")
            # decoded only outside arrays: 100k+ token strings are checked by gguf-py's reader
            return None if depth else bytes(self.buf[start:self.pos]).decode("utf-8", "replace")
        if depth >= MAX_NESTING:
            self.fail(f"{key} nests arrays more than {MAX_NESTING} deep")
        item = self.value_type(f"{key}'s array items")
        n = self.count(f"{key}'s array length", MIN_BYTES[item])
        if item in SCALARS:
            self.skip(n * MIN_BYTES[item], f"{key}'s array")
        else:
            for _ in range(n):
                self.value(item, key, depth + 1)
        return None


def _tensor_info(w: _Walk, index: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = w.string(f"tensor {index}'s name")
    n_dims = w.take("I", f"tensor {name}'s dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        w.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = tuple(w.take("Q", f"tensor {name}'s shape") for _ in range(n_dims))
    if min(dims) < 1 or math.prod(dims) > MAX_ELEMENTS:
        w.fail(f"tensor {name} has shape {list(dims)}")
    code = w.take("I", f"tensor {name}'s type")
    try:
        qtype = GGMLQuantizationType(code)
    except ValueError:
        qtype = None
    if qtype not in GGML_QUANT_SIZES:
        w.fail(f"tensor {name} has unknown type {code}")
    block, _ = GGML_QUANT_SIZES[qtype]
    if dims[0] % block:
        w.fail(f"tensor {name} ({qtype.name}) has {dims[0]} values per row, not a multiple of its "
               f"block of {block}")
    return name, dims, qtype, w.take("Q", f"tensor {name}'s offset")


def check_header(path: Path) -> Header:
    """Walk `path`'s GGUF header; NemoqError (naming the file) at the first inconsistency."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise NemoqError(f"not a GGUF file (only {size} bytes)", path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        w = _Walk(buf, size, path)
        if buf[:4] != MAGIC:
            raise NemoqError(f"not a GGUF file (starts with {bytes(buf[:4])!r}, not {MAGIC!r})", path)
        w.pos = 4
        version = w.take("I", "the version")
        if version & 0xFFFF == 0:   # as gguf-py: a big-endian file reads as a huge little-endian version
            w.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in VERSIONS:
            raise NemoqError(f"GGUF version {version} is not supported (only {', '.join(map(str, VERSIONS))})",
                             path)
        n_tensors = w.take("Q", "the tensor count")
        n_kv = w.count("the key/value count", MIN_KV_BYTES)
        if n_tensors * MIN_TENSOR_INFO_BYTES > w.remaining():
            w.fail(f"the tensor count is {n_tensors}, more than a {size}-byte file can hold")

        values, alignment = {}, DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = w.string(f"key {i}")
            if key in values:
                w.fail(f"key {key} appears twice")
            kind = w.value_type(key)
            value = w.value(kind, key)
            if key == "general.alignment":
                if kind != V.UINT32 or value <= 0 or value & (value - 1):
                    w.fail(f"general.alignment must be a power of two (uint32), not {kind.name} {value}")
                alignment = value
            values[key] = value

        infos, names = [], set()
        for i in range(n_tensors):
            info = _tensor_info(w, i)
            if info[0] in names:
                w.fail(f"tensor {info[0]} appears twice")
            names.add(info[0])
            infos.append(info)
        data_start = -(-w.pos // alignment) * alignment

    tensors = []
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(dims) // block * type_size
        if offset % alignment:
            w.fail(f"tensor {name}'s offset {offset} is not a multiple of the alignment {alignment}")
        if data_start + offset + nbytes > size:
            raise NemoqError(f"truncated: tensor {name} ends at byte {data_start + offset + nbytes}, "
                             f"the file has {size} bytes (incomplete download?)", path)
        tensors.append(TensorInfo(name, dims, qtype, offset, nbytes))
    return Header(version, w.order, values, alignment, data_start, tuple(tensors))
