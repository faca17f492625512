"""The one exception type the CLI shows to users as a single red line."""

from __future__ import annotations

from pathlib import Path


class NemoqError(Exception):
    """A user-facing error: what failed, in which file, and what to do about it."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)
