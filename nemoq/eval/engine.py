"""Scoring models chunk by chunk against a base: live beside it, from a cache of its logits,
or from a top-k logits file.

A base source answers `score(i, cand_logp, targets)` for chunk i with the base NLL, the KLD
and top-1 agreement per scored token. All three give the same numbers except the top-k file,
whose KLD lumps the tail into one bucket (logits_file.py).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from nemoq.errors import NemoqError
from nemoq.eval.logits_file import BaseLogits, BaseLogitsWriter, lumped_kl
from nemoq.eval.metrics import TokenScores, kl_rows, log_softmax, target_nll
from nemoq.eval.model import ChunkLayout, LlamaModel, fingerprints
from nemoq.files import check_free_space

Track = Callable[[str, int], Callable[[], None]]   # (label, total) -> advance one step


def no_progress(label: str, total: int) -> Callable[[], None]:
    return lambda: None


@dataclass
class Evaluation:
    """The tokenized text and its chunking, shared by every model of one run."""
    data: Optional[Path]
    tokens: np.ndarray
    layout: ChunkLayout
    n_vocab: int
    tokenizer: str           # tokenizer fingerprint of the model that tokenized the text
    threads: Optional[int]

    @classmethod
    def prepare(cls, model: LlamaModel, tokenizer: str, text: str, data: Optional[Path], ctx: int,
                max_chunks: Optional[int], threads: Optional[int]) -> "Evaluation":
        tokens = model.tokenize(text)
        layout = model.layout(len(tokens), ctx, max_chunks, data)
        return cls(data, tokens, layout, model.n_vocab, tokenizer, threads)

    def targets(self, i: int) -> np.ndarray:
        return self.layout.targets(self.tokens, i)

    def check_same_tokenizer(self, path: Path, fp: dict, n_vocab: int) -> None:
        if fp["tokenizer"] != self.tokenizer or n_vocab != self.n_vocab:
            raise NemoqError(f"its tokenizer differs from the first model's ({fp['tokenizer']}, {n_vocab} tokens vs "
                             f"{self.tokenizer}, {self.n_vocab}): KLD needs the same tokens", path)


def score_exact(base_logp: np.ndarray, cand_logp: np.ndarray, targets: np.ndarray):
    return target_nll(base_logp, targets), kl_rows(base_logp, cand_logp), base_logp.argmax(-1) == cand_logp.argmax(-1)


class LiveBase:
    """The base model loaded beside the candidate: each chunk's base log-probs are computed when
    the candidate reaches it and dropped after (never the full logits of the run in memory)."""
    exact = True

    def __init__(self, model: LlamaModel, ev: Evaluation, writer: Optional[BaseLogitsWriter] = None):
        self.model, self.ev, self.writer = model, ev, writer

    def score(self, i: int, cand_logp: np.ndarray, targets: np.ndarray):
        base_logp = self.model.scored_logprobs(self.ev.layout.chunk(self.ev.tokens, i), self.ev.layout.first)
        if self.writer is not None:
            self.writer.add(base_logp, targets)
        return score_exact(base_logp, cand_logp, targets)


class CachedBase:
    """The base run once, its scored rows' raw float32 logits kept in a temporary file, so several
    models are compared to it one after the other (each model's weights are read once)."""
    exact = True

    def __init__(self, ev: Evaluation, directory: Path):
        rows = ev.layout.n_chunks * ev.layout.scored_per_chunk
        self.ev, self.dir = ev, directory
        self.logits = np.lib.format.open_memmap(directory / "base-logits.npy", mode="w+", dtype=np.float32,
                                                shape=(rows, ev.n_vocab))
        self.scores = TokenScores()

    @staticmethod
    def bytes_needed(ev: Evaluation) -> int:
        return ev.layout.n_chunks * ev.layout.scored_per_chunk * ev.n_vocab * 4

    def rows(self, i: int) -> slice:
        n = self.ev.layout.scored_per_chunk
        return slice(i * n, (i + 1) * n)

    def fill(self, model: LlamaModel, writer: Optional[BaseLogitsWriter], advance: Callable[[], None]) -> None:
        layout = self.ev.layout
        for i in range(layout.n_chunks):
            base_logp = model.scored_logprobs(layout.chunk(self.ev.tokens, i), layout.first)
            self.logits[self.rows(i)] = model.llm.scores[layout.first:layout.ctx - 1]
            self.scores.add(target_nll(base_logp, self.ev.targets(i)))
            if writer is not None:
                writer.add(base_logp, self.ev.targets(i))
            advance()

    def score(self, i: int, cand_logp: np.ndarray, targets: np.ndarray):
        return score_exact(log_softmax(self.logits[self.rows(i)]), cand_logp, targets)


class FileBase:
    """A --save-logits file: base NLL and top-1 exact, KLD over the top k plus one tail bucket."""
    exact = False

    def __init__(self, base: BaseLogits, ev: Evaluation):
        self.base, self.n = base, ev.layout.scored_per_chunk

    def score(self, i: int, cand_logp: np.ndarray, targets: np.ndarray):
        rows = slice(i * self.n, (i + 1) * self.n)
        kld = lumped_kl(self.base.ids[rows], self.base.logp[rows], cand_logp)
        return self.base.nll[rows], kld, self.base.top1[rows] == cand_logp.argmax(-1)


def score_model(model: LlamaModel, ev: Evaluation, base, advance: Callable[[], None],
                writer: Optional[BaseLogitsWriter] = None) -> TokenScores:
    """Every chunk of the evaluation through `model`, against `base` when there is one. With no
    base and a writer, the model's own log-probs are saved (it is the base of later runs)."""
    scores = TokenScores()
    layout = ev.layout
    for i in range(layout.n_chunks):
        targets = ev.targets(i)
        cand_logp = model.scored_logprobs(layout.chunk(ev.tokens, i), layout.first)
        if base is None:
            scores.add(target_nll(cand_logp, targets))
            if writer is not None:
                writer.add(cand_logp, targets)
        else:
            scores.add(target_nll(cand_logp, targets), *base.score(i, cand_logp, targets))
        advance()
    return scores


def open_checked(path: Path, ev: Evaluation) -> tuple[LlamaModel, dict]:
    """Load one more model of a run, refusing one with another tokenizer."""
    fp = fingerprints(path)
    model = LlamaModel(path, ev.layout.ctx, ev.threads)
    try:
        ev.check_same_tokenizer(path, fp, model.n_vocab)
    except NemoqError:
        model.close()
        raise
    return model, fp


class BaseCache:
    """A temporary folder for CachedBase, removed on exit; refuses to start without the space."""

    def __init__(self, ev: Evaluation):
        self.path = Path(tempfile.mkdtemp(prefix="nemoq-eval-"))
        try:
            check_free_space(self.path, CachedBase.bytes_needed(ev))
        except NemoqError as e:
            shutil.rmtree(self.path, ignore_errors=True)
            raise NemoqError(f"{e} (the base model's logits are cached there; set TMPDIR to a larger disk "
                             f"or use fewer --chunks)") from None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
