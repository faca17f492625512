"""The layer-streamed forward pass: one layer's weights in memory, every sequence through it.

Hidden states of all calibration sequences stay between layers (float32, in RAM, or in a numpy
memmap in a temporary folder once they pass SPILL_BYTES); sequences go through a layer in
batches of about BATCH_TOKENS tokens. Peak memory is one layer's weights, the hidden states
(or the page cache's share of them) and one batch's activations.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nemoq.calib import blocks
from nemoq.calib.weights import LayerLoader
from nemoq.convert.config import ModelConfig
from nemoq.convert.plan import Plan

SPILL_BYTES = 1 << 30
BATCH_TOKENS = 4096


@dataclass
class Progress:
    layers_done: int
    layers: int          # model layers + the final norm
    tokens: int          # tokens through the model per layer
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Whole-model throughput so far: tokens x layers done / time / layers."""
        return self.tokens * self.layers_done / self.layers / max(self.seconds, 1e-9)


class HiddenStates:
    """(sequences, ctx, hidden) float32, in RAM or memory-mapped from a temporary file."""

    def __init__(self, shape: tuple[int, int, int], spill_bytes: int = SPILL_BYTES):
        nbytes = int(np.prod(shape)) * 4
        self._tmp = None
        if nbytes > spill_bytes:
            self._tmp = tempfile.TemporaryDirectory(prefix="nemoq-calib-")
            self.data = np.lib.format.open_memmap(Path(self._tmp.name) / "hidden.npy", "w+", np.float32, shape)
        else:
            self.data = np.empty(shape, dtype=np.float32)

    @property
    def spilled(self) -> bool:
        return self._tmp is not None

    def close(self) -> None:
        self.data = None
        if self._tmp is not None:
            self._tmp.cleanup()


def batches(n_sequences: int, ctx: int, batch_tokens: int = BATCH_TOKENS):
    step = max(1, batch_tokens // ctx)
    return [slice(i, min(i + step, n_sequences)) for i in range(0, n_sequences, step)]


def streamed_forward(plan: Plan, cfg: ModelConfig, sequences: np.ndarray, record: blocks.Record, *,
                     device: torch.device, loader: LayerLoader | None = None,
                     on_progress: Callable[[Progress], None] | None = None,
                     spill_bytes: int = SPILL_BYTES) -> HiddenStates:
    """Run `sequences` (n, ctx) of token ids through the model, layer by layer.

    Returns the final normed hidden states (output_norm applied), which are also recorded as the
    input of output.weight. The caller closes the result.
    """
    loader = loader or LayerLoader(plan, device)
    n, ctx = sequences.shape
    hidden = HiddenStates((n, ctx, cfg.hidden), spill_bytes)
    parts = batches(n, ctx)
    start = time.perf_counter()

    def report(done: int) -> None:
        if on_progress is not None:
            on_progress(Progress(done, cfg.n_layers + 1, n * ctx, time.perf_counter() - start))

    embd = loader.globals("token_embd.weight")["token_embd.weight"]
    for part in parts:
        ids = torch.from_numpy(sequences[part].astype(np.int64)).to(embd.device)
        hidden.data[part] = embd[ids].float().cpu().numpy()
    del embd

    with torch.no_grad():
        for index, kind in enumerate(cfg.layer_kinds):
            weights = loader.layer(index)
            for part in parts:
                x = torch.from_numpy(np.asarray(hidden.data[part])).to(device)
                hidden.data[part] = blocks.layer(x, kind, weights, cfg, record).cpu().numpy()
            del weights
            report(index + 1)
        norm = loader.globals("output_norm.weight")["output_norm.weight"]
        for part in parts:
            x = blocks.rms_norm(torch.from_numpy(np.asarray(hidden.data[part])).to(device), norm, cfg.norm_eps)
            record("output.weight", x, None)
            hidden.data[part] = x.cpu().numpy()
        report(cfg.n_layers + 1)
    return hidden


def logits(plan: Plan, normed: np.ndarray, device: torch.device) -> np.ndarray:
    """output.weight applied to final normed hidden states (..., hidden): float32 logits."""
    head = LayerLoader(plan, device).globals("output.weight")["output.weight"]
    with torch.no_grad():
        return blocks.linear(torch.from_numpy(np.asarray(normed)).to(device), head).cpu().numpy()
