"""`nemoq convert` and `nemoq quantize` write the same file on every machine: SHA-256 digests of
the bundled model's conversions and of every recipe (with and without a fixed importance
matrix) equal those committed in tests/data/golden_files.json. `make test` runs this file again
with numpy's SIMD dispatch off and the C kernels built for the architecture's baseline.

Regenerate after a deliberate change of output with `python -m tests.test_golden_files`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from nemoq.calib.imatrix_file import ImportanceMatrix, write_imatrix
from nemoq.quant.recipes import RECIPES
from tests.conftest import TINY_MODEL, run_cli
from tests.test_golden_bytes import uniform

GOLDEN = Path(__file__).parent / "data" / "golden_files.json"
OUTTYPES = ["f32", "f16", "bf16", "q8_0"]
QUANTIZED = [name for name in RECIPES if name not in ("F32", "F16", "BF16")]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fixed_imatrix(f32_file: Path, out: Path) -> Path:
    """An importance matrix for every weight matrix of the model, from SHA-3 bytes (not from a
    calibration run, whose torch sums differ between machines)."""
    sums, counts = {}, {}
    for t in gguf.GGUFReader(f32_file).tensors:
        if len(t.shape) < 2 or not t.name.endswith(".weight"):
            continue
        n_mat = int(t.shape[2]) if len(t.shape) == 3 else 1
        u = uniform(t.name, n_mat * int(t.shape[0])) + np.float32(0.5)
        sums[t.name] = (u * u * np.float32(64)).reshape(n_mat, int(t.shape[0]))
        counts[t.name] = np.full(n_mat, 64, np.float32)
    write_imatrix(out, ImportanceMatrix(sums, counts, ["golden"], 1, 64))
    return out


def produce(folder: Path) -> dict[str, Path]:
    """Every file the digests cover, written into folder."""
    files = {}
    for outtype in OUTTYPES:
        files[f"convert/{outtype}"] = folder / f"{outtype}.gguf"
        result = run_cli("convert", TINY_MODEL, "-o", files[f"convert/{outtype}"], "--outtype", outtype)
        assert result.exit_code == 0, result.output
    imatrix = fixed_imatrix(files["convert/f32"], folder / "imatrix.gguf")
    files["imatrix"] = imatrix
    for recipe in QUANTIZED:
        for mode, extra in {"plain": [], "imatrix": ["--imatrix", imatrix]}.items():
            files[f"quantize/{recipe}/{mode}"] = out = folder / f"{recipe}-{mode}.gguf"
            result = run_cli("quantize", TINY_MODEL, "-o", out, "--recipe", recipe, *extra)
            assert result.exit_code == 0, result.output
    return files


@pytest.fixture(scope="module")
def digests(tmp_path_factory) -> dict[str, str]:
    return {key: sha256(path) for key, path in produce(tmp_path_factory.mktemp("golden")).items()}


@pytest.mark.parametrize("key", [f"convert/{t}" for t in OUTTYPES] + ["imatrix"] +
                         [f"quantize/{r}/{m}" for r in QUANTIZED for m in ("plain", "imatrix")])
def test_file_equals_the_committed_digest(key, digests):
    assert digests[key] == json.loads(GOLDEN.read_text())[key]


if __name__ == "__main__":   # python -m tests.test_golden_files: rewrite the committed digests
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        data = {key: sha256(path) for key, path in produce(Path(tmp)).items()}
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
