"""The calibration corpus shipped with nemoq: license-clean records of text and chats.

Prose (CPython standard-library docstrings), code (standard-library sources), question/answer
chats with reasoning on and off, and paragraphs in thirteen languages; see README.md for sources
and licences. `nemoq calibrate` uses the "train" split by default. Chats are kept as message
lists so each model renders them with its own chat template. The test fixtures read the same
files (tests/fixtures/corpus), so split and order are shared with them.

Every record has a fixed split ("train" or "val"); validation records never share a source item
with training records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

CORPUS_DIR = Path(__file__).resolve().parent
JSONL_FILES = (
    "stdlib_docstrings.jsonl",
    "stdlib_code.jsonl",
    "chats_generated.jsonl",
    "chats_handwritten.jsonl",
)
MULTILINGUAL_FILE = "multilingual.txt"
SPLITS = ("train", "val", "all")
KIND_BY_FILE = {"stdlib_docstrings.jsonl": "prose", "stdlib_code.jsonl": "code"}  # other files: chat


@dataclass(frozen=True)
class Record:
    id: str
    split: str                        # "train" or "val"
    kind: str                         # "prose", "code", "chat" or "multilingual"
    text: str | None = None           # plain text, or
    messages: tuple | None = None     # a chat to render with a chat template
    tools: tuple | None = None


def _multilingual() -> Iterator[Record]:
    """One record per paragraph; every eighth paragraph (offset 4) is held out."""
    lang, index = "en", 0
    text = (CORPUS_DIR / MULTILINGUAL_FILE).read_text(encoding="utf-8")
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("## "):
            lang, _, block = block[3:].partition("\n")
            block = block.strip()
        if not block:
            continue
        yield Record(f"multilingual:{lang}:{index}", "val" if index % 8 == 4 else "train", "multilingual", block)
        index += 1


def _jsonl(name: str) -> Iterator[Record]:
    with (CORPUS_DIR / name).open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            tools = tuple(r["tools"]) if r.get("tools") else None
            messages = tuple(r["messages"]) if "messages" in r else None
            yield Record(r["id"], r["split"], KIND_BY_FILE.get(name, "chat"), r.get("text"), messages, tools)


def iter_records(split: str = "all") -> Iterator[Record]:
    """All corpus records of `split` ("train", "val" or "all"), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    for name in JSONL_FILES:
        yield from (r for r in _jsonl(name) if split in ("all", r.split))
    yield from (r for r in _multilingual() if split in ("all", r.split))
