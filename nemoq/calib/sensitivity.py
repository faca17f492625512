"""How much KLD one tensor's rounding error costs: one-tensor ablations run by llama.cpp.

For a tensor and a type, a file with only that tensor in that type (every other one as the
source's full precision, F32) is run by llama.cpp (nemoq.eval) on calibration sequences, and its
mean KLD against the all-F32 file is measured; profile.py turns a few such points per tensor into
its KLD curve over its relative output error.

Cost: one file written and one llama.cpp run of `tokens` tokens per ablation (3 per tensor: 72 for
the bundled model). The F32 files are the model's full size: at real widths this step wants a GPU build of
llama.cpp and disk for one F32 file at a time; see docs/quantize.md.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from nemoq.convert.pipeline import Source, write_gguf
from nemoq.errors import NemoqError
from nemoq.quant.recipes import RECIPES, plan_types
from nemoq.quant.choose import chooser

DEFAULT_TOKENS = 1024
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
    """The first chunks of ctx tokens of `text` holding at least `tokens` (BOS first, as eval's chunks)."""
    ids = model.tokenize(text)
    n = min(max(1, -(-tokens // ctx)), len(ids) // ctx)
    if n < 1:
        raise NemoqError(f"the calibration text has {len(ids)} tokens, fewer than one sequence of {ctx}")
    seqs = ids[:n * ctx].reshape(n, ctx).copy()
    if model.add_bos:
        seqs[:, 0] = model.llm.token_bos()
    return seqs


def mix_klds(source: Source, mixes: list[dict[str, str]], data: Path | None, *, tokens: int = DEFAULT_TOKENS,
             ctx: int = 512, on_progress: Callable[[int, int], None] | None = None) -> tuple[list[float], int]:
    """Per mix (tensor -> type, the rest F32): the file's mean KLD against the all-F32 file on the
    calibration data's plain text (positions from FIRST on); and the tokens scored."""
    from nemoq.eval.model import LlamaModel
    with tempfile.TemporaryDirectory(prefix="nemoq-profile-") as tmp:
        base, one = Path(tmp) / "base.gguf", Path(tmp) / "one.gguf"
        write_with_types(source, base, {})
        with LlamaModel(base, ctx) as m:
            sequences = text_sequences(m, plain_text(data), ctx, tokens)
        scorer = Scorer(base, sequences, min(FIRST, ctx // 2))
        out = []
        for i, mix in enumerate(mixes):
            write_with_types(source, one, mix)
            out.append(scorer.kld(one))
            if on_progress is not None:
                on_progress(i + 1, len(mixes))
    return out, sum(len(b) for b in scorer.base)
