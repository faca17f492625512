"""The CUDA twin of the C quantizers (quants.cu) for NVFP4, Q8_0, Q4_K and Q5_K.

    from nemoq.kernels_c.cuda_quant import cuda_quantize_rows, quantizer_status
    q = cuda_quantize_rows("nvfp4", rows, importance)   # the bytes of kernels_c.quantize_rows, on the GPU

Built with nvcc like moe.cu (nemoq.kernels_c.cuda.build_and_load: per-user cache, static CUDA
runtime, so it loads without a driver) and with -fmad=false, so that the GPU does the C kernels'
float32 operations in their order and the bytes are identical. `emulate_quantize_rows` runs the
same quants.cu code on the CPU: that is how the CUDA code is tested where no GPU is present.
NVFP4 rows that carry a per-matrix scale (nemoq.quant.tensor_scale) are divided by it before
they come here: the kernel quantizes the rows it is given.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from nemoq.kernels_c import quantizer_inputs
from nemoq.kernels_c.cuda import NVCC_FLAGS, build_and_load

SOURCE = Path(__file__).resolve().parent / "quants.cu"
LIB_NAME = "libnemoq_quant_cuda.so"
# No fused multiply-adds on the device, none contracted on the host (the emulation's compiler).
FLAGS = [*NVCC_FLAGS, "-fmad=false", "-Xcompiler", "-ffp-contract=off"]

# format name -> (ggml type id, values per block, bytes per block): what quants.cu quantizes
CUDA_QUANT_FORMATS = {name: (int(t), *GGML_QUANT_SIZES[t]) for name, t in
                      ((n, GGMLQuantizationType[n.upper()]) for n in ("q8_0", "q4_k", "q5_k", "nvfp4"))}

_p, _i64, _int, _buf = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_char_p
_SIGNATURES = {
    "nemoq_quant_cuda_supports": ([_int], _int),
    "nemoq_quant_cuda_device_count": ([_buf, _int], _int),
    "nemoq_quant_cuda_rows": ([_int, _p, _p, _i64, _i64, _p, _int, ctypes.POINTER(ctypes.c_float), _buf, _int], _int),
}


class CudaUnavailable(RuntimeError):
    """No nvcc, a failed build, or no GPU: the message says which."""


@dataclass(frozen=True)
class QuantizerStatus:
    built: bool
    library: Path | None
    devices: int
    message: str

    @property
    def usable(self) -> bool:
        return self.built and self.devices > 0


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str, Path | None]:
    return build_and_load(SOURCE, LIB_NAME, FLAGS, _SIGNATURES)


def library() -> ctypes.CDLL | None:
    """quants.cu compiled (once per source, nvcc version and flags) and loaded, or None."""
    return _load()[0]


def quantizer_status() -> QuantizerStatus:
    lib, message, path = _load()
    if lib is None:
        return QuantizerStatus(False, None, 0, message)
    err = ctypes.create_string_buffer(512)
    devices = lib.nemoq_quant_cuda_device_count(err, len(err))
    why = f"{devices} GPU(s)" if devices else f"no GPU: {err.value.decode(errors='replace') or 'none found'}"
    return QuantizerStatus(True, path, devices, f"built; {why}")


def _quantize(fmt: str, x, importance, emulate: bool) -> tuple[np.ndarray, float]:
    if fmt not in CUDA_QUANT_FORMATS:
        raise ValueError(f"{fmt!r}: the CUDA quantizer handles {', '.join(CUDA_QUANT_FORMATS)}")
    type_id, block, size = CUDA_QUANT_FORMATS[fmt]
    x, importance = quantizer_inputs(fmt, block, x, importance)
    n = x.shape[1]
    lib = library()
    if lib is None:
        raise CudaUnavailable(f"nemoq CUDA quantizer unavailable: {_load()[1]}")
    if not emulate:
        status = quantizer_status()
        if not status.usable:
            raise CudaUnavailable(f"nemoq CUDA quantizer: {status.message} (kernels_c.quantize_rows runs on the CPU)")
    out = np.empty((x.shape[0], n // block * size), dtype=np.uint8)
    kernel_ms, err = ctypes.c_float(0.0), ctypes.create_string_buffer(512)
    code = lib.nemoq_quant_cuda_rows(type_id, x.ctypes.data, out.ctypes.data, x.shape[0], n,
                                     None if importance is None else importance.ctypes.data, int(emulate),
                                     ctypes.byref(kernel_ms), err, len(err))
    if code:
        raise RuntimeError(f"nemoq CUDA quantizer: {err.value.decode(errors='replace')}")
    return out, kernel_ms.value / 1e3


def cuda_quantize_rows(fmt: str, x, importance=None) -> np.ndarray:
    """float32 (rows, n) -> uint8 (rows, n / block * bytes) on the GPU, equal to
    nemoq.kernels_c.quantize_rows(fmt, x, importance); CudaUnavailable without a GPU."""
    return _quantize(fmt, x, importance, emulate=False)[0]


def cuda_quantize_timed(fmt: str, x, importance=None) -> tuple[np.ndarray, float]:
    """cuda_quantize_rows, and the seconds the kernel itself took (no copies, no allocation)."""
    return _quantize(fmt, x, importance, emulate=False)


def emulate_quantize_rows(fmt: str, x, importance=None) -> np.ndarray:
    """quants.cu's per-unit code run on the CPU, one unit after another (for tests)."""
    return _quantize(fmt, x, importance, emulate=True)[0]
