"""How much KLD one tensor's rounding error costs: one-tensor ablations run by llama.cpp.

For each tensor, a file with only that tensor quantized (every other one as the source's full
precision, F32) is run by llama.cpp (nemoq.eval) on calibration sequences, and its mean KLD
against the all-F32 file is measured. With e the tensor's relative output error in that type on
the calibration inputs (type_errors.py), the tensor's sensitivity is c = KLD / e^2: a tensor's
KLD grows with the square of its output error while the error is small (the logits move
linearly with it, KLD is quadratic in the logits), so c e'^2 predicts any other type's share.

Cost: one file written and one llama.cpp run of `tokens` tokens per tensor (~24 for the bundled
model). The F32 files are the model's full size: at real widths this step wants a GPU build of
llama.cpp and disk for one F32 file at a time; see docs/quantize.md.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from nemoq.convert.pipeline import Source, write_gguf
from nemoq.quant.recipes import RECIPES, chooser, plan_types

DEFAULT_TOKENS = 2048


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
    """Mean KLD of a GGUF against a base GGUF's log-probs on fixed token sequences."""

    def __init__(self, base: Path, sequences: np.ndarray):
        from nemoq.eval.model import LlamaModel
        self.sequences = [[int(t) for t in row] for row in sequences]
        self.ctx = len(self.sequences[0])
        with LlamaModel(base, self.ctx) as m:
            self.base = [m.scored_logprobs(ids, 0).astype(np.float32) for ids in self.sequences]

    def kld(self, path: Path) -> float:
        from nemoq.eval.metrics import kl_rows
        from nemoq.eval.model import LlamaModel
        with LlamaModel(path, self.ctx) as m:
            rows = [kl_rows(b.astype(np.float64), m.scored_logprobs(ids, 0)) for b, ids in zip(self.base, self.sequences)]
        return float(np.concatenate(rows).mean())


def ablation_klds(source: Source, ablate: dict[str, str], sequences: np.ndarray, *,
                  on_progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """tensor -> mean KLD of the file with only that tensor in type ablate[tensor]."""
    with tempfile.TemporaryDirectory(prefix="nemoq-profile-") as tmp:
        base, one = Path(tmp) / "base.gguf", Path(tmp) / "one.gguf"
        write_with_types(source, base, {})
        scorer = Scorer(base, sequences)
        out = {}
        for i, (name, type_name) in enumerate(ablate.items()):
            write_with_types(source, one, {name: type_name})
            out[name] = scorer.kld(one)
            if on_progress is not None:
                on_progress(i + 1, len(ablate))
    return out


def sensitivity_sequences(sequences: np.ndarray, tokens: int) -> np.ndarray:
    """The first calibration sequences holding `tokens` tokens (at least one)."""
    return sequences[:max(1, -(-tokens // sequences.shape[1]))]
