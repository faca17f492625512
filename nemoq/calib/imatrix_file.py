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


def _read_gguf(path: Path) -> ImportanceMatrix:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise NemoqError(f"not a readable imatrix GGUF ({e})", path) from None
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    sums, counts = {}, {}
    for name, data in tensors.items():
        if not name.endswith(IN_SUM2):
            continue
        base = name[: -len(IN_SUM2)]
        if base + COUNTS not in tensors:
            raise NemoqError(f"{name} has no matching {base + COUNTS}", path)
        sums[base] = data.reshape(-1, data.shape[-1])
        counts[base] = tensors[base + COUNTS].reshape(-1)
        if counts[base].shape[0] != sums[base].shape[0]:
            raise NemoqError(f"{base}: {sums[base].shape[0]} matrices but {counts[base].shape[0]} counts", path)
    if not sums:
        raise NemoqError("no <tensor>.in_sum2 entries: not an imatrix file", path)

    def field(key: str, default):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default
    return ImportanceMatrix(sums, counts, list(field("imatrix.datasets", [])),
                            int(field("imatrix.chunk_count", 0)), int(field("imatrix.chunk_size", 0)))


def _read_legacy(path: Path) -> ImportanceMatrix:
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
    (n_entries,) = take("<i")
    if not 0 < n_entries < 1_000_000:
        raise NemoqError("not an imatrix file (neither GGUF nor llama.cpp's legacy .dat)", path)
    sums, counts = {}, {}
    for _ in range(n_entries):
        (name_len,) = take("<i")
        name = data[pos: pos + name_len].decode("utf-8", "replace")
        pos += name_len
        ncall, nval = take("<ii")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).copy()
        pos += 4 * nval
        # legacy values are mean x^2 scaled by the call count: one "token" of that weight
        sums[name] = (values / max(ncall, 1)).reshape(1, -1)
        counts[name] = np.array([1.0 if ncall > 0 else 0.0], dtype=np.float32)
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
