"""Per input column sums of x^2 and token counts for every quantized matrix, in float64.

Keyed by GGUF tensor name, as llama-imatrix keys them; a stacked expert tensor has one row per
expert and counts only the tokens routed to that expert.
"""

from __future__ import annotations

import numpy as np
import torch

from nemoq.calib.imatrix_file import ImportanceMatrix


class ActivationStats:
    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def record(self, name: str, x: torch.Tensor, expert: int | None) -> None:
        """Add the rows of `x` (..., columns) as inputs of `name` (of `expert`, if stacked)."""
        x = x.reshape(-1, x.shape[-1])
        # float64 where the device has it (MPS does not: one batch is summed in float32 there)
        wide = x.double() if x.device.type != "mps" else x
        sq = wide.square().sum(0).cpu().double().numpy()
        if name not in self.sums:
            n_mat = self.n_experts if expert is not None else 1
            self.sums[name] = np.zeros((n_mat, x.shape[-1]), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.float64)
        row = expert or 0
        self.sums[name][row] += sq
        self.counts[name][row] += x.shape[0]

    def to_imatrix(self, datasets: list[str], chunk_count: int, chunk_size: int) -> ImportanceMatrix:
        return ImportanceMatrix(dict(self.sums), dict(self.counts), datasets, chunk_count, chunk_size)
