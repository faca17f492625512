"""Reading GGUF files (one file or a llama.cpp split set) with gguf-py's reader."""

from __future__ import annotations

import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from nemoq.errors import NemoqError
from nemoq.gguf_check import check_header

SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# What gguf-py's reader raises on a header the check did not foresee: reported, never a traceback.
READER_ERRORS = (IndexError, ValueError, struct.error, KeyError, OverflowError, UnicodeDecodeError,
                 MemoryError, TypeError)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]      # ggml order (ne0 first), as llama.cpp prints it
    type_name: str
    n_elements: int
    nbytes: int
    file: Path


@dataclass
class GGUFContents:
    files: list[Path]
    metadata: dict[str, Any]
    tensors: list[TensorEntry]
    readers: list[gguf.GGUFReader]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / max(self.n_elements, 1)

    def tensor_data(self, name: str):
        """The raw data of one tensor (a read-only memory map)."""
        for reader in self.readers:
            for t in reader.tensors:
                if t.name == name:
                    return t
        raise KeyError(name)


def split_set(path: Path) -> list[Path]:
    """All files of the split set `path` belongs to (just `path` when it is not split)."""
    m = SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    files = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for f in files:
        if not f.is_file():
            raise NemoqError(f"split file {f.name} of this set is missing", path)
    return files


def field_value(f: gguf.ReaderField) -> Any:
    return f.contents()


class FastGGUFReader(gguf.GGUFReader):
    """gguf-py's reader, parsing the metadata through a plain ndarray view of its memory map.

    The reader slices its np.memmap twice per string; with 131072 tokens and their merges that
    is ~800k memmap slices, ~10 s of numpy subclass overhead. A plain view of the same mapping
    gives the same arrays (same bytes, same mapping) in a fraction of the time."""

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        count = int(count)
        arr = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr if order in ("I", "<") and arr.dtype.byteorder in "=<|" else \
            arr.view(arr.dtype.newbyteorder(order))


@contextmanager
def reader_errors(path: Path):
    """Whatever gguf-py raises on a file, as one NemoqError naming it."""
    try:
        yield
    except OSError as e:
        raise NemoqError(f"cannot read ({e.strerror or e})", path) from None
    except READER_ERRORS as e:
        raise NemoqError(f"not a readable GGUF file ({type(e).__name__}: {e})", path) from None


def open_reader(path: Path) -> gguf.GGUFReader:
    """gguf-py's reader over a file whose header passed nemoq's bounded check first."""
    with reader_errors(path):
        check_header(path)
        return FastGGUFReader(path)


def read_gguf(path: Path) -> GGUFContents:
    path = Path(path)
    if not path.is_file():
        raise NemoqError("no such file", path)
    files = split_set(path)
    metadata: dict[str, Any] = {}
    tensors: list[TensorEntry] = []
    readers = []
    for f in files:
        reader = open_reader(f)
        with reader_errors(f):
            for name, fld in reader.fields.items():
                if not name.startswith("GGUF."):
                    metadata.setdefault(name, field_value(fld))
            tensors += [TensorEntry(t.name, tuple(int(x) for x in t.shape), t.tensor_type.name,
                                    int(t.n_elements), int(t.n_bytes), f) for t in reader.tensors]
        readers.append(reader)
    return GGUFContents(files, metadata, tensors, readers)
