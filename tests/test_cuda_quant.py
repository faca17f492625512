"""The CUDA quantizer (quants.cu) gives the C kernels' bytes, bit for bit.

Where nvcc exists, quants.cu is built once (cached per user) and its per-unit code run on the CPU
(emulate_quantize_rows): the same source the GPU runs, so its arithmetic is checked without a
GPU. On a machine with one, the GPU's bytes are compared too. The oracle is nemoq's C kernels
(kernels_c.quantize_rows), themselves bit-identical to the numpy references (test_kernels_c.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from nemoq.kernels_c import quantize_rows
from nemoq.kernels_c import cuda, cuda_quant
from nemoq.kernels_c.cuda_quant import CUDA_QUANT_FORMATS, CudaUnavailable
from nemoq.quant.formats import FORMATS
from tests.conftest import run_cli

FORMATS_TESTED = ("nvfp4", "q8_0", "q4_k", "q5_k")
ROWS, WIDTH = 48, 512


def _rows(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (ROWS, WIDTH)
    if kind == "gaussian":
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if kind == "heavy_tailed":   # Student t with 1.5 degrees of freedom: rare huge values
        return (rng.standard_t(1.5, shape) * 0.01).astype(np.float32)
    if kind == "zeros":          # whole rows, half rows and single blocks of zeros among data
        x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        x[::3] = 0
        x[1::3, : WIDTH // 2] = 0
        x[2::3, 64:96] = 0
        return x
    if kind == "tensor_scaled":  # NVFP4 rows divided by a per-matrix scale (amax / (6 * 448))
        x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        return (x / (np.abs(x).max() / np.float32(6 * 448))).astype(np.float32)
    raise KeyError(kind)


DATA = ("gaussian", "heavy_tailed", "zeros", "tensor_scaled")
IMPORTANCE = {
    "none": None,
    "spread": (np.random.default_rng(7).uniform(0, 1, WIDTH) ** 6).astype(np.float32),   # six orders of magnitude
    "some_zero": np.where(np.random.default_rng(8).random(WIDTH) < 0.3, 0, 1).astype(np.float32),
}


def _built() -> None:
    if cuda.nvcc() is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be built here")
    lib, message, _ = cuda_quant._load()
    assert lib is not None, message


def test_cuda_sources_compile_with_nvcc():
    """quants.cu and moe.cu both build."""
    _built()
    status = cuda.cuda_status()
    assert status.built and status.quantizer == "built", (status.message, status.quantizer)
    assert all(cuda_quant.library().nemoq_quant_cuda_supports(type_id) for type_id, _, _ in CUDA_QUANT_FORMATS.values())
    assert not cuda_quant.library().nemoq_quant_cuda_supports(2)   # Q4_0: not in quants.cu


@pytest.mark.parametrize("importance", IMPORTANCE, ids=str)
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("fmt", FORMATS_TESTED)
def test_cuda_code_on_the_cpu_equals_c_kernels(fmt, data, importance):
    _built()
    x, w = _rows(data), IMPORTANCE[importance]
    got = cuda_quant.emulate_quantize_rows(fmt, x, w)
    want = quantize_rows(fmt, x, w)
    assert got.shape == want.shape and got.dtype == np.uint8
    bad = np.flatnonzero((got != want).any(axis=1))
    assert bad.size == 0, f"{fmt}: rows {bad[:8]} differ from the C kernel"


@pytest.mark.parametrize("fmt", FORMATS_TESTED)
def test_cuda_code_on_the_cpu_equals_numpy_reference(fmt):
    """The same against the numpy reference directly, on a few rows (an oracle independent of C)."""
    _built()
    x, w = _rows("heavy_tailed", seed=3)[:6], IMPORTANCE["spread"]
    for importance in (None, w):
        np.testing.assert_array_equal(cuda_quant.emulate_quantize_rows(fmt, x, importance),
                                      FORMATS[fmt].quantize(x, importance).reshape(6, -1))


def test_cuda_quantizer_rejects_bad_input():
    _built()
    x = _rows("gaussian")
    with pytest.raises(ValueError, match="handles"):
        cuda_quant.emulate_quantize_rows("q4_0", x)
    with pytest.raises(ValueError, match="not a multiple"):
        cuda_quant.emulate_quantize_rows("q4_k", x[:, :320])
    with pytest.raises(ValueError, match="importance"):
        cuda_quant.emulate_quantize_rows("nvfp4", x, np.ones(WIDTH - 1, np.float32))


def test_without_a_gpu_the_cuda_quantizer_says_why():
    status = cuda_quant.quantizer_status()
    if status.usable:
        pytest.skip("a GPU is present")
    with pytest.raises(CudaUnavailable, match="nemoq CUDA quantizer") as e:
        cuda_quant.cuda_quantize_rows("q8_0", _rows("gaussian"))
    assert "GPU" in str(e.value) or "nvcc" in str(e.value)


@pytest.mark.parametrize("importance", ["none", "spread"], ids=str)
@pytest.mark.parametrize("fmt", FORMATS_TESTED)
def test_gpu_output_equals_c_kernels(fmt, importance):
    status = cuda_quant.quantizer_status()
    if not status.usable:
        pytest.skip(f"no CUDA GPU: {status.message}")
    for data in DATA:
        x, w = _rows(data), IMPORTANCE[importance]
        np.testing.assert_array_equal(cuda_quant.cuda_quantize_rows(fmt, x, w), quantize_rows(fmt, x, w))


def test_info_kernels_reports_cuda_state():
    result = run_cli("info", "--kernels")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    status = cuda.cuda_status()
    assert "C kernels:" in out and "CUDA: nvcc" in out
    assert ("not found" in out) == (status.nvcc is None)
    assert f"GPUs: {status.devices}" in out
    assert ("quantizer: built" in out) == (status.quantizer == "built")
    assert ("MoE reference matvec: built" in out) == status.built
    assert "formats: q8_0, q4_k, q5_k, nvfp4" in out
