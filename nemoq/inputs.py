"""Reading the small text and JSON files the commands take (config.json, tokenizer files, chat
templates, calibration and evaluation text): any failure is one error naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from nemoq.errors import NemoqError


def read_text(path: Path, hint: str = "") -> str:
    """A UTF-8 file's text; `hint` says what to do about a file that is not UTF-8."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise NemoqError(f"not UTF-8 text (byte {e.start}){'; ' + hint if hint else ''}", path) from None
    except OSError as e:
        raise NemoqError(f"cannot read ({e.strerror or e})", path) from None


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise NemoqError(f"not valid JSON ({e})", path) from None
    except RecursionError:
        raise NemoqError("not valid JSON (nested too deeply)", path) from None
    if not isinstance(data, dict):
        raise NemoqError(f"expected a JSON object, found {type(data).__name__}", path)
    return data
