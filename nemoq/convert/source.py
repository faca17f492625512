"""Where a checkpoint comes from: a local folder, or a hub repo id fetched with huggingface_hub."""

from __future__ import annotations

import re
from pathlib import Path

from nemoq.errors import NemoqError

# Only what conversion reads: weights, index, config, tokenizer, chat template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(src: str | Path) -> Path:
    """A local checkpoint folder for `src`, downloading from the hub only when it is a repo id.

    Honours HF_HUB_OFFLINE and the local cache (huggingface_hub's own rules).
    """
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NemoqError("is a file; expected a checkpoint folder or a hub repo id", path)
        return path
    if not REPO_ID.match(str(src)):
        raise NemoqError("no such folder (and not a hub repo id like 'owner/name')", path)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(src), allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, offline-cache miss: all reported the same way
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NemoqError(f"could not fetch from the hub: {first_line}", str(src)) from None


def resolve_config(src: str | Path) -> Path:
    """A folder holding the checkpoint's config.json: for a hub id, only that file is fetched."""
    path = Path(src).expanduser()
    if path.is_file() and path.name == "config.json":
        return path.parent
    if path.exists() or not REPO_ID.match(str(src)):
        return resolve_source(src)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(src), allow_patterns=["config.json"]))
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NemoqError(f"could not fetch config.json from the hub: {first_line}", str(src)) from None
