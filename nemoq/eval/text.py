"""The evaluation text. One function, so a default text can be added in one place."""

from __future__ import annotations

from pathlib import Path

from nemoq.errors import NemoqError
from nemoq.inputs import read_text


def load_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise NemoqError("no such file (--data expects a UTF-8 text file)", path)
    text = read_text(path)
    if not text.strip():
        raise NemoqError("the text file is empty", path)
    return text
