"""Read the next chunk while the current one is encoded and written.

File reads, numpy/torch casts and file writes all release the GIL, so one reader thread
overlaps I/O with the encoding on the main thread. Chunks are read into a small ring of
buffers: with a hand-off queue of one item, at most three chunks are alive at once (being
written, waiting, being read), so three buffers are never overwritten while in use.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from nemoq.convert.plan import PlannedTensor

RING = 3
_END = object()


class BufferRing:
    """Hands out the buffers in turn; PlannedTensor.iter_chunks takes one per chunk."""

    def __init__(self, chunk_bytes: int, size: int = RING):
        self._buffers = [np.empty(chunk_bytes, dtype=np.uint8) for _ in range(size)]
        self._next = 0

    def take(self) -> np.ndarray:
        buffer = self._buffers[self._next]
        self._next = (self._next + 1) % len(self._buffers)
        return buffer


class Prefetcher:
    """Iterate tensor by tensor over chunks produced by a background reader thread."""

    def __init__(self, tensors: Sequence[PlannedTensor], chunk_bytes: int):
        self._tensors = tensors   # only the tensors whose chunks the caller will ask for
        self._ring = BufferRing(chunk_bytes)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_all, name="nemoq-reader", daemon=True)

    def __enter__(self) -> "Prefetcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        while self._thread.is_alive():   # unblock a reader waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_all(self) -> None:
        try:
            for t in self._tensors:
                for rows in t.iter_chunks(self._ring.take):
                    if not self._put(rows):
                        return
                if not self._put(_END):
                    return
        except BaseException as e:  # handed to the main thread, which raises it
            self._put(e)

    def chunks(self) -> Iterator[np.ndarray]:
        """The chunks of the next tensor, in order."""
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
