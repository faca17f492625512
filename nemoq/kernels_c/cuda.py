"""nvcc builds of nemoq's CUDA sources, and the CUDA twin of the MoE reference kernel (moe.cu).

    from nemoq.kernels_c.cuda import cuda_status, moe_matvec_cuda
    print(cuda_status())                      # nvcc found? built? GPUs?
    y = moe_matvec_cuda(x, expert_ids, expert_weights, up, down, "nvfp4", "nvfp4")   # as kernels_c.moe.moe_matvec

Each library (moe.cu here, quants.cu in cuda_quant.py) is cached per user like the C kernels
(nemoq.kernels_c.build.cache_dir()), keyed by a hash of its source (and the files it includes),
nvcc's version and the flags; it links the CUDA runtime statically, so it loads (and reports
"no GPU") on machines without a driver. `emulate_matvec` runs moe.cu's per-thread code on the
CPU, which tests the CUDA code where no GPU is present.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from nemoq.kernels_c.build import cache_dir
from nemoq.kernels_c.moe import MOE_FORMATS, MoeInputs, moe_inputs, pointer

__all__ = ["MOE_FORMATS", "CudaStatus", "build_and_load", "cuda_status", "emulate_matvec", "moe_matvec_cuda", "nvcc"]

SOURCE = Path(__file__).resolve().parent / "moe.cu"
KERNELS_DIR = SOURCE.parent
LIB_NAME = "libnemoq_moe_cuda.so"
# compute_80 PTX rides along with the sm_80 binary, so newer GPUs (sm_90 and up) JIT it at load.
# One architecture keeps the build under a minute; NEMOQ_CUDA_ARCH=sm_90 (say) builds for another.
ARCH = os.environ.get("NEMOQ_CUDA_ARCH", "sm_80")
NVCC_FLAGS = ["-O3", "-std=c++20", "-shared", "-Xcompiler", "-fPIC",
              "-gencode", f"arch=compute_{ARCH[3:]},code=[{ARCH},compute_{ARCH[3:]}]"]
BUILD_TIMEOUT_S = 600
# moe.cu: no fused multiply-adds on the device, none contracted on the host (the emulation's
# compiler), so that its sums are moe.c's, bit for bit.
MOE_FLAGS = [*NVCC_FLAGS, "-fmad=false", "-Xcompiler", "-ffp-contract=off"]


@dataclass(frozen=True)
class CudaStatus:
    nvcc: str | None          # the compiler found, or None
    built: bool               # moe.cu (the MoE reference's twin) compiled and loaded
    library: Path | None
    devices: int              # GPUs the CUDA runtime sees (0 without a driver or GPU)
    message: str              # why not built, or why no device
    quantizer: str = "not asked"        # quants.cu (nemoq.kernels_c.cuda_quant): "built" or why not
    quantizer_library: Path | None = None

    @property
    def usable(self) -> bool:
        return self.built and self.devices > 0


def nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), "nvcc", "/usr/local/cuda/bin/nvcc"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def compiled_files(source: Path) -> tuple[Path, ...]:
    """`source` and every file it #includes in quotes, transitively (found beside the including file,
    else in nemoq/kernels_c): all that a build reads, so all of it goes into the build key."""
    found: list[Path] = []
    pending = [source]
    while pending:
        path = pending.pop()
        if path in found:
            continue
        found.append(path)
        for name in _LOCAL_INCLUDE.findall(path.read_text()):
            pending += [d / name for d in (path.parent, KERNELS_DIR) if (d / name).is_file()][:1]
    return tuple(found)


def build_key(compiler: str, flags: list[str], sources: tuple[Path, ...] = (SOURCE,)) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    for source in sources:
        h.update(source.read_bytes())
    h.update(" ".join([compiler, version, *flags, platform.platform()]).encode())
    return h.hexdigest()[:16]


def _compile(compiler: str, flags: list[str], target: Path, source: Path = SOURCE) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=BUILD_TIMEOUT_S)
        os.replace(tmp, target)   # atomic: a concurrent build never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_p, _i64, _int, _buf = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_char_p
_SIGNATURES = {
    "nemoq_moe_cuda_supports": ([_int], _int),
    "nemoq_moe_cuda_device_count": ([_buf, _int], _int),
    "nemoq_moe_cuda_upload": ([_p, _i64, _buf, _int], _p),
    "nemoq_moe_cuda_free": ([_p], _int),
    # up, up type, down, down type, E, I, H, x, T, k, expert_ids, expert_weights, up_scale, down_scale, out,
    # emulate, err, errlen
    "nemoq_moe_cuda_matvec": ([_p, _int, _p, _int, _i64, _i64, _i64, _p, _i64, _i64, _p, _p, _p, _p, _p,
                               _int, _buf, _int], _int),
}


def build_and_load(source: Path, lib_name: str, flags: list[str], signatures: dict,
                   includes: tuple[Path, ...] = ()) -> tuple[ctypes.CDLL | None, str, Path | None]:
    """`source` compiled with nvcc into the per-user cache (once per sources, nvcc and flags) and
    loaded: (library, "built", path), or (None, why not, None). The build key hashes `source`, the
    files it #includes (compiled_files) and `includes`: any other file the build depends on."""
    compiler = nvcc()
    if compiler is None:
        return None, "nvcc not found (set NVCC or put it on PATH)", None
    files = tuple(dict.fromkeys((*compiled_files(source), *includes)))
    target = cache_dir() / f"cuda-{build_key(compiler, flags, files)}" / lib_name
    try:
        if not target.exists():
            _compile(compiler, flags, target, source)
        lib = ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as e:
        lines = [line for line in (e.stderr or "").splitlines() if "error" in line] or (e.stderr or "").splitlines()
        return None, f"nvcc failed: {lines[0] if lines else e}", None
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"build failed: {e}", None
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib, "built", target


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str, Path | None]:
    return build_and_load(SOURCE, LIB_NAME, MOE_FLAGS, _SIGNATURES)


def library() -> ctypes.CDLL | None:
    """moe.cu compiled (once per source and nvcc version) and loaded, or None."""
    return _load()[0]


def _errbuf() -> ctypes.Array:
    return ctypes.create_string_buffer(512)


def _gpu_count_from_nvidia_smi() -> tuple[int, str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0, "no nvidia-smi"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 0, f"nvidia-smi failed: {e}"
    gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return len(gpus), "nvidia-smi" if gpus else (out.stderr.strip() or "nvidia-smi lists no GPU")


def cuda_status() -> CudaStatus:
    """Whether nvcc exists, whether moe.cu and quants.cu built, and how many GPUs the CUDA runtime sees."""
    from nemoq.kernels_c.cuda_quant import quantizer_status   # it imports this module
    quant = quantizer_status()
    quant_state = ("built", quant.library) if quant.built else (quant.message, None)
    lib, message, path = _load()
    if lib is None:
        devices, why = _gpu_count_from_nvidia_smi()
        return CudaStatus(nvcc(), False, None, devices, f"{message}; GPUs by nvidia-smi: {devices} ({why})",
                          *quant_state)
    err = _errbuf()
    devices = lib.nemoq_moe_cuda_device_count(err, len(err))
    why = f"{devices} GPU(s)" if devices else f"no GPU: {err.value.decode(errors='replace') or 'none found'}"
    return CudaStatus(nvcc(), True, path, devices, f"built; {why}", *quant_state)


def _require_library() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"nemoq CUDA MoE kernel unavailable: {_load()[1]}")
    return lib


def _call(lib: ctypes.CDLL, a: MoeInputs, up_ptr, down_ptr, emulate: bool) -> np.ndarray:
    n_tokens, hidden = a.x.shape
    out = np.empty((n_tokens, hidden), np.float32)
    err = _errbuf()
    code = lib.nemoq_moe_cuda_matvec(up_ptr, a.up_type, down_ptr, a.down_type, a.n_experts, a.n_ff, hidden,
                                     pointer(a.x), n_tokens, a.expert_ids.shape[1], pointer(a.expert_ids),
                                     pointer(a.expert_weights), pointer(a.up_scale), pointer(a.down_scale),
                                     pointer(out), int(emulate), err, len(err))
    if code:
        raise RuntimeError(f"nemoq CUDA MoE kernel: {err.value.decode(errors='replace')}")
    return out


class _Uploads:
    """Device copies of host arrays, freed on exit."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib, self.pointers = lib, []

    def __call__(self, a: np.ndarray) -> int:
        err = _errbuf()
        p = self.lib.nemoq_moe_cuda_upload(a.ctypes.data, a.nbytes, err, len(err))
        if not p:
            raise RuntimeError(f"nemoq CUDA MoE kernel: {err.value.decode(errors='replace')}")
        self.pointers.append(p)
        return p

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        while self.pointers:
            self.lib.nemoq_moe_cuda_free(self.pointers.pop())


def moe_matvec_cuda(x, expert_ids, expert_weights, up, down, up_format: str, down_format: str, *,
                    up_scale=None, down_scale=None) -> np.ndarray:
    """kernels_c.moe.moe_matvec on the GPU, bit for bit: the stacks uploaded, the call run, the
    stacks freed. RuntimeError without a build or a GPU."""
    a = moe_inputs(x, expert_ids, expert_weights, up, down, up_format, down_format, up_scale, down_scale)
    lib = _require_library()
    with _Uploads(lib) as upload:
        return _call(lib, a, upload(a.up), upload(a.down), emulate=False)


def emulate_matvec(x, expert_ids, expert_weights, up, down, up_format: str, down_format: str, *,
                   up_scale=None, down_scale=None) -> np.ndarray:
    """moe.cu's per-thread code run on the CPU, one thread after another (for tests)."""
    a = moe_inputs(x, expert_ids, expert_weights, up, down, up_format, down_format, up_scale, down_scale)
    return _call(_require_library(), a, pointer(a.up), pointer(a.down), emulate=True)
