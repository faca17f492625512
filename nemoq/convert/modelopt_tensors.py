"""A ModelOpt-quantized weight and its companion tensors, seen by the plan as one source tensor.

ModelOpt stores each quantized linear as `<m>.weight` plus `<m>.weight_scale`,
`<m>.weight_scale_2` (NVFP4) and `<m>.input_scale`. `attach_companions` replaces each such
group by one `QuantizedRef` with the weight's logical (out, in) shape, so the mapping tables,
expert stacking and shape checks work unchanged. Read like any source, it yields the
dequantized float32 rows; `iter_repacked` yields ggml NVFP4 bytes instead (nemoq convert's
default for NVFP4 checkpoints, see modelopt_gguf.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nemoq.convert import mapping
from nemoq.convert import modelopt_codec as codec
from nemoq.convert.dtypes import to_float32
from nemoq.convert.modelopt_config import QuantConfig, read_quant_config
from nemoq.convert.safetensors_reader import TensorRef
from nemoq.errors import NemoqError

# The dtype a QuantizedRef reports (what it stores); read, it yields float32.
NVFP4 = "MODELOPT_NVFP4"
FP8 = "MODELOPT_FP8"
DTYPE_OF_ALGO = {"NVFP4": NVFP4, "FP8": FP8}
DEQUANTIZED_ON_READ = (NVFP4, FP8)
COMPANIONS = (".weight_scale", ".weight_scale_2", ".input_scale")
KV_CACHE_SCALES = (".k_scale", ".v_scale")   # FP8 KV-cache calibration: llama.cpp has no use for them
CHUNK_VALUES = 1 << 24                        # dequantized rows per chunk: 64 MiB of float32
# transformers-5 fused expert stack -> the hub's per-expert name ("mixer.experts.up_proj" ->
# "mixer.experts.{xid}.up_proj.weight"), from the mapping tables (same order in both)
FUSED_TO_PER_EXPERT = {f.source: p.source for f, p in zip(mapping.FUSED_EXPERT_ROWS, mapping.PER_EXPERT_ROWS)}
# A fused weight `<w>` has no `.weight` suffix; ModelOpt names its companions `<w>_weight_scale`
# (its fused-experts export), and `<w>.weight_scale` is read too.
FUSED_COMPANION_JOINS = ("_", ".")


def _read(ref: TensorRef, start: int = 0, count: int | None = None) -> np.ndarray:
    """Rows [start, start + count) of a tensor in its storage dtype (a scalar tensor: all of it)."""
    n_rows = ref.shape[0] if ref.shape else 1
    count = n_rows - start if count is None else count
    row_bytes = ref.nbytes // max(n_rows, 1)
    out = np.empty((count, *ref.shape[1:]) if ref.shape else (), dtype=ref.storage_dtype)
    with open(ref.shard, "rb", buffering=0) as f:
        f.seek(ref.offset + start * row_bytes)
        if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise NemoqError(f"truncated while reading tensor {ref.name}", ref.shard)
    return out


def _scalar(ref: TensorRef | None) -> float:
    return 1.0 if ref is None else float(to_float32(_read(ref), ref.dtype).reshape(-1)[0])


@dataclass(frozen=True)
class QuantizedRef:
    """One ModelOpt-quantized weight: duck-typed like TensorRef (name, shard, dtype, shape, nbytes)."""
    name: str
    dtype: str                      # NVFP4 or FP8 (module constants)
    shape: tuple[int, int]          # logical (out, in)
    weight: TensorRef
    weight_scale: TensorRef
    weight_scale_2: TensorRef | None
    input_scale: TensorRef | None

    shard = property(lambda self: self.weight.shard)
    n_elements = property(lambda self: math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.weight_scale.nbytes

    @property
    def scale_2(self) -> float:
        return _scalar(self.weight_scale_2)

    @property
    def input_scale_value(self) -> float:
        return _scalar(self.input_scale)

    def scale_codes(self) -> np.ndarray:
        return _read(self.weight_scale)

    def _row_ranges(self) -> Iterator[tuple[int, int]]:
        step = max(1, CHUNK_VALUES // self.shape[1])
        for start in range(0, self.shape[0], step):
            yield start, min(step, self.shape[0] - start)

    def dequantize_rows(self, start: int, count: int) -> np.ndarray:
        codes = _read(self.weight, start, count)
        if self.dtype == NVFP4:
            return codec.dequantize_nvfp4(codes, _read(self.weight_scale, start, count), self.scale_2)
        scale = to_float32(_read(self.weight_scale), self.weight_scale.dtype)
        if scale.size > 1:
            scale = scale.reshape(-1)[start:start + count]
        return codec.dequantize_fp8(codes, scale)

    def read(self) -> np.ndarray:
        return self.dequantize_rows(0, self.shape[0])

    def iter_rows(self, take_buffer: Callable[[], np.ndarray]) -> Iterator[np.ndarray]:
        """Dequantized float32 rows. Fresh arrays, not take_buffer's: the values outgrow the bytes read."""
        for start, count in self._row_ranges():
            yield self.dequantize_rows(start, count)

    def iter_repacked(self, fold: np.ndarray | None) -> Iterator[np.ndarray]:
        """ggml NVFP4 rows, the block scales mapped through `fold` (weight_scale_2 folded in) if given."""
        for start, count in self._row_ranges():
            codes = _read(self.weight_scale, start, count)
            codec.check_scales(codes, self.weight_scale.name, self.shard)
            yield codec.repack_nvfp4(_read(self.weight, start, count), codes if fold is None else fold[codes])


# What each algorithm's companions must look like: (dtype, shape from the logical (out, in)).
def _expected(algo: str, out: int, width: int, group: int) -> dict[str, tuple[set[str], set[tuple]]]:
    scalar = {(), (1,)}
    if algo == "NVFP4":
        return {".weight": ({"U8"}, {(out, width // 2)}), ".weight_scale": ({"F8_E4M3"}, {(out, width // group)}),
                ".weight_scale_2": ({"F32"}, scalar), ".input_scale": ({"F32"}, scalar)}
    return {".weight": ({"F8_E4M3"}, {(out, width)}),
            ".weight_scale": ({"F32", "BF16"}, scalar | {(out,), (out, 1)}),
            ".input_scale": ({"F32", "BF16"}, scalar)}


def _quantized_ref(module: str, algo: str, tensors: dict[str, TensorRef], q: QuantConfig) -> QuantizedRef:
    weight = tensors[module + ".weight"]
    if len(weight.shape) != 2:
        raise NemoqError(f"{module}.weight has shape {list(weight.shape)}; a quantized linear weight is 2-D",
                         weight.shard)
    out = weight.shape[0]
    width = weight.shape[1] * 2 if algo == "NVFP4" else weight.shape[1]
    expected = _expected(algo, out, width, codec.GROUP)
    for suffix, (dtypes, shapes) in expected.items():
        ref = tensors.get(module + suffix)
        if ref is None:
            if suffix in (".weight_scale", ".weight_scale_2"):
                raise NemoqError(f"{algo} weight {module}.weight has no {module}{suffix}", weight.shard)
            continue
        if ref.dtype not in dtypes or ref.shape not in shapes:
            want = " or ".join(str(list(s)) for s in sorted(shapes))
            raise NemoqError(f"{ref.name} is {ref.dtype} {list(ref.shape)}; {algo} needs "
                             f"{'/'.join(sorted(dtypes))} {want} for {module}.weight", ref.shard)
    if algo == "NVFP4" and width % codec.GROUP:
        raise NemoqError(f"{module}.weight: row width {width} is not a multiple of {codec.GROUP}", weight.shard)
    return QuantizedRef(module + ".weight", DTYPE_OF_ALGO[algo], (out, width), weight,
                        tensors[module + ".weight_scale"], tensors.get(module + ".weight_scale_2"),
                        tensors.get(module + ".input_scale"))


def _expert_slice(ref: TensorRef, k: int, n_experts: int) -> TensorRef:
    """Expert k of a stacked tensor (its first axis), read in place; a tensor without that axis
    (a scalar input_scale) is shared by every expert."""
    if not ref.shape or ref.shape[0] != n_experts:
        return ref
    size = ref.nbytes // n_experts
    return TensorRef(f"{ref.name}[{k}]", ref.shard, ref.dtype, ref.shape[1:], ref.offset + k * size, size)


def split_fused_experts(tensors: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], int]:
    """A ModelOpt export in the transformers-5 fused layout, seen as ModelOpt's own per-expert
    split writes it: `<p>.experts.up_proj` (E, out, in/2) with `<p>.experts.up_proj_weight_scale`
    (E, out, in/16), `..._weight_scale_2` (E,) and `..._input_scale` becomes
    `<p>.experts.K.up_proj.weight` / `.weight_scale` / `.weight_scale_2` / `.input_scale` for each
    expert K, as views of the stacked bytes (nothing is read). Also returns how many stacks."""
    out = dict(tensors)
    n_stacks = 0
    for name, ref in tensors.items():
        fused = next((f for f in FUSED_TO_PER_EXPERT if name.endswith("." + f)), None)
        if fused is None:
            continue
        if len(ref.shape) != 3:
            raise NemoqError(f"fused expert stack {name} has shape {list(ref.shape)}; expected 3-D "
                             "(experts, out, in)", ref.shard)
        parts = {".weight": ref}
        for suffix in COMPANIONS:
            companion = next((tensors[c] for j in FUSED_COMPANION_JOINS if (c := name + j + suffix[1:]) in tensors), None)
            if companion is not None:
                parts[suffix] = companion
                del out[companion.name]
        del out[name]
        template = name.removesuffix(fused) + FUSED_TO_PER_EXPERT[fused].removesuffix(".weight")
        for k in range(ref.shape[0]):
            for suffix, part in parts.items():
                out[template.format(xid=k) + suffix] = _expert_slice(part, k, ref.shape[0])
        n_stacks += 1
    return out, n_stacks


def attach_companions(tensors: dict[str, TensorRef], model_dir: Path) -> tuple[dict, str]:
    """Source tensors with each quantized weight's group replaced by one QuantizedRef, and a line
    describing the quantization ("" for an unquantized checkpoint)."""
    q = read_quant_config(model_dir)
    if q is None:
        return tensors, ""
    tensors, n_stacks = split_fused_experts(tensors)
    out: dict = {}
    for name, ref in tensors.items():
        if name.endswith(COMPANIONS + KV_CACHE_SCALES):
            continue
        module = name.removesuffix(".weight")
        if module + ".weight_scale" not in tensors:
            if name.endswith(".weight") and ref.dtype in ("U8", "F8_E4M3"):
                raise NemoqError(f"quantized weight {name} ({ref.dtype}) has no {module}.weight_scale", ref.shard)
            out[name] = ref
            continue
        if q.is_excluded(module):
            raise NemoqError(f"{module} is excluded from quantization in {q.path.name} but has a weight_scale",
                             tensors[module + ".weight_scale"].shard)
        algo = q.algo_for(module) or q.algo_for(_stack_of(module))
        if algo is None:
            raise NemoqError(f"{module} has a weight_scale but no entry in quantized_layers", q.path)
        out[name] = _quantized_ref(module, algo, tensors, q)
    orphans = [n for n in tensors if n.endswith(COMPANIONS) and _module_of(n) + ".weight" not in tensors]
    if orphans:
        raise NemoqError(f"{orphans[0]} belongs to no weight ({len(orphans)} such tensor(s))", tensors[orphans[0]].shard)
    kv = sum(n.endswith(KV_CACHE_SCALES) for n in tensors)
    note = f"; {q.describe()}" + (f", {kv} KV-cache scale(s) not used by llama.cpp" if kv else "")
    note += f", {n_stacks} fused expert stack(s) read per expert" if n_stacks else ""
    return out, note


def _stack_of(module: str) -> str:
    """`...experts.K.up_proj` -> `...experts.up_proj`: how quantized_layers may name a fused stack."""
    return re.sub(r"\.experts\.\d+\.", ".experts.", module)


def _module_of(name: str) -> str:
    return next(name.removesuffix(s) for s in COMPANIONS[::-1] if name.endswith(s))
