"""How evenly calibration tokens reached the routed experts of each MoE layer.

An expert that saw no token has no statistics: quantize then uses the mean importance of the
layer's other experts (ImportanceMatrix.importance). An expert that saw few tokens (under
FEW_SHARE of the layer's mean) keeps its own, noisier statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nemoq.calib.imatrix_file import ImportanceMatrix

FEW_SHARE = 0.1
FALLBACK = "mean importance of the layer's other experts"
# histogram buckets: upper bounds as multiples of the layer's mean tokens per expert
BUCKETS = (("0", 0.0), ("<.1", FEW_SHARE), ("<.5", 0.5), ("<2", 2.0), (">=2", float("inf")))


@dataclass(frozen=True)
class LayerCoverage:
    tensor: str                         # the ffn_up_exps tensor the counts belong to
    tokens: np.ndarray                  # tokens routed to each expert
    buckets: tuple[tuple[str, int], ...]
    unseen: tuple[int, ...]             # expert ids with no token
    few: tuple[int, ...]                # expert ids with under FEW_SHARE of the mean

    @property
    def stats(self) -> tuple[int, float, int]:
        return int(self.tokens.min()), float(np.median(self.tokens)), int(self.tokens.max())

    @property
    def fallback(self) -> str:
        return FALLBACK if self.unseen else ""


def histogram(tokens: np.ndarray) -> tuple[tuple[str, int], ...]:
    """Experts per bucket of tokens relative to the layer's mean (the first bucket: none at all)."""
    share = tokens / tokens.mean() if tokens.any() else np.zeros(tokens.shape)
    counts, lower = [(BUCKETS[0][0], int((tokens == 0).sum()))], 0.0
    for label, upper in BUCKETS[1:]:
        counts.append((label, int(((tokens > 0) & (share >= lower) & (share < upper)).sum())))
        lower = upper
    return tuple(counts)


def expert_coverage(imatrix: ImportanceMatrix) -> list[LayerCoverage]:
    layers = []
    for name in sorted(imatrix.counts, key=_layer_order):
        if not name.endswith("ffn_up_exps.weight"):
            continue
        tokens = imatrix.counts[name].astype(np.int64)
        few_below = FEW_SHARE * tokens.mean()
        layers.append(LayerCoverage(name, tokens, histogram(tokens),
                                    tuple(np.flatnonzero(tokens == 0).tolist()),
                                    tuple(np.flatnonzero((tokens > 0) & (tokens < few_below)).tolist())))
    return layers


def _layer_order(name: str):
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" else -1, name)
