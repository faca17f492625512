"""Writing GGUF files in a stream: one tensor at a time, from row chunks or straight from the
source file, with the kernel asked to write back as we go.

Where the files go and how they land whole is nemoq.files' job (atomic_outputs).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import gguf
import numpy as np


@dataclass(frozen=True)
class FileRange:
    """Bytes to copy unchanged from an open source file: the kernel copies them
    (copy_file_range), so they never pass through a user-space buffer."""
    fd: int
    offset: int
    nbytes: int


COPY_STEP = 64 * 1024 * 1024


def copy_range(src: FileRange, dst_fd: int) -> None:
    done = 0
    while done < src.nbytes:
        n = 0
        if hasattr(os, "copy_file_range") and not getattr(copy_range, "unsupported", False):
            try:
                n = os.copy_file_range(src.fd, dst_fd, min(src.nbytes - done, COPY_STEP), src.offset + done)
            except OSError:             # e.g. a filesystem or kernel without it: copy by hand
                copy_range.unsupported = True  # type: ignore[attr-defined]
        if n == 0:
            data = os.pread(src.fd, min(src.nbytes - done, COPY_STEP), src.offset + done)
            if not data:
                raise OSError(f"source ended {src.nbytes - done} bytes early")
            n = os.write(dst_fd, data)
        done += n


_NUMPY_OF = {gguf.GGUFValueType.INT32: "<i4", gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.FLOAT32: "<f4"}


class StreamingGGUFWriter(gguf.GGUFWriter):
    """gguf-py's writer, plus writing one tensor from a stream of row chunks, and packing of
    long metadata arrays (131072 tokens, their types, the merges) without a Python call per item."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        fast = (vtype == gguf.GGUFValueType.ARRAY and isinstance(val, (list, tuple)) and len(val) > 64
                and self.endianess == gguf.GGUFEndian.LITTLE)
        item_type = (sub_type or gguf.GGUFValueType.get_type(val[0])) if fast else None
        if item_type == gguf.GGUFValueType.STRING and all(type(v) is str for v in val):
            encoded = [v.encode("utf-8") for v in val]
            body = b"".join(struct.pack("<Q", len(e)) + e for e in encoded)
        elif item_type in _NUMPY_OF and all(type(v) is type(val[0]) for v in val):
            body = np.asarray(val, dtype=_NUMPY_OF[item_type]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = struct.pack("<I", vtype) if add_vtype else b""
        return head + struct.pack("<IQ", item_type, len(val)) + body

    def write_tensor_chunks(self, chunks: Iterable["np.ndarray | FileRange"]) -> int:
        # Mirrors GGUFWriter.write_tensor_data, which needs the whole tensor in memory.
        assert self.fout is not None
        file_id = next(i for i, tensors in enumerate(self.tensors) if tensors)
        fout = self.fout[file_id]
        name = next(iter(self.tensors[file_id]))
        info = self.tensors[file_id].pop(name)
        self.write_padding(fout, fout.tell())
        written = 0
        for chunk in chunks:
            if isinstance(chunk, FileRange):
                fout.flush()
                copy_range(chunk, fout.fileno())
            else:
                fout.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
                fout.flush()
            written += chunk.nbytes
            self.writeback.submit(fout.fileno(), fout.tell() - chunk.nbytes, chunk.nbytes)
        if written != info.nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {info.nbytes}")
        self.write_padding(fout, written)
        self.state = gguf.gguf_writer.WriterState.WEIGHTS
        return written

    @functools.cached_property
    def writeback(self) -> "Writeback":
        return Writeback()

    def close(self) -> None:
        self.writeback.drain()
        super().close()

    def __enter__(self) -> "StreamingGGUFWriter":
        return self

    def __exit__(self, *exc) -> None:
        # After an error or an interruption too: the writeback thread ends and the files close
        # (the partial folder holding them is removed by nemoq.files.atomic_outputs).
        self.close()


class Writeback:
    """Starts writing each range we wrote to disk (and drops it from the page cache once
    written) from a background thread, so the final fsync finds little left to do and the
    converter never waits for the disk. Ranges in the page cache are stable once written, so
    this needs no buffer hand-off. A no-op where posix_fadvise is missing."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="nemoq-writeback", daemon=True)
        self._started = False
        self._previous: dict[int, tuple[int, int]] = {}

    def submit(self, fd: int, offset: int, length: int) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        if not self._started:
            self._thread.start()
            self._started = True
        self._queue.put((fd, offset, length))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, offset, length = item
            # The previous range is written by now: dropping it again frees its pages.
            prev = self._previous.get(fd, (offset, 0))
            try:
                os.posix_fadvise(fd, prev[0], offset + length - prev[0], os.POSIX_FADV_DONTNEED)
            except OSError:
                pass   # advice only; fsync still makes the file durable
            self._previous[fd] = (offset, length)

    def drain(self) -> None:
        if self._started:
            self._queue.put(None)
            self._thread.join()
            self._started = False


def split_names(out: Path, n_splits: int) -> list[Path]:
    if n_splits <= 1:
        return [out]
    return [out.with_name(gguf.SHARD_NAME_FORMAT.format(out.stem, i + 1, n_splits)) for i in range(n_splits)]
