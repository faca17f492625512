"""The evaluation text. One function, so a default text can be added in one place."""

from __future__ import annotations

from pathlib import Path

from nemoq.errors import NemoqError


def load_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise NemoqError("no such file (--data expects a UTF-8 text file)", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NemoqError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None
    if not text.strip():
        raise NemoqError("the text file is empty", path)
    return text
