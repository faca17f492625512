"""The C kernels build, load, and equal the numpy references bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from nemoq import kernels_c
from nemoq.quant import q8_0

RNG = np.random.default_rng(1)
INPUTS = {
    "gaussian": RNG.standard_normal((37, 512)).astype(np.float32),
    "heavy-tailed": RNG.standard_t(2, (37, 512)).astype(np.float32),
    "tiny-and-zero": np.concatenate([np.zeros((3, 512), np.float32),
                                     (RNG.standard_normal((3, 512)) * 1e-6).astype(np.float32)]),
}


def test_kernels_build_here():
    status = kernels_c.status()
    assert status.available, status.message
    assert status.library is not None and status.library.exists()


@pytest.mark.parametrize("case", INPUTS)
@pytest.mark.parametrize("threads", [1, 3])
def test_q8_0_kernel_equals_numpy(case, threads):
    x = INPUTS[case]
    ours = kernels_c.quantize_rows("q8_0", x, threads=threads)
    np.testing.assert_array_equal(ours, q8_0.quantize(x))
    np.testing.assert_array_equal(kernels_c.dequantize_rows("q8_0", ours, threads=threads), q8_0.dequantize(ours))


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    from nemoq.kernels_c import build
    build._load.cache_clear()
    monkeypatch.setattr(build, "compiler", lambda: None)
    monkeypatch.delattr(build.library, "_warned", raising=False)
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert build.library() is None
        assert not build.status().available
    finally:
        build._load.cache_clear()


def test_info_kernels_reports_the_library():
    from tests.conftest import run_cli
    result = run_cli("info", "--kernels")
    assert result.exit_code == 0, result.output
    assert "built" in result.output and "q8_0" in result.output
