"""llama.cpp's own converter (convert_hf_to_gguf.py), run from the llama-cpp-python sdist, as an oracle.

The converter is not installed with the wheel; it ships in the sdist that matches the llama.cpp
nemoq targets (llama-cpp-python 0.3.36). Nothing of it is kept in this repository: the sdist is
looked for in $NEMOQ_LLAMA_CPP_SDIST, then ~/.cache/nemoq/, and the converter, its `conversion/`
package and its vendored gguf-py are unpacked next to it once. Get it with

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d ~/.cache/nemoq

Tests that need it are skipped (saying so) when the sdist is absent; tests/data/family_reference.json
holds what it wrote on the family fixtures, so the comparison runs without it too.

One patch is applied: llama.cpp recognises pre-tokenizers only by a hash of known tokenizers, and
the fixtures' tiny tokenizer is not among them; it is told "tekken" (what nemoq writes for it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
ROOT = Path(__file__).resolve().parent.parent

RUNNER = """
import sys
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
sys.path.insert(0, {src!r})
import convert_hf_to_gguf
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "tekken"
convert_hf_to_gguf.main()
"""


def sdist_path() -> Path | None:
    for candidate in (os.environ.get("NEMOQ_LLAMA_CPP_SDIST"), Path.home() / ".cache" / "nemoq" / SDIST_NAME):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def converter_dir() -> Path | None:
    """The unpacked converter (convert_hf_to_gguf.py beside conversion/ and gguf-py/), or None."""
    sdist = sdist_path()
    if sdist is None:
        return None
    target = sdist.parent / "llama-cpp-0.3.36-converter"
    if not (target / "convert_hf_to_gguf.py").is_file():
        with tarfile.open(sdist) as tar:
            prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(MEMBERS)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(target, members=members, filter="data")
    return target


def run_llama_converter(checkpoint: Path, out: Path, *extra: str) -> Path:
    """Convert `checkpoint` to `out` with llama.cpp's converter (F32 unless `extra` says otherwise)."""
    src = converter_dir()
    if src is None:
        raise FileNotFoundError(f"{SDIST_NAME} not found (see tests/llama_converter.py)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    args = [str(checkpoint), "--outfile", str(out), "--outtype", "f32", *extra]
    done = subprocess.run([sys.executable, "-c", RUNNER.format(src=str(src)), *args], env=env,
                          capture_output=True, text=True, cwd=src)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {checkpoint}:\n{done.stderr[-3000:]}")
    return out
