"""Checkpoint -> GGUF: plan from headers, then stream every tensor straight to disk.

Memory stays flat: each tensor is read in fixed-size row chunks into one reusable buffer,
encoded, and written before the next chunk is read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import gguf
import numpy as np

from nemoq.convert.config import load_config, pattern_of
from nemoq.convert.dtypes import FLOAT_ENCODINGS, Companion, Encoding, block_size, count_non_finite
from nemoq.convert.metadata import RECIPE_KEY, add_hparams, add_size_label
from nemoq.convert.modelopt_gguf import as_stored_chooser, resolve_kept
from nemoq.convert.modelopt_tensors import FP8, NVFP4, attach_companions
from nemoq.convert.output import FileRange, StreamingGGUFWriter, split_names
from nemoq.convert.plan import Plan, PlannedTensor, build_plan
from nemoq.convert.prefetch import Prefetcher
from nemoq.convert.safetensors_reader import open_checkpoint
from nemoq.convert.source import resolve_source
from nemoq.convert.tokenizer import load_vocab
from nemoq.errors import NemoqError
from nemoq.files import atomic_outputs, refuse_to_clobber

CHUNK_BYTES = 64 * 1024 * 1024
FileType = gguf.LlamaFileType

# --outtype for the float types: per-tensor encoding and general.file_type
FLOAT_FILE_TYPES = {"f32": FileType.ALL_F32, "f16": FileType.MOSTLY_F16, "bf16": FileType.MOSTLY_BF16}

Chooser = Callable[[PlannedTensor], Encoding]


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]
    ggml_type: str
    nbytes: int
    non_finite: int = 0
    note: str = ""                       # how a ModelOpt tensor was written
    rel_rms_error: float | None = None   # set when it had to be re-quantized


@dataclass
class ConvertResult:
    outputs: list[Path]
    tensors: list[TensorReport]
    layout: str
    skipped: list[str]
    seconds: float = 0.0
    bytes_read: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def bytes_written(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Source:
    """Anything nemoq writes GGUF from, opened and checked: the plan and the metadata to copy."""
    path: Path
    name: str                          # what the user named (folder or repo), for general.name
    architecture: str
    layer_kinds: tuple[str, ...]
    plan: Plan
    add_metadata: Callable[[gguf.GGUFWriter], None]   # hparams, tokenizer, chat template
    description: str


def open_checkpoint_source(src: str | Path, pre: str | None = None, mtp: bool = True) -> Source:
    """`mtp=False`: leave out the multi-token-prediction block (--no-mtp)."""
    path = resolve_source(src)
    config = load_config(path)
    tensors, quantization = attach_companions(open_checkpoint(path), path)   # ModelOpt: weight + scales as one
    plan = build_plan(config, tensors, path, mtp)
    vocab = load_vocab(path, config.vocab, pre)
    name = Path(str(src).rstrip("/")).name

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        add_hparams(writer, config, name, plan.mtp_layers)
        vocab.add_to(writer)
    return Source(path, name, config.architecture, config.layer_kinds, plan, add_metadata,
                  f"{config.n_layers} layers ({pattern_of(config.layer_kinds)}), layout {plan.layout}{quantization}")


def open_source(src: str | Path, pre: str | None = None) -> Source:
    """A checkpoint folder or hub id, or an existing F32/F16/BF16 GGUF file."""
    if str(src).endswith(".gguf") and Path(src).is_file():
        from nemoq.convert.gguf_source import open_gguf_source
        return open_gguf_source(Path(src))
    return open_checkpoint_source(src, pre)


def float_chooser(outtype: str, source_dtype: str) -> tuple[Chooser, FileType]:
    """Matrices in `outtype`, small and precision-critical tensors in F32."""
    if outtype == "auto" and source_dtype == NVFP4:   # ModelOpt NVFP4: every tensor as stored
        return as_stored_chooser(), FileType.MOSTLY_NVFP4
    if outtype == "auto":  # as llama.cpp: keep bf16 sources bf16 (and FP8 ones), everything else f16
        outtype = "bf16" if source_dtype in ("BF16", FP8) else "f16"
    matrix = FLOAT_ENCODINGS[outtype]
    f32 = FLOAT_ENCODINGS["f32"]

    def choose(t: PlannedTensor) -> Encoding:
        return f32 if t.keep_f32 or len(t.shape) < 2 else matrix
    return choose, FLOAT_FILE_TYPES[outtype]


def dominant_dtype(plan: Plan) -> str:
    sizes: dict[str, int] = {}
    for t in plan.tensors:
        sizes[t.source_dtype] = sizes.get(t.source_dtype, 0) + t.n_elements
    return max(sizes, key=sizes.get)


@dataclass(frozen=True)
class Piece:
    """One chunk on its way to the file: the bytes (or a file range to copy), the source bytes it
    stands for and the NaN/Inf values seen in them."""
    data: np.ndarray | FileRange
    source_bytes: int = 0
    non_finite: int = 0


def copied_pieces(t: PlannedTensor) -> Iterator[Piece]:
    """Stored as the source holds it: scanned through a memory map, then copied file to file by
    the kernel."""
    for ref in t.sources:
        with open(ref.shard, "rb") as f:
            for offset, rows in ref.iter_mapped(CHUNK_BYTES):
                non_finite, nbytes = count_non_finite(rows, ref.dtype), rows.nbytes
                del rows                 # the map is released before the copy
                yield Piece(FileRange(f.fileno(), offset, nbytes), nbytes, non_finite)


def encoded_pieces(t: PlannedTensor, enc: Encoding, rows_in: Iterable[np.ndarray]) -> Iterator[Piece]:
    source_bytes = SourceBytes(t)
    for rows in rows_in:
        non_finite, nbytes = count_non_finite(rows, t.chunk_dtype), source_bytes.of(rows)
        yield Piece(enc.encode(rows, t.chunk_dtype), nbytes, non_finite)


def made_pieces(enc: Encoding) -> Iterator[Piece]:
    return (Piece(chunk) for chunk in enc.chunks())


class Tally:
    """What one tensor's pieces counted as the writer took them."""

    def __init__(self, on_progress: Callable[[int], None] | None):
        self.on_progress = on_progress
        self.non_finite = self.source_bytes = 0

    def data(self, pieces: Iterable[Piece]) -> Iterator[np.ndarray | FileRange]:
        for piece in pieces:
            self.non_finite += piece.non_finite
            self.source_bytes += piece.source_bytes
            yield piece.data
            if self.on_progress is not None and piece.source_bytes:
                self.on_progress(piece.source_bytes)   # once written


@dataclass(frozen=True)
class TensorJob:
    """One tensor to write: its encoding, how its bytes are had, and its companions."""
    tensor: PlannedTensor
    encoding: Encoding
    companions: tuple[Companion, ...]
    reads_source: bool     # False: the encoding makes the bytes itself (Encoding.makes_bytes)
    copies: bool           # the stored bytes are the source bytes

    @property
    def nbytes(self) -> int:
        return self.encoding.nbytes(self.tensor.shape) + sum(c.nbytes for c in self.companions)

    def pieces(self, prefetch: Prefetcher) -> Iterator[Piece]:
        if not self.reads_source:
            return made_pieces(self.encoding)
        if self.copies:
            return copied_pieces(self.tensor)
        return encoded_pieces(self.tensor, self.encoding, prefetch.chunks())


def plan_jobs(plan: Plan, choose: Chooser) -> list[TensorJob]:
    # ModelOpt NVFP4 kept as stored is then read as ggml bytes (and may bring `.scale` companions)
    tensors, encodings = resolve_kept(plan.tensors, [choose(t) for t in plan.tensors])
    jobs = []
    for t, enc in zip(tensors, encodings):
        if t.row_width % block_size(enc.ggml_type):
            raise NemoqError(f"{t.name}: row width {t.row_width} does not fit {enc.ggml_type.name} blocks")
        jobs.append(TensorJob(t, enc, tuple(enc.companions(t)), not enc.makes_bytes, is_byte_copy(t, enc)))
    return jobs


def write_header(writer: StreamingGGUFWriter, source: Source, jobs: list[TensorJob], file_type: int,
                 recipe: str) -> None:
    source.add_metadata(writer)
    writer.add_file_type(int(file_type))
    if recipe:
        writer.add_string(RECIPE_KEY, recipe)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for job in jobs:
        t, enc = job.tensor, job.encoding
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), enc.nbytes(t.shape), raw_dtype=enc.ggml_type)
        for c in job.companions:
            writer.add_tensor_info(c.name, c.shape, np.dtype(np.float32), c.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
    add_size_label(writer)


def write_gguf(source: Source, out: Path, choose: Chooser, file_type: int, *, force: bool = False,
               split_max_size: int = 0, strict: bool = False, recipe: str = "",
               on_progress: Callable[[int], None] | None = None) -> ConvertResult:
    """Stream `source` into `out` (or its splits), each tensor encoded as `choose` says; `recipe`
    names the recipe that typed them (metadata.RECIPE_KEY)."""
    jobs = plan_jobs(source.plan, choose)
    out = Path(out).absolute()
    result = ConvertResult([], [], source.plan.layout, source.plan.skipped, warnings=list(source.plan.notes))
    start = time.perf_counter()
    read = [job.tensor for job in jobs if job.reads_source and not job.copies]
    with atomic_outputs(out, force, needed=sum(job.nbytes for job in jobs)) as tmp, \
            Prefetcher(read, CHUNK_BYTES) as prefetch, \
            StreamingGGUFWriter(tmp, source.architecture, split_max_size=split_max_size) as writer:
        write_header(writer, source, jobs, file_type, recipe)
        final_paths = split_names(out, len(writer.tensors))
        refuse_to_clobber(final_paths, force)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for job in jobs:
            t, enc = job.tensor, job.encoding
            tally = Tally(on_progress)
            writer.write_tensor_chunks(tally.data(job.pieces(prefetch)))
            result.bytes_read += tally.source_bytes
            if tally.non_finite:
                message = f"{t.name}: {tally.non_finite} NaN/Inf value(s) in {t.sources[0].name}"
                if strict:
                    raise NemoqError(f"{message} (--strict)", t.sources[0].shard)
                result.warnings.append(message)
            if enc.warns:
                result.warnings.append(f"{t.name}: {enc.note}")
            result.tensors.append(TensorReport(t.name, t.shape, enc.ggml_type.name, enc.nbytes(t.shape),
                                               tally.non_finite, enc.note, enc.rel_rms_error))
            for c in job.companions:
                writer.write_tensor_chunks([np.asarray(c.values(), dtype=np.float32).reshape(c.shape)])
                result.tensors.append(TensorReport(c.name, c.shape, "F32", c.nbytes))
        writer.close()
    result.outputs = final_paths
    result.seconds = time.perf_counter() - start
    return result


def is_byte_copy(t: PlannedTensor, enc: Encoding) -> bool:
    """Stored exactly as the source holds it (bf16 -> BF16 ...): no decoding needed."""
    return t.transform.values is None and enc.copies(t.source_dtype)


def plan_bytes(plan: Plan) -> int:
    """Source bytes the conversion will read (for progress bars)."""
    return sum(s.nbytes for t in plan.tensors for s in t.sources)


class SourceBytes:
    """The source bytes a chunk of a tensor's rows stands for, so that progress counts what
    plan_bytes counts whatever the chunk holds (dequantized NVFP4 rows are float32, ~7x the
    packed bytes read). Over a whole tensor the chunks add up to its source bytes exactly."""

    def __init__(self, t: PlannedTensor):
        self.total, self.rows = sum(s.nbytes for s in t.sources), t.n_elements // t.row_width
        self.done_rows = self.done_bytes = 0

    def of(self, chunk: np.ndarray) -> int:
        """`chunk`: whole GGUF rows, one per row of its first axis."""
        self.done_rows += chunk.shape[0]
        nbytes = self.total * self.done_rows // self.rows - self.done_bytes
        self.done_bytes += nbytes
        return nbytes
