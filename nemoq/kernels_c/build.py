"""Compile the C kernels on first use and load them with ctypes.

The shared library is cached per user, keyed by a hash of the sources, the compiler, the
flags and the machine, so an edit or a different CPU gets a fresh build and nothing is
rebuilt otherwise. With no working compiler nemoq falls back to its numpy references and
says so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = tuple(sorted(p.name for p in SOURCE_DIR.glob("*.c")))   # every C file is one library
HEADERS = tuple(sorted(p.name for p in SOURCE_DIR.glob("*.h")))   # included by them: part of the key
LIB_STEM = "libnemoq_kernels"

# Flags per (system, machine). -march/-mcpu=native is safe: the cache key includes the CPU, and
# the quantizers' bytes do not depend on it (no -ffast-math, no FMA contraction: every kernel
# matches numpy bit for bit whatever the vector width). NEMOQ_PORTABLE_KERNELS=1 builds for the
# architecture's baseline instead (x86-64: SSE2, no AVX), as a CPU without AVX2 would run it.
COMMON_FLAGS = ["-O3", "-std=c11", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-pthread"]
NATIVE_FLAGS = {
    ("Linux", "x86_64"): ["-march=native"],
    ("Linux", "aarch64"): ["-mcpu=native"],
    ("Darwin", "arm64"): ["-mcpu=native"],
    ("Darwin", "x86_64"): ["-march=native"],
}
LINK_FLAGS = {"Darwin": ["-dynamiclib"]}
DEFAULT_LINK_FLAGS = ["-shared"]
LIB_SUFFIX = {"Darwin": ".dylib", "Windows": ".dll"}


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    library: Path | None
    compiler: str | None
    flags: tuple[str, ...]
    message: str


def cache_dir() -> Path:
    root = os.environ.get("NEMOQ_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "nemoq" / "kernels"


def compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def portable() -> bool:
    return os.environ.get("NEMOQ_PORTABLE_KERNELS", "") not in ("", "0")


def flags() -> list[str]:
    native = [] if portable() else NATIVE_FLAGS.get((platform.system(), platform.machine()), [])
    return COMMON_FLAGS + native + LINK_FLAGS.get(platform.system(), DEFAULT_LINK_FLAGS)


def _cpu_signature() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def build_key(cc: str, cflags: list[str]) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    h.update(" ".join([cc, *cflags, platform.platform(), _cpu_signature()]).encode())
    return h.hexdigest()[:16]


def _compile(cc: str, cflags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=target.suffix)
    os.close(fd)
    try:
        cmd = [cc, *cflags, *(str(SOURCE_DIR / s) for s in SOURCES), "-o", tmp, "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, target)   # atomic: a concurrent build never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, KernelStatus]:
    cc, cflags = compiler(), flags()
    if os.environ.get("NEMOQ_NO_KERNELS"):
        return None, KernelStatus(False, None, cc, tuple(cflags), "disabled by NEMOQ_NO_KERNELS")
    if cc is None:
        return None, KernelStatus(False, None, None, tuple(cflags), "no C compiler found (set CC)")
    target = cache_dir() / build_key(cc, cflags) / (LIB_STEM + LIB_SUFFIX.get(platform.system(), ".so"))
    try:
        if not target.exists():
            _compile(cc, cflags, target)
        return ctypes.CDLL(str(target)), KernelStatus(True, target, cc, tuple(cflags), "built")
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        first = detail.strip().splitlines()[0] if detail.strip() else type(e).__name__
        return None, KernelStatus(False, None, cc, tuple(cflags), f"build failed: {first}")


def library() -> ctypes.CDLL | None:
    """The kernels, built if needed; None (after one warning) when they cannot be built."""
    lib, status = _load()
    if lib is None and not getattr(library, "_warned", False):
        library._warned = True  # type: ignore[attr-defined]
        warnings.warn(f"nemoq C kernels unavailable ({status.message}); using the slower numpy "
                      "reference", RuntimeWarning, stacklevel=2)
    return lib


def status() -> KernelStatus:
    return _load()[1]


if __name__ == "__main__":
    print(status(), file=sys.stderr)
