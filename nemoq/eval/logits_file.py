"""Base-model log-probs kept compactly, to compute KLD later without the base model.

llama-perplexity's --kl-divergence-base file stores every log-prob (uint16 per vocab entry,
256 KiB per token at a 128k vocab: ~37 GiB for wikitext-2's test set at --ctx 512). nemoq keeps, per scored token, the k
most likely tokens and their log-probs (float32), the base NLL of the actual next token and the
base top-1: about 2 KiB per token at k = 256. KLD against such a file is the KL divergence
between the two distributions with every token outside the base's top k lumped into one bucket:
it can only underestimate the exact KLD (grouping outcomes never increases a divergence), and
the error is measured in docs/eval.md.

The file is a numpy .npz: it also carries the data's token ids, the chunk layout and the base
model's fingerprints, so a file made from other text, another context size or another tokenizer
is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nemoq.errors import NemoqError
from nemoq.files import atomic_outputs

FORMAT = "nemoq.base-logits"
VERSION = 1
DEFAULT_TOP_K = 256


def top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and log-probs of the k largest per row, most likely first (ties: lower id first,
    as argmax picks)."""
    k = min(k, logp.shape[-1])
    ids = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, ids, -1)
    order = np.lexsort((ids, -vals), axis=-1)
    return np.take_along_axis(ids, order, -1).astype(np.int32), np.take_along_axis(vals, order, -1)


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and far below it; -inf at x = 0."""
    x = np.minimum(x, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -0.693, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def lumped_kl(ids: np.ndarray, base_topk: np.ndarray, cand_logp: np.ndarray) -> np.ndarray:
    """KL(P || Q) over the base's top-k tokens plus one bucket holding all the others."""
    base_topk = base_topk.astype(np.float64)
    cand_topk = np.take_along_axis(cand_logp, ids.astype(np.int64), -1)
    kl = (np.exp(base_topk) * (base_topk - cand_topk)).sum(-1)
    if ids.shape[-1] == cand_logp.shape[-1]:
        return kl
    lse = lambda v: np.logaddexp.reduce(v, axis=-1)
    rest_p, rest_q = _log1mexp(lse(base_topk)), _log1mexp(lse(cand_topk))
    rest_q = np.maximum(rest_q, -745.0)   # the candidate kept no mass outside: the bucket term is huge, not inf
    with np.errstate(invalid="ignore"):
        bucket = np.where(np.isfinite(rest_p), np.exp(rest_p) * (rest_p - rest_q), 0.0)
    return kl + bucket


@dataclass
class BaseLogits:
    """Everything needed to score a candidate against a base without running the base."""
    tokens: np.ndarray        # the evaluated text's token ids (int32), all chunks
    ctx: int
    n_chunks: int
    bos: int                  # -1: no BOS written over chunk starts
    n_vocab: int
    tokenizer: str
    model: str
    model_path: str
    ids: np.ndarray           # (scored tokens, k) int32
    logp: np.ndarray          # (scored tokens, k) float32, most likely first
    nll: np.ndarray           # (scored tokens,) float64: base NLL of the actual next token
    top1: np.ndarray          # (scored tokens,) int32: base argmax over the whole vocab

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def tail_mass(self) -> float:
        """Mean base probability outside the stored top k: what the KLD approximation lumps."""
        return float(1.0 - np.exp(self.logp.astype(np.float64)).sum(-1).mean())


class BaseLogitsWriter:
    """Collects base log-probs chunk by chunk, then writes one .npz (atomically)."""

    def __init__(self, k: int = DEFAULT_TOP_K):
        self.k = k
        self.ids, self.logp, self.nll, self.top1 = [], [], [], []

    def add(self, base_logp: np.ndarray, targets: np.ndarray) -> None:
        ids, vals = top_k(base_logp, self.k)
        self.ids.append(ids)
        self.logp.append(vals.astype(np.float32))
        self.nll.append(-base_logp[np.arange(len(targets)), targets])
        self.top1.append(base_logp.argmax(-1).astype(np.int32))

    def write(self, out: Path, force: bool, *, tokens, layout, n_vocab: int, fingerprints: dict,
              model_path: Path) -> None:
        arrays = {
            "format": np.array(FORMAT), "version": np.array(VERSION),
            "tokens": np.asarray(tokens[:layout.n_chunks * layout.ctx], dtype=np.int32),
            "ctx": np.array(layout.ctx), "n_chunks": np.array(layout.n_chunks),
            "bos": np.array(-1 if layout.bos is None else layout.bos), "n_vocab": np.array(n_vocab),
            "tokenizer": np.array(fingerprints["tokenizer"]), "model": np.array(fingerprints["model"]),
            "model_path": np.array(str(model_path)),
            "ids": np.concatenate(self.ids), "logp": np.concatenate(self.logp),
            "nll": np.concatenate(self.nll), "top1": np.concatenate(self.top1),
        }
        with atomic_outputs(out, force) as tmp:
            with open(tmp, "wb") as f:   # a file object: np.savez would append .npz to a path
                np.savez(f, **arrays)


def read_base_logits(path: Path) -> BaseLogits:
    path = Path(path)
    if not path.is_file():
        raise NemoqError("no such file", path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != FORMAT:
                raise NemoqError(f"not a nemoq base-logits file (written by --save-logits)", path)
            if int(z["version"]) > VERSION:
                raise NemoqError(f"base-logits file version {int(z['version'])} is newer than this nemoq "
                                 f"reads ({VERSION}); upgrade nemoq", path)
            scalars = {k: z[k].item() for k in ("ctx", "n_chunks", "bos", "n_vocab", "tokenizer", "model", "model_path")}
            return BaseLogits(tokens=z["tokens"], ids=z["ids"], logp=z["logp"], nll=z["nll"], top1=z["top1"],
                              **scalars)
    except (OSError, ValueError, KeyError) as e:
        raise NemoqError(f"not a readable base-logits file ({e})", path) from None


def check_matches(base: BaseLogits, path: Path, *, tokens: np.ndarray, layout, n_vocab: int, tokenizer: str) -> None:
    """Refuse a file made from other text, chunking or tokenizer, naming the first difference."""
    wanted = np.asarray(tokens[:layout.n_chunks * layout.ctx], dtype=np.int32)
    checks = (
        (base.tokenizer == tokenizer, f"it was made with another tokenizer ({base.tokenizer} vs this "
                                      f"model's {tokenizer})"),
        (base.n_vocab == n_vocab, f"its vocabulary has {base.n_vocab} tokens, this model's {n_vocab}"),
        (base.ctx == layout.ctx, f"it was made with --ctx {base.ctx}, not {layout.ctx}"),
        (base.n_chunks == layout.n_chunks, f"it holds {base.n_chunks} chunks, this run evaluates "
                                           f"{layout.n_chunks} (use --chunks {base.n_chunks})"),
        (base.bos == (-1 if layout.bos is None else layout.bos), "its chunks start with another BOS token"),
        (np.array_equal(base.tokens, wanted), "it was made from other text (the token ids differ)"),
    )
    for ok, why in checks:
        if not ok:
            raise NemoqError(f"base logits do not match this evaluation: {why}", path)
