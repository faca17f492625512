"""llama.cpp's importance-matrix files, read and written without torch.

GGUF format (what llama-imatrix writes today): for each weight matrix `<name>`, a tensor
`<name>.in_sum2` of shape (n_mat, n_per_row) with the sum over tokens of x^2 per input
column, and `<name>.counts` (n_mat, 1) with the token counts; n_mat is the number of experts
for stacked expert tensors, else 1. Legacy `.dat`: per entry the name, a call count and
values already divided by the tokens per call.

Importance = in_sum2 / counts (the mean x^2 per column). An expert that saw no token has no
statistics; llama.cpp then uses all-ones weights. nemoq uses the mean importance of the
layer's other experts instead (stated in the coverage report), a better guess of which
columns matter for that layer's input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from nemoq.errors import NemoqError

IN_SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class ImportanceMatrix:
    sums: dict[str, np.ndarray]                 # name -> (n_mat, n_per_row) sum of x^2
    counts: dict[str, np.ndarray]               # name -> (n_mat,) tokens seen
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> np.ndarray | None:
        """(n_mat, n_per_row) mean x^2; experts without tokens get their layer's mean."""
        if name not in self.sums:
            return None
        sums, counts = self.sums[name].astype(np.float64), self.counts[name].astype(np.float64)
        seen = counts > 0
        if not seen.any():
            return None
        mean = np.zeros_like(sums)
        mean[seen] = sums[seen] / counts[seen, None]
        mean[~seen] = mean[seen].mean(axis=0)
        return mean.astype(np.float32)

    def unseen_experts(self, name: str) -> int:
        return int((self.counts[name] == 0).sum()) if name in self.counts else 0


def read_imatrix(path: Path) -> ImportanceMatrix:
    path = Path(path)
    if not path.is_file():
        raise NemoqError("no such imatrix file", path)
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _check_values(name: str, sums: np.ndarray, counts: np.ndarray, path: Path) -> None:
    """Sums of squares and token counts are finite and never negative."""
    for what, values in (("sums of squares", sums), ("counts", counts)):
        if not np.isfinite(values).all():
            raise NemoqError(f"{name}: non-finite {what} (a damaged imatrix)", path)
        if (values < 0).any():
            raise NemoqError(f"{name}: negative {what} (a damaged imatrix)", path)


def _metadata_int(reader, key: str, path: Path) -> int:
    f = reader.fields.get(key)
    if f is None:
        return 0
    value = f.contents()
    if not isinstance(value, int) or value < 0:
        raise NemoqError(f"{key} is {value!r}, not a count", path)
    return value


def _datasets(reader, path: Path) -> list[str]:
    f = reader.fields.get("imatrix.datasets")
    value = f.contents() if f is not None else []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NemoqError("imatrix.datasets is not a list of strings", path)
    return value


def _read_gguf(path: Path) -> ImportanceMatrix:
    from nemoq.gguf_file import open_reader, reader_errors
    reader = open_reader(path)
    with reader_errors(path):
        tensors = {t.name: t for t in reader.tensors}
        sums, counts = {}, {}
        for name, t in tensors.items():
            if not name.endswith(IN_SUM2):
                continue
            base = name[: -len(IN_SUM2)]
            c = tensors.get(base + COUNTS)
            if c is None:
                raise NemoqError(f"{name} has no matching {base + COUNTS}", path)
            for x in (t, c):
                if x.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise NemoqError(f"{x.name} is {x.tensor_type.name}; imatrix tensors are F32", path)
            n_per_row, n_mat = int(t.shape[0]), int(np.prod(t.shape[1:]))
            if len(t.shape) > 2 or int(c.n_elements) != n_mat:
                raise NemoqError(f"{base}: in_sum2 has shape {[int(d) for d in t.shape]} but counts has "
                                 f"{int(c.n_elements)} values (one per matrix expected)", path)
            sums[base] = np.asarray(t.data, dtype=np.float32).reshape(n_mat, n_per_row)
            counts[base] = np.asarray(c.data, dtype=np.float32).reshape(-1)
            _check_values(base, sums[base], counts[base], path)
        if not sums:
            raise NemoqError("no <tensor>.in_sum2 entries: not an imatrix file", path)
        return ImportanceMatrix(sums, counts, _datasets(reader, path), _metadata_int(reader, "imatrix.chunk_count", path),
                                _metadata_int(reader, "imatrix.chunk_size", path))


def _read_legacy(path: Path) -> ImportanceMatrix:
    """llama.cpp's legacy layout: i32 n_entries, then per entry i32 name length, name,
    i32 call count, i32 value count, f32 values (then a trailer nemoq does not need)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise NemoqError("truncated legacy imatrix (.dat) file", path)
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    def length(n: int, item_bytes: int, what: str) -> int:
        if not 0 < n * item_bytes <= len(data) - pos:
            raise NemoqError(f"corrupt legacy imatrix (.dat): {what} {n} at byte {pos} does not fit "
                             f"the file's {len(data)} bytes", path)
        return n
    (n_entries,) = take("<i")
    if not 0 < n_entries * 12 <= len(data):   # 12: the fixed bytes of one entry
        raise NemoqError("not an imatrix file (neither GGUF nor llama.cpp's legacy .dat)", path)
    sums, counts = {}, {}
    for _ in range(n_entries):
        (name_len,) = take("<i")
        name_len = length(name_len, 1, "name length")
        try:
            name = data[pos: pos + name_len].decode("utf-8")
        except UnicodeDecodeError:
            raise NemoqError(f"corrupt legacy imatrix (.dat): the name at byte {pos} is not UTF-8", path) from None
        pos += name_len
        if name in sums:
            raise NemoqError(f"corrupt legacy imatrix (.dat): {name} appears twice", path)
        ncall, nval = take("<ii")
        nval = length(nval, 4, f"{name}'s value count")
        if ncall < 0:
            raise NemoqError(f"corrupt legacy imatrix (.dat): {name} has call count {ncall}", path)
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # legacy values are mean x^2 scaled by the call count: one "token" of that weight
        sums[name] = (values / max(ncall, 1)).reshape(1, -1)
        counts[name] = np.array([1.0 if ncall > 0 else 0.0], dtype=np.float32)
        _check_values(name, sums[name], counts[name], path)
    return ImportanceMatrix(sums, counts)


def write_imatrix(path: Path, imatrix: ImportanceMatrix) -> None:
    """llama-imatrix's GGUF layout, so llama.cpp's llama-quantize reads nemoq's files."""
    writer = gguf.GGUFWriter(path, arch="")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", imatrix.datasets or ["nemoq"])
    writer.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.sums):
        writer.add_tensor(name + IN_SUM2, imatrix.sums[name].astype(np.float32))
        writer.add_tensor(name + COUNTS, imatrix.counts[name].astype(np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
