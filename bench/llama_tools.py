"""llama.cpp's own llama-quantize and llama-imatrix, built once from llama-cpp-python 0.3.36's sdist.

    .venv/bin/python bench/llama_tools.py        # build (if needed) and print the two paths

The benches compare nemoq's files with what llama.cpp's tools make from the same GGUF. The
tools are not in the llama-cpp-python wheel, so the llama.cpp vendored in the matching sdist
(the llama.cpp nemoq targets) is unpacked and built with cmake, CPU only, static, only these two
targets (-j2), into $NEMOQ_BENCH_CACHE (default ~/.cache/nemoq-bench)/llama.cpp-0.3.36/. Nothing
of llama.cpp is kept in the repository. The sdist is the one tests/llama_converter.py uses
(~/.cache/nemoq/ or $NEMOQ_LLAMA_CPP_SDIST); when it is absent, pip downloads it there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.llama_converter import SDIST_NAME, sdist_path  # noqa: E402

VERSION = "0.3.36"
CACHE = Path(os.environ.get("NEMOQ_BENCH_CACHE", Path.home() / ".cache" / "nemoq-bench"))
HOME = CACHE / f"llama.cpp-{VERSION}"
TARGETS = ("llama-quantize", "llama-imatrix")
PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
# CPU only, static, none of the optional parts (no network, no server, no tests)
CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release", "BUILD_SHARED_LIBS": "OFF", "GGML_CUDA": "OFF", "GGML_METAL": "OFF",
    "GGML_VULKAN": "OFF", "LLAMA_BUILD_TOOLS": "ON", "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "OFF", "LLAMA_BUILD_APP": "OFF", "LLAMA_OPENSSL": "OFF",
}


def binaries() -> dict[str, Path]:
    return {t: HOME / "build" / "bin" / t for t in TARGETS}


def fetch_sdist() -> Path:
    found = sdist_path()
    if found is not None:
        return found
    dest = Path.home() / ".cache" / "nemoq"
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
                    "--no-binary", ":all:", "-d", str(dest)], check=True)
    if not (dest / SDIST_NAME).is_file():
        raise SystemExit(f"pip did not leave {SDIST_NAME} in {dest}")
    return dest / SDIST_NAME


def unpack(sdist: Path) -> Path:
    """vendor/llama.cpp of the sdist as HOME/src (unpacked beside it first, so a cut-off run leaves no half tree)."""
    src = HOME / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    partial = HOME / "src.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(PREFIX) and len(m.name) > len(PREFIX)]
        for m in members:
            m.name = m.name[len(PREFIX):]
        tar.extractall(partial, members=members, filter="data")
    partial.rename(src)
    return src


def build(jobs: int = 2, log=sys.stderr) -> dict[str, Path]:
    """The two tools' paths, building them first when they are missing (one build at a time: a lock file)."""
    paths = binaries()
    if all(p.is_file() for p in paths.values()):
        return paths
    HOME.mkdir(parents=True, exist_ok=True)
    with (HOME / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # another bench building: wait for it, then find its tools
        return paths if all(p.is_file() for p in paths.values()) else _build(paths, jobs, log)


def _build(paths: dict[str, Path], jobs: int, log) -> dict[str, Path]:
    src = unpack(fetch_sdist())
    configure = ["cmake", "-S", str(src), "-B", str(HOME / "build"), *(f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items())]
    for argv in (configure, ["cmake", "--build", str(HOME / "build"), "--target", *TARGETS, f"-j{jobs}"]):
        print("$", " ".join(argv), file=log, flush=True)
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (HOME / "build.log").open("a").write(done.stdout)
        if done.returncode != 0:
            raise SystemExit(f"{argv[0]} {argv[1]} failed ({done.returncode}); see {HOME / 'build.log'}:\n"
                             f"{done.stdout[-3000:]}")
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"the build finished without {', '.join(missing)}; see {HOME / 'build.log'}")
    return paths


if __name__ == "__main__":
    for name, path in build().items():
        print(f"{name}: {path}")
