"""`nemoq quantize --calibrate`: a recipe's file whose matrices are rounded with error
compensation, from one layer-streamed pass over calibration text.

The converter's writer (write_gguf) writes the file in plan order; each calibrated tensor's
encoding asks the walk (walk.py) for its bytes, so layer N is walked when blk.N's first
calibrated tensor is due, and at most one layer's bytes wait in memory; token_embd, first in
the file, is rounded before the walk starts (embedding.py). Tensors the recipe keeps in
F32/F16/BF16 and ModelOpt NVFP4 blocks kept as stored are written as `nemoq quantize` writes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import gguf
import numpy as np

from nemoq.calib.calibrate import DEFAULT_CTX, DEFAULT_TOKENS, calibration_sequences, pick_device
from nemoq.calib.forward import Progress
from nemoq.calib.hparams import config_of
from nemoq.calib.imatrix_file import write_imatrix
from nemoq.calib.walk import FEED, LayerWalk, MatrixReport, Target
from nemoq.convert.dtypes import Companion, Encoding, EncodingBase, type_nbytes
from nemoq.convert.pipeline import ConvertResult, open_source, plan_bytes, write_gguf
from nemoq.files import atomic_outputs, claim_outputs
from nemoq.quant.formats import FORMATS
from nemoq.quant.recipes import Recipe, TypedTensor, file_type_of, plan_types, recipe_label
from nemoq.quant.choose import chooser
from nemoq.quant.tensor_scale import scale_name, takes_scale

# token_embd is a row lookup with no inputs of its own: the walk rounds it through layer 0's
# input matrices (embedding.py), unless it is the output head too (tied embeddings, no
# output.weight), whose error reaches the logits directly: then it is rounded as plain quantize does.
EMBEDDINGS_THROUGH_LAYER_0 = True


@dataclass
class CalibratedResult:
    conversion: ConvertResult
    typed: list[TypedTensor]
    layer_kinds: tuple[str, ...]
    matrices: list[MatrixReport]       # per calibrated tensor, in file order
    imatrix_output: Path | None
    sequences: int
    ctx: int
    device: str
    feeds: str                         # walk.FEEDS
    seconds: float

    @property
    def tokens(self) -> int:
        return self.sequences * self.ctx


class CalibratedEncoding(EncodingBase):
    """A tensor whose bytes the walk makes: the writer asks for them in file order."""
    makes_bytes = True

    def __init__(self, walk: LayerWalk, name: str, type_name: str, scaled: bool, n_matrices: int):
        self.walk, self.name, self.scaled, self.n_matrices = walk, name, scaled, n_matrices
        self.ggml_type = FORMATS[type_name].ggml_type
        self._scales: np.ndarray | None = None

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(self.ggml_type, shape)

    def chunks(self) -> Iterator[np.ndarray]:
        q = self.walk.result(self.name)
        self._scales = q.scales
        yield q.blocks.reshape(-1, q.blocks.shape[-1])

    def companions(self, tensor) -> tuple[Companion, ...]:
        if not self.scaled:
            return ()
        return (Companion(scale_name(self.name), (self.n_matrices,), lambda: self._scales),)


def stored_values(encoding: Encoding) -> Callable[[np.ndarray], np.ndarray]:
    """float32 rows -> the values the file will hold for them in `encoding` (for the embeddings
    the quantized model's first layer sees)."""
    def values(rows: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(encoding.encode(rows, "F32")).view(np.uint8).reshape(rows.shape[0], -1)
        return gguf.quants.dequantize(data, encoding.ggml_type).reshape(rows.shape).astype(np.float32)
    return values


def is_calibrated(t: TypedTensor, encoding: Encoding, tied: bool) -> bool:
    """A block format the walk rounds (not a ModelOpt NVFP4 tensor kept as NVIDIA stored it)."""
    from nemoq.convert.modelopt_gguf import KeepStored
    if t.spec.name == "token_embd.weight" and (tied or not EMBEDDINGS_THROUGH_LAYER_0):
        return False
    return t.type in FORMATS and not isinstance(encoding, KeepStored)


def quantize_calibrated(src: str | Path, out: Path, recipe: Recipe, *, overrides: Iterable[tuple[str, str]] = (),
                        tensor_scales: bool = True, data: Path | None = None, tokens: int = DEFAULT_TOKENS,
                        ctx: int = DEFAULT_CTX, device: str = "auto", imatrix_out: Path | None = None,
                        force: bool = False, split_max_size: int = 0, feeds: str = FEED,
                        on_start: Callable[[int, int], None] | None = None,
                        on_progress: Callable[[Progress], None] | None = None) -> CalibratedResult:
    """Quantize `src` with `recipe` into `out`, every quantized matrix error-compensated through
    the H of its inputs on the calibration tokens; `imatrix_out` also gets the diagonal of each
    H (llama.cpp's imatrix) for tools that take one."""
    overrides = list(overrides)
    outputs = [Path(out)] + ([Path(imatrix_out)] if imatrix_out is not None else [])
    with claim_outputs(outputs, force):    # before the long walk, not after it
        torch_device = pick_device(device)
        source = open_source(src)
        cfg = config_of(source)
        typed = plan_types([t.spec for t in source.plan.tensors], recipe, source.layer_kinds, overrides,
                           tensor_scales)
        sequences, datasets = calibration_sequences(source, data, ctx, tokens)
        plain = chooser(typed)
        encodings = {t.name: plain(t) for t in source.plan.tensors}
        tied = not any(t.name == "output.weight" for t in source.plan.tensors)
        targets = {t.spec.name: Target(t.type, t.scaled and takes_scale(t.spec, t.type))
                   for t in typed if is_calibrated(t, encodings[t.spec.name], tied)}
        embeddings = next(t for t in source.plan.tensors if t.name == "token_embd.weight")
        walk = LayerWalk(source.plan, cfg, sequences, targets, device=torch_device, feeds=feeds,
                         stored_embeddings=stored_values(plain(embeddings)), on_progress=on_progress)
        if on_start is not None:
            on_start(sequences.shape[0], walk.steps)

        def choose(t):
            if t.name not in targets:
                return encodings[t.name]
            return CalibratedEncoding(walk, t.name, targets[t.name].type, targets[t.name].scaled, t.spec.n_matrices)

        start = time.perf_counter()
        try:
            result = write_gguf(source, out, choose, file_type_of(recipe, typed, source.layer_kinds), force=force,
                                split_max_size=split_max_size, recipe=recipe_label(recipe, overrides) + " --calibrate")
            result.bytes_read += plan_bytes(source.plan)   # the walk reads every weight once more
            if imatrix_out is not None:
                walk.finish()
                with atomic_outputs(imatrix_out, force) as tmp:
                    write_imatrix(tmp, walk.imatrix(datasets))
        finally:
            walk.close()
    return CalibratedResult(result, typed, source.layer_kinds, walk.reports, imatrix_out, sequences.shape[0], ctx, str(torch_device),
                            feeds, time.perf_counter() - start)
