"""Calibration text: the shipped corpus or the user's files, as plain texts and chats.

--data is a .txt file (one text), a .jsonl file (records with "text" or "messages", optional
"tools") or a folder of such files. Chats stay message lists until the model's own chat
template renders them (see sequences.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nemoq.errors import NemoqError
from nemoq.inputs import read_text

DATA_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Item:
    text: str | None = None
    messages: list | None = None
    tools: list | None = None


def corpus_items(split: str = "train") -> list[Item]:
    from nemoq.calib.corpus import iter_records
    return [Item(r.text, list(r.messages) if r.messages else None, list(r.tools) if r.tools else None)
            for r in iter_records(split)]


def _jsonl_items(path: Path, text: str) -> list[Item]:
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise NemoqError(f"line {number} is not JSON ({e.msg})", path) from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            items.append(Item(record["text"]))
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            items.append(Item(None, record["messages"], record.get("tools")))
        else:
            raise NemoqError(f'line {number} has neither "text" (a string) nor "messages" (a list)', path)
    return items


def file_items(path: Path) -> list[Item]:
    text = read_text(path, "convert it to UTF-8")
    if path.suffix == ".jsonl":
        return _jsonl_items(path, text)
    return [Item(text)] if text.strip() else []


def data_files(data: Path) -> list[Path]:
    if not data.exists():
        raise NemoqError("no such calibration data file or folder", data)
    if data.is_dir():
        files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise NemoqError(f"no {' or '.join(DATA_SUFFIXES)} files in this folder", data)
        return files
    if data.suffix not in DATA_SUFFIXES:
        raise NemoqError(f"calibration data must be {' or '.join(DATA_SUFFIXES)} (or a folder of them)", data)
    return [data]


def load_items(data: Path | None) -> tuple[list[Item], list[str]]:
    """(items, dataset names for the imatrix metadata); the corpus' train split when data is None."""
    if data is None:
        return corpus_items("train"), ["nemoq-corpus:train"]
    files = data_files(Path(data))
    items = [item for f in files for item in file_items(f)]
    if not items:
        raise NemoqError("calibration data is empty", data)
    return items, [str(f) for f in files]
