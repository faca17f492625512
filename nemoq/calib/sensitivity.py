"""llama.cpp's KLD of a file with some tensors rounded: the oracle of the profile's predictions.

A file with the mix's tensors in their types (every other one as the source's full precision,
F32) is written and run by llama.cpp (nemoq.eval) on fixed sequences, and its per-token KLD
against the all-F32 file measured. The profile itself measures the same KLD as streams of its
forward (ablations.py: no file per mix); predictor_check.py holds its predictions to this.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from nemoq.convert.pipeline import Source, write_gguf
from nemoq.errors import NemoqError
from nemoq.quant.recipes import RECIPES, plan_types
from nemoq.quant.choose import chooser

DEFAULT_TOKENS = 1024   # tokens scored per one-tensor ablation of a profile
CTX = 512
FIRST = 64   # first scored position of a sequence (the ones before have little context)


def only(name: str) -> str:
    """A --tensor-type pattern that matches exactly one tensor."""
    return "^" + re.escape(name) + "$"


def write_with_types(source: Source, out: Path, types: dict[str, str], *, base: str = "F32",
                     tensor_scales: bool = True) -> None:
    """`source` into `out`: every tensor of `types` in its type, the others as recipe `base` types them."""
    overrides = [(only(n), t) for n, t in types.items()]
    typed = plan_types([t.spec for t in source.plan.tensors], RECIPES[base], source.layer_kinds, overrides,
                       tensor_scales)
    write_gguf(source, out, chooser(typed), int(RECIPES[base].file_type), force=True)


class Scorer:
    """Per-token KLD of a GGUF against a base GGUF's log-probs on fixed token sequences, scoring
    the positions from `first` on (each sequence from a fresh state)."""

    def __init__(self, base: Path, sequences: np.ndarray, first: int = 0):
        from nemoq.eval.model import LlamaModel
        self.sequences = [[int(t) for t in row] for row in sequences]
        self.ctx, self.first = len(self.sequences[0]), first
        with LlamaModel(base, self.ctx) as m:
            self.base = [m.scored_logprobs(ids, first).astype(np.float32) for ids in self.sequences]

    def kld_rows(self, path: Path) -> np.ndarray:
        from nemoq.eval.metrics import kl_rows
        from nemoq.eval.model import LlamaModel
        with LlamaModel(path, self.ctx) as m:
            return np.concatenate([kl_rows(b.astype(np.float64), m.scored_logprobs(ids, self.first))
                                   for b, ids in zip(self.base, self.sequences)])

    def kld(self, path: Path) -> float:
        return float(self.kld_rows(path).mean())


def plain_text(data: Path | None) -> str:
    """The calibration data as plain text (chats as their messages' contents), as `nemoq eval`
    reads text: KLD on chat-templated sequences ran ~1.3x KLD on plain text on the bundled model."""
    from nemoq.calib.data import load_items
    items, _ = load_items(data)
    return "\n\n".join(i.text if i.text is not None else
                        "\n".join(str(m.get("content") or "") for m in i.messages or []) for i in items)


def text_sequences(model, text: str, ctx: int, tokens: int) -> np.ndarray:
    """The first chunks of ctx tokens of `text` holding at least `tokens` (BOS first, as eval's
    chunks), as the llama.cpp model `model` reads it."""
    return chunks(np.asarray(model.tokenize(text)), ctx, tokens, model.llm.token_bos() if model.add_bos else None)


def chunks(ids: np.ndarray, ctx: int, tokens: int, bos: int | None) -> np.ndarray:
    """The first sequences of ctx of the token ids `ids` holding at least `tokens`, each with
    `bos` (where not None) in place of its first token."""
    n = min(max(1, -(-tokens // ctx)), len(ids) // ctx)
    if n < 1:
        raise NemoqError(f"the calibration text has {len(ids)} tokens, fewer than one sequence of {ctx}")
    seqs = ids[:n * ctx].reshape(n, ctx).copy()
    if bos is not None:
        seqs[:, 0] = bos
    return seqs
