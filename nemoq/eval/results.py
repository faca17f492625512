"""The numbers of one run as plain dicts: what --json writes and --baseline reads back.
The schema is documented in docs/eval.md; bump VERSION when a field changes meaning."""

from __future__ import annotations

import json
from pathlib import Path

from nemoq.errors import NemoqError
from nemoq.eval.metrics import TokenScores, kld_summary, ppl_summary
from nemoq.eval.model import tokens_digest
from nemoq.files import atomic_outputs

FORMAT = "nemoq.eval"
COMPARE_FORMAT = "nemoq.eval.compare"
VERSION = 1


def data_record(ev) -> dict:
    layout = ev.layout
    return {"path": str(ev.data) if ev.data else None, "tokens": int(len(ev.tokens)),
            "tokens_sha256": tokens_digest(ev.tokens[:layout.n_chunks * layout.ctx]),
            "ctx": layout.ctx, "chunks": layout.n_chunks,
            "scored_tokens": layout.n_chunks * layout.scored_per_chunk, "bos_per_chunk": layout.bos is not None}


def model_record(path: Path, fp: dict, scores: TokenScores) -> dict:
    return {"path": str(path), "size_bytes": fp["size_bytes"], "bits_per_weight": fp["bits_per_weight"],
            "fingerprint": fp["model"], "tokenizer": fp["tokenizer"], **ppl_summary(scores.array("nll"))}


def kld_record(scores: TokenScores, exact: bool) -> dict:
    return {**kld_summary(scores), "approximate": not exact}


def noise_record(label: str, path: Path, scores: TokenScores) -> dict:
    k = kld_summary(scores)
    return {"label": label, "path": str(path), **{key: k[key] for key in
            ("kld_mean", "kld_stderr", "kld_median", "kld_p99", "kld_max", "top1", "ppl_ratio")}}


def single_record(data: dict, model: dict, base: dict | None, kld: dict | None, noise: list[dict]) -> dict:
    return {"format": FORMAT, "version": VERSION, "data": data, "model": model, "base": base, "kld": kld,
            "noise_floor": noise, "gates": [], "passed": True}


def compare_record(data: dict, base: dict, models: list[dict], noise: list[dict]) -> dict:
    return {"format": COMPARE_FORMAT, "version": VERSION, "data": data, "base": base, "models": models,
            "noise_floor": noise}


def write_json(record: dict, out: Path, force: bool) -> None:
    with atomic_outputs(out, force) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_baseline(path: Path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NemoqError("no such file", path) from None
    except (OSError, ValueError) as e:
        raise NemoqError(f"not a readable JSON file ({e})", path) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise NemoqError(f"not a `nemoq eval --json` result of one model (format {FORMAT!r})", path)
    if record.get("version", 0) > VERSION:
        raise NemoqError(f"result version {record['version']} is newer than this nemoq reads ({VERSION})", path)
    return record
