"""The quantizers write the same bytes on every machine: SHA-256 digests of every format's output
for fixed inputs, with and without importance, through the C kernels and the numpy references,
equal the digests committed in tests/data/golden_bytes.json.

The inputs are made from SHA-3 output with exact float32 arithmetic (no random generator, whose
streams may change between numpy releases, and no exp/log), plus real weights of the bundled
model. CI runs this file a second time with numpy's SIMD dispatch limited to the baseline and
the C kernels built without -march=native (Makefile: test-bytes), so one machine checks the
paths of the others. After a deliberate change of a quantizer's output, regenerate with
`python -m tests.test_golden_bytes` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from nemoq import kernels_c
from nemoq.quant.encodings import BlockEncoding
from nemoq.quant.formats import FORMATS
from nemoq.quant.tensor_scale import ScaledEncoding
from tests.conftest import TINY_MODEL

GOLDEN = Path(__file__).parent / "data" / "golden_bytes.json"
ROWS, N = 8, 1024


def uniform(label: str, n: int) -> np.ndarray:
    """n float32 values in [-0.5, 0.5), exact multiples of 2^-24 taken from SHAKE-256(label)."""
    u = np.frombuffer(hashlib.shake_256(label.encode()).digest(4 * n), dtype="<u4")
    return (u >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24) - np.float32(0.5)


def bell(label: str, shape: tuple[int, ...]) -> np.ndarray:
    """A bell-shaped sample (the sum of four uniforms), in fixed-order float32 additions."""
    n = int(np.prod(shape))
    v = uniform(label, 4 * n).reshape(4, n)
    return ((v[0] + v[1]) + (v[2] + v[3])).reshape(shape)


def heavy_tailed(label: str) -> np.ndarray:
    """A ratio of uniforms: most values small, a few up to ~10^3 times larger."""
    return uniform(label + "/num", ROWS * N).reshape(ROWS, N) / (
        np.abs(uniform(label + "/den", ROWS * N).reshape(ROWS, N)) + np.float32(2.0 ** -11))


def outlier_columns() -> np.ndarray:
    x = bell("outlier-columns", (ROWS, N))
    columns = np.frombuffer(hashlib.shake_256(b"columns").digest(48), dtype="<u2") % N
    x[:, columns] *= np.float32(40)
    return x


def edge_cases() -> np.ndarray:
    """Zero blocks, signed zeros, tiny scales, subnormal values, half-way values, and block maxima
    a few ulps below a power of two (where a C library's log2f may round up). Not here: blocks
    whose largest |x| is below ~1e-36, where 1 / scale overflows and ggml's own result is a cast
    of NaN (platform-defined)."""
    x = bell("edge", (ROWS, N))
    x[0, :256] = 0
    x[0, 256:512:2] = -0.0
    x[1] *= np.float32(1e-30)                                      # tiny scales
    x[2] = np.round(x[2] * 200) + np.float32(0.5)                  # k + 1/2: rounding ties
    x[3, ::2] *= np.float32(1e-40)                                 # subnormal values among normal ones
    powers = np.ldexp(np.float32(1), np.arange(-12, 8)).astype(np.float32)
    for i, p in enumerate(powers):
        block = slice(32 * i, 32 * i + 32)
        x[4:, block] = np.clip(x[4:, block], -p / 2, p / 2)
        x[4:, 32 * i] = np.nextafter(p, np.float32(0))              # the largest |x| just below 2^k
        x[5:, 32 * i + 1] = -np.nextafter(np.nextafter(p, np.float32(0)), np.float32(0))
    return x


def real_weights() -> np.ndarray:
    """The bundled trained model's expert weights (BF16, widened exactly): 8 rows of 1024."""
    shard = TINY_MODEL / "model-00001-of-00002.safetensors"
    raw = shard.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    names = sorted(k for k in header if ".experts." in k and k.endswith("down_proj.weight"))
    bits = []
    for name in names[:8]:
        assert header[name]["dtype"] == "BF16"
        start, end = header[name]["data_offsets"]
        bits.append(np.frombuffer(raw, "<u2", (end - start) // 2, 8 + header_len + start))
    values = (np.concatenate(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.ascontiguousarray(values[:ROWS * N].reshape(ROWS, N))


def importance() -> np.ndarray:
    """Weights over many orders of magnitude, some columns and a whole block at zero."""
    u = uniform("importance", N) + np.float32(0.5)
    u2 = u * u
    w = (u2 * u2) * (u2 * u2) * np.float32(1e3)
    w[uniform("dropped", N) < np.float32(-0.3)] = 0
    w[:32] = 0
    return w


INPUTS = {
    "bell": bell("bell", (ROWS, N)),
    "heavy-tailed": heavy_tailed("heavy"),
    "outlier-columns": outlier_columns(),
    "edge": edge_cases(),
    "real": real_weights(),
}
IMPORTANCE = {"plain": None, "importance": importance()}
PATHS = ["numpy", "c"]


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def quantized(path: str, fmt: str, x: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    if path == "c":
        if not kernels_c.available(fmt):
            pytest.fail(f"the C kernel for {fmt} did not build: {kernels_c.status().message}")
        return kernels_c.quantize_rows(fmt, x, imp, threads=2)
    return FORMATS[fmt].quantize(x, imp)


def scaled(path: str, fmt: str, imp: np.ndarray | None, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """An expert stack (2 matrices of 4 rows) through ScaledEncoding: block bytes and `.scale`s."""
    if path == "numpy":
        monkeypatch.setattr(kernels_c, "available", lambda name: False)
    base = BlockEncoding(fmt, FORMATS[fmt].ggml_type, FORMATS[fmt].quantize)
    stack = INPUTS["real"].reshape(2, ROWS // 2, N) * np.float32(0.05)   # trained-weight magnitudes
    enc = ScaledEncoding(base, stack.shape, None if imp is None else np.stack([imp, imp[::-1]]))
    blocks = enc.encode(stack, "float32")
    return blocks, enc.scales


def computed() -> dict:
    """Every digest, as the committed file holds them (from the numpy references)."""
    data: dict = {"inputs": input_digests(), "formats": {}, "scaled": {}}
    for fmt in FORMATS:
        for mode, imp in IMPORTANCE.items():
            data["formats"][f"{fmt}/{mode}"] = {name: digest(FORMATS[fmt].quantize(x, imp))
                                               for name, x in INPUTS.items()}
    with pytest.MonkeyPatch.context() as mp:
        for fmt in ("nvfp4", "mxfp4"):
            for mode, imp in IMPORTANCE.items():
                data["scaled"][f"{fmt}/{mode}"] = digest(*scaled("numpy", fmt, imp, mp))
    return data


def input_digests() -> dict:
    return {name: digest(x) for name, x in INPUTS.items()} | {"importance": digest(IMPORTANCE["importance"])}


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_inputs_are_the_committed_ones(golden):
    """The inputs themselves (SHA-3 bytes, float32 arithmetic, the bundled model) never move."""
    assert input_digests() == golden["inputs"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", list(IMPORTANCE))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_bytes_equal_the_committed_digests(fmt, mode, path, golden):
    got = {name: digest(quantized(path, fmt, x, IMPORTANCE[mode])) for name, x in INPUTS.items()}
    assert got == golden["formats"][f"{fmt}/{mode}"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", list(IMPORTANCE))
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_tensor_scales_equal_the_committed_digests(fmt, mode, path, golden, monkeypatch):
    blocks, scales = scaled(path, fmt, IMPORTANCE[mode], monkeypatch)
    assert digest(blocks, scales) == golden["scaled"][f"{fmt}/{mode}"]


if __name__ == "__main__":   # python -m tests.test_golden_bytes: rewrite the committed digests
    GOLDEN.write_text(json.dumps(computed(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
