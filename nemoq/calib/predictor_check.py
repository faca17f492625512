"""Does a profile predict llama.cpp's KLD? Random whole-model type mixes, predicted vs measured.

Each mix (profile.random_mixes) is written from the source (every profiled tensor in its drawn
type) and scored by llama.cpp against the base file on held-out text, each chunk from a fresh
state; the predictor is judged by the rank correlation of predicted and measured KLD over the
mixes and by the median of |predicted - measured| / measured. Issue 14's bar: Spearman >= 0.9 and
a median relative error <= 25% over 10 mixes and >= 8192 held-out tokens (tests/test_profile.py
holds the bundled model to it; bench/target_size.py reports it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from nemoq.calib.profile import Profile, random_mixes
from nemoq.calib.sensitivity import FIRST, Scorer, text_sequences, write_with_types
from nemoq.convert.pipeline import Source


def ranks(x) -> np.ndarray:
    """0-based ranks, ties sharing their mean rank (a constant has no order to agree with)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):
        tied = x == v
        r[tied] = r[tied].mean()
    return r


def spearman(a, b) -> float:
    """Rank correlation; NaN when either side is constant."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class PredictorCheck:
    predicted: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    @property
    def spearman(self) -> float:
        return spearman(self.predicted, self.measured)

    @property
    def relative_errors(self) -> np.ndarray:
        m = np.asarray(self.measured)
        return np.abs(np.asarray(self.predicted) - m) / m

    @property
    def median_error(self) -> float:
        return float(np.median(self.relative_errors))


def held_out_scorer(base: Path, text: str, *, ctx: int = 512, first: int = FIRST,
                    scored: int | None = None) -> Scorer:
    """A Scorer of `text` against `base`: chunks of ctx tokens, BOS first, positions first...ctx-2
    scored; the fewest chunks that score at least `scored` tokens (None: every whole chunk)."""
    from nemoq.eval.model import LlamaModel
    with LlamaModel(base, ctx) as m:
        tokens = len(m.tokenize(text)) if scored is None else -(-scored // (ctx - 1 - first)) * ctx
        sequences = text_sequences(m, text, ctx, tokens)
    return Scorer(base, sequences, first)


def check_predictor(profile: Profile, source: Source, scorer: Scorer, workdir: Path, *, mixes: int = 10,
                    seed: int = 0, on_mix: Callable[[int, PredictorCheck], None] | None = None) -> PredictorCheck:
    """`mixes` random mixes of the profile's tensors (`seed`), each written to workdir and scored."""
    check = PredictorCheck()
    path = Path(workdir) / "mix.gguf"
    for i, mix in enumerate(random_mixes(profile.tensors, mixes, seed)):
        write_with_types(source, path, mix)
        check.predicted.append(profile.predicted(mix))
        check.measured.append(scorer.kld(path))
        check.sizes.append(os.path.getsize(path))
        if on_mix is not None:
            on_mix(i, check)
    return check
