"""One layer's weights at a time, read from the converter's plan (GGUF names, GGUF shapes).

Big matrices stay in their storage dtype (bf16 stays bf16); blocks widen them to float32 one
matmul (one expert) at a time. `LayerLoader.live` holds a weak reference to every Weights
object still alive, so a test can check that the forward pass never holds two layers.
"""

from __future__ import annotations

import re
import weakref
from collections import defaultdict

import numpy as np
import torch

from nemoq.convert.plan import Plan, PlannedTensor
from nemoq.errors import NemoqError

# chunk dtype (PlannedTensor.chunk_dtype) -> numpy storage, torch view of the same bytes
STORAGE = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
           "BF16": (np.uint16, torch.bfloat16)}
LAYER_PREFIX = re.compile(r"^blk\.(\d+)\.")


class Weights(dict):
    """Short GGUF name ("ssm_in.weight") -> tensor, plus the prefix that makes the full name."""

    def __init__(self, prefix: str, tensors: dict[str, torch.Tensor]):
        super().__init__(tensors)
        self.prefix = prefix

    __hash__ = object.__hash__   # identity, so a WeakSet can track live layers

    def name(self, short: str) -> str:
        return self.prefix + short


def read_tensor(t: PlannedTensor) -> torch.Tensor:
    """The whole tensor in its storage dtype, read straight into its final buffer."""
    if t.chunk_dtype not in STORAGE:
        raise NemoqError(f"{t.name}: calibration needs F32/F16/BF16 weights, not {t.chunk_dtype}",
                         t.sources[0].shard)
    np_dtype, torch_dtype = STORAGE[t.chunk_dtype]
    out = np.empty(t.shape, dtype=np_dtype)
    flat = out.reshape(-1).view(np.uint8)
    pos = 0
    for chunk in t.iter_chunks(lambda: flat[pos:]):
        n = chunk.nbytes
        if chunk.ctypes.data != flat[pos:].ctypes.data:   # a transformed tensor comes back as a new array
            flat[pos: pos + n] = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
        pos += n
    if pos != flat.nbytes:
        raise NemoqError(f"{t.name}: read {pos} bytes, expected {flat.nbytes}", t.sources[0].shard)
    return torch.from_numpy(out).view(torch_dtype)


class LayerLoader:
    def __init__(self, plan: Plan, device: torch.device):
        self.device = device
        self.by_layer: dict[int | None, list[PlannedTensor]] = defaultdict(list)
        for t in plan.tensors:
            self.by_layer[t.layer].append(t)
        self.live: weakref.WeakSet[Weights] = weakref.WeakSet()

    def _load(self, tensors: list[PlannedTensor], prefix: str) -> Weights:
        weights = Weights(prefix, {t.name[len(prefix):]: read_tensor(t).to(self.device) for t in tensors})
        self.live.add(weights)
        return weights

    def layer(self, index: int) -> Weights:
        return self._load(self.by_layer[index], f"blk.{index}.")

    def globals(self, *names: str) -> Weights:
        """Whole-model tensors by GGUF name (token_embd.weight, output_norm.weight, output.weight)."""
        return self._load([t for t in self.by_layer[None] if t.name in names], "")
