"""`nemoq convert --outtype auto` on a ModelOpt NVFP4 checkpoint: every tensor as the checkpoint
stores it, the NVFP4 ones in GGUF's NVFP4 without re-quantizing where that is exact.

ggml's NVFP4 block has no per-tensor scale, so ModelOpt's `weight_scale_2` goes somewhere else.
For each NVFP4 tensor, the first of these that applies:

1. fold: every block scale times weight_scale_2 is exactly a UE4M3 value (a power-of-two
   scale_2 whose products neither overflow nor underflow): the scales are replaced, nothing else
   is written, and every dequantized value is ModelOpt's bit for bit.
2. `.scale`: llama.cpp loads `<name>.scale` for this tensor and multiplies the matmul result by it
   (llama.cpp of llama-cpp-python 0.3.36 does for ssm_in/out, attention and expert tensors, a
   per-expert vector for expert stacks; not for output/token_embd - tests/test_modelopt_llama.py
   checks both): scales kept as stored, weight_scale_2 written as `<name>.scale` and `input_scale`
   as `<name>.input_scale` when not 1, as llama.cpp's converter does (loaded, unused on CPU).
3. re-quantize: the ModelOpt values, dequantized to float32, go through nemoq's NVFP4 quantizer;
   the RMS and max error are reported for the tensor.

A row width that is not a multiple of 64 (GGUF's NVFP4 block) cannot be NVFP4 at all: the
tensor is dequantized and written as BF16, and the summary says so.

`nemoq quantize` with any recipe does the same for the tensors the recipe wants as NVFP4
(`keep_stored_nvfp4`), except that the recipe's own quantizer replaces step 3, and that with
--no-tensor-scales only step 1 keeps the stored blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from gguf import MODEL_TENSOR as MT
from gguf import GGMLQuantizationType

from nemoq.convert import modelopt_codec as codec
from nemoq.convert.dtypes import FLOAT_ENCODINGS, Companion, Encoding, EncodingBase, type_nbytes
from nemoq.convert.mapping import SCALE_LOADED
from nemoq.convert.modelopt_tensors import FP8, NVFP4
from nemoq.convert.plan import PlannedTensor

T = GGMLQuantizationType

STORED_FLOAT = {"F32": "f32", "F64": "f32", "F16": "f16", "BF16": "bf16"}


@dataclass(frozen=True)
class KeptNVFP4(EncodingBase):
    """The rows arrive as ggml NVFP4 bytes (RepackedTensor): written as they are, followed by
    their `.scale` / `.input_scale` companions if any."""
    note: str = "NVFP4 as stored"
    scales: tuple[Companion, ...] = ()
    ggml_type = T.NVFP4

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(T.NVFP4, shape)

    def companions(self, tensor: PlannedTensor) -> tuple[Companion, ...]:
        return self.scales

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        return rows


@dataclass(frozen=True)
class KeepStored(EncodingBase):
    """A chooser's answer for a ModelOpt NVFP4 tensor that is to stay NVFP4: resolve_kept decides
    how (fold, or `.scale` where allowed), tensor by tensor, or hands the tensor to `fallback`."""
    fallback: Encoding | None = None   # None: RequantizedNVFP4 (nemoq convert, error reported)
    scale_tensors: bool = True         # weight_scale_2 may go to a `<name>.scale` tensor
    ggml_type = T.NVFP4

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(T.NVFP4, shape)


KEEP_NVFP4 = KeepStored()   # nemoq convert --outtype auto


def keep_stored_nvfp4(t: PlannedTensor, wanted: Encoding, scale_tensors: bool = True) -> Encoding:
    """For recipes (nemoq quantize): a tensor the recipe wants as NVFP4 that the checkpoint stores
    as ModelOpt NVFP4 keeps NVIDIA's blocks, with `wanted` (quantizing the dequantized values)
    only where they cannot be kept exactly; every other tensor gets `wanted`."""
    if t.source_dtype == NVFP4 and wanted.ggml_type == T.NVFP4:
        return KeepStored(wanted, scale_tensors)
    return wanted


@dataclass(frozen=True)
class Noted(EncodingBase):
    """A float encoding with a note for the summary (a ModelOpt tensor that could not stay NVFP4)."""
    base: Encoding
    note: str
    warns: bool = True
    ggml_type = property(lambda self: self.base.ggml_type)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return self.base.nbytes(shape)

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        return self.base.encode(rows, source_dtype)


class RequantizedNVFP4(EncodingBase):
    """nemoq's NVFP4 quantizer on the dequantized ModelOpt values, measuring what it loses."""
    ggml_type = T.NVFP4
    warns = True

    def __init__(self, reason: str):
        self.reason = reason
        self.err2 = self.ref2 = self.max_abs_error = 0.0

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return type_nbytes(T.NVFP4, shape)

    def encode(self, rows: np.ndarray, source_dtype: str) -> np.ndarray:
        # The converter's one use of quant/: imported here, so plain conversions never load it.
        from nemoq.quant.encodings import BLOCK_ENCODINGS
        from nemoq.quant.formats import FORMATS
        x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, rows.shape[-1])
        q = BLOCK_ENCODINGS["nvfp4"].quantize(x)
        err = FORMATS["nvfp4"].dequantize(q) - x
        self.err2 += float(np.square(err, dtype=np.float64).sum())
        self.ref2 += float(np.square(x, dtype=np.float64).sum())
        self.max_abs_error = max(self.max_abs_error, float(np.abs(err).max(initial=0.0)))
        return q.reshape(*rows.shape[:-1], -1)

    @property
    def rel_rms_error(self) -> float:
        return (self.err2 / self.ref2) ** 0.5 if self.ref2 else 0.0

    @property
    def note(self) -> str:
        return (f"re-quantized to NVFP4 ({self.reason}): RMS error {self.rel_rms_error:.3%} of the "
                f"weights' RMS, max |error| {self.max_abs_error:.3g}")


@dataclass(frozen=True)
class RepackedTensor(PlannedTensor):
    """A ModelOpt NVFP4 tensor read as ggml NVFP4 rows (one fold table or None per source)."""
    folds: tuple = ()
    chunk_dtype = property(lambda self: "NVFP4")

    def iter_chunks(self, take_buffer: Callable[[], np.ndarray]) -> Iterator[np.ndarray]:
        for source, fold in zip(self.sources, self.folds):
            yield from source.iter_repacked(fold)


def as_stored_chooser() -> Callable[[PlannedTensor], Encoding]:
    """Every tensor as the checkpoint stores it: NVFP4 kept, floats in their own type (norms,
    SSM parameters and the router F32, as always); FP8 tensors of a mixed checkpoint as BF16."""
    f32 = FLOAT_ENCODINGS["f32"]

    def choose(t: PlannedTensor) -> Encoding:
        if t.source_dtype == NVFP4:
            return KEEP_NVFP4
        if t.keep_f32 or len(t.shape) < 2:
            return f32
        return FLOAT_ENCODINGS["bf16" if t.source_dtype == FP8 else STORED_FLOAT[t.source_dtype]]
    return choose


def _vector(name: str, values: list[float]) -> Companion:
    array = np.array(values, dtype=np.float32)
    return Companion(name, array.shape, lambda: array)


def _kept(t: PlannedTensor, keep: KeepStored) -> tuple[PlannedTensor, Encoding]:
    if t.row_width % codec.GGML_BLOCK:
        return t, Noted(FLOAT_ENCODINGS["bf16"], f"row width {t.row_width} is not a multiple of "
                        f"{codec.GGML_BLOCK} (GGUF's NVFP4 block): dequantized to BF16")
    scale_2 = [s.scale_2 for s in t.sources]
    folds = []
    for source, s2 in zip(t.sources, scale_2):
        codes = source.scale_codes()
        codec.check_scales(codes, source.weight_scale.name, source.shard)
        folds.append(codec.fold_scale_2(codes, s2))
    if all(f is not None for f in folds):
        note = "NVFP4 as stored, weight_scale_2 folded exactly into the block scales"
        return RepackedTensor(t.spec, t.sources, tuple(folds)), KeptNVFP4(note)
    base = t.name.removesuffix(".weight")
    if keep.scale_tensors and t.spec.row.tensor in SCALE_LOADED:
        scales = [_vector(f"{base}.scale", scale_2)]
        inputs = [s.input_scale_value for s in t.sources]
        if any(v != 1.0 for v in inputs):
            scales.append(_vector(f"{base}.input_scale", inputs))
        kept = KeptNVFP4(f"NVFP4 as stored, weight_scale_2 in {base}.scale", tuple(scales))
        return RepackedTensor(t.spec, t.sources, (None,) * len(t.sources)), kept
    if keep.fallback is not None:
        return t, keep.fallback
    return t, RequantizedNVFP4(f"weight_scale_2 does not fold exactly into UE4M3 scales and "
                               f"llama.cpp does not load {base}.scale")


def resolve_kept(tensors: Sequence[PlannedTensor], encodings: Sequence[Encoding]
                 ) -> tuple[list[PlannedTensor], list[Encoding]]:
    """Resolve KeepStored tensor by tensor (reads the block scales, 1/8 of the NVFP4 bytes); a
    kept tensor is then read as ggml NVFP4 bytes. Every other tensor passes through."""
    pairs = [_kept(t, enc) if isinstance(enc, KeepStored) else (t, enc) for t, enc in zip(tensors, encodings)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def kept_as_stored(reports) -> list[str]:
    """The written tensors (ConvertResult.tensors) that hold the checkpoint's NVFP4 blocks."""
    return [r.name for r in reports if r.note.startswith(KeptNVFP4.note)]
