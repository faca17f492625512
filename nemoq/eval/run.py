"""The evaluations `nemoq eval` runs, returning result records (results.py).

- one model alone: perplexity;
- against a base GGUF: both loaded side by side, chunk by chunk (the default);
- against a --save-logits file: no base model needed, KLD approximated over the top k;
- several models (--compare) or a noise floor: the base runs once into a temporary cache of its
  logits, then each model in turn (each file's weights are read once).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nemoq.eval import results
from nemoq.eval.engine import (BaseCache, CachedBase, Evaluation, FileBase, LiveBase, Track, no_progress,
                               open_checked, score_model)
from nemoq.eval.logits_file import DEFAULT_TOP_K, BaseLogitsWriter, check_matches, read_base_logits
from nemoq.eval.model import LlamaModel, fingerprints

NOISE_RERUN = "base re-run"
NOISE_MODEL = "noise-floor model"


@dataclass
class RunOptions:
    text: str
    data: Optional[Path]
    ctx: int = 512
    chunks: Optional[int] = None
    threads: Optional[int] = None
    top_k: int = DEFAULT_TOP_K
    force: bool = False


def _prepare(model: LlamaModel, fp: dict, opts: RunOptions) -> Evaluation:
    return Evaluation.prepare(model, fp["tokenizer"], opts.text, opts.data, opts.ctx, opts.chunks, opts.threads)


def evaluate(model_path: Path, opts: RunOptions, *, base: Optional[Path] = None, base_logits: Optional[Path] = None,
             save_logits: Optional[Path] = None, noise_floor: bool = False, noise_floor_model: Optional[Path] = None,
             track: Track = no_progress) -> dict:
    """One model: perplexity, and KLD against `base` (a GGUF) or `base_logits` (a --save-logits file)."""
    if base is not None and (noise_floor or noise_floor_model is not None):
        return _single_via_cache(model_path, base, opts, save_logits, noise_floor_model, track)
    fp = fingerprints(model_path)
    writer = BaseLogitsWriter(opts.top_k) if save_logits else None
    with ExitStack() as stack:
        model = stack.enter_context(LlamaModel(model_path, opts.ctx, opts.threads))
        ev = _prepare(model, fp, opts)
        advance = track(model_path.name, ev.layout.n_chunks)
        base_info, source, saved_fp, saved_path = None, None, fp, model_path
        if base_logits is not None:
            stored = read_base_logits(base_logits)
            check_matches(stored, base_logits, tokens=ev.tokens, layout=ev.layout, n_vocab=ev.n_vocab,
                          tokenizer=ev.tokenizer)
            source = FileBase(stored, ev)
            base_info = {"source": "logits-file", "path": str(base_logits), "model_path": stored.model_path,
                         "fingerprint": stored.model, "top_k": stored.k, "tail_mass": stored.tail_mass()}
        elif base is not None:
            base_model, saved_fp = open_checked(base, ev)
            stack.enter_context(base_model)
            source, saved_path = LiveBase(base_model, ev, writer), base
            base_info = {"source": "model", "path": str(base), "fingerprint": saved_fp["model"],
                         "size_bytes": saved_fp["size_bytes"], "bits_per_weight": saved_fp["bits_per_weight"]}
        scores = score_model(model, ev, source, advance, writer if source is None else None)
    if writer is not None:
        writer.write(save_logits, opts.force, tokens=ev.tokens, layout=ev.layout, n_vocab=ev.n_vocab,
                     fingerprints=saved_fp, model_path=saved_path)
    kld = results.kld_record(scores, source.exact) if source is not None else None
    return results.single_record(results.data_record(ev), results.model_record(model_path, fp, scores),
                                 base_info, kld, [])


def _against_cached_base(base: Path, entries: list[tuple[str, Path]], opts: RunOptions,
                         save_logits: Optional[Path], track: Track):
    """Run `base` once into a cache, then score each (label, path) against it, one model at a time."""
    base_fp = fingerprints(base)
    writer = BaseLogitsWriter(opts.top_k) if save_logits else None
    with ExitStack() as stack:
        with LlamaModel(base, opts.ctx, opts.threads) as base_model:
            ev = _prepare(base_model, base_fp, opts)
            cache = CachedBase(ev, stack.enter_context(BaseCache(ev)))
            cache.fill(base_model, writer, track(f"{base.name} (base)", ev.layout.n_chunks))
        scored = []
        for label, path in entries:
            model, fp = open_checked(path, ev)
            with model:
                scored.append((label, path, fp, score_model(model, ev, cache, track(path.name, ev.layout.n_chunks))))
    if writer is not None:
        writer.write(save_logits, opts.force, tokens=ev.tokens, layout=ev.layout, n_vocab=ev.n_vocab,
                     fingerprints=base_fp, model_path=base)
    base_record = results.model_record(base, base_fp, cache.scores)
    return ev, base_record, scored


def _noise_entries(base: Path, noise_floor_model: Optional[Path]) -> list[tuple[str, Path]]:
    return [(NOISE_RERUN, base)] + ([(NOISE_MODEL, noise_floor_model)] if noise_floor_model else [])


def _noise_records(scored) -> list[dict]:
    return [results.noise_record(label, path, scores) for label, path, _, scores in scored
            if label in (NOISE_RERUN, NOISE_MODEL)]


def _single_via_cache(model_path: Path, base: Path, opts: RunOptions, save_logits: Optional[Path],
                      noise_floor_model: Optional[Path], track: Track) -> dict:
    entries = [("model", model_path)] + _noise_entries(base, noise_floor_model)
    ev, base_record, scored = _against_cached_base(base, entries, opts, save_logits, track)
    _, path, fp, scores = scored[0]
    base_info = {"source": "model", "path": str(base), "fingerprint": base_record["fingerprint"],
                 "size_bytes": base_record["size_bytes"], "bits_per_weight": base_record["bits_per_weight"]}
    return results.single_record(results.data_record(ev), results.model_record(path, fp, scores), base_info,
                                 results.kld_record(scores, exact=True), _noise_records(scored))


def compare(models: list[Path], base: Path, opts: RunOptions, noise_floor_model: Optional[Path] = None,
            track: Track = no_progress) -> dict:
    """Several models against one base evaluated once; the base re-run gives the noise floor."""
    entries = [("model", m) for m in models] + _noise_entries(base, noise_floor_model)
    ev, base_record, scored = _against_cached_base(base, entries, opts, None, track)
    rows = [{"model": results.model_record(path, fp, scores), "kld": results.kld_record(scores, exact=True)}
            for label, path, fp, scores in scored if label == "model"]
    return results.compare_record(results.data_record(ev), base_record, rows, _noise_records(scored))
