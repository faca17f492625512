"""Q8_0 numpy reference against gguf-py (itself a port of ggml's reference)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from nemoq.quant import q8_0

RNG = np.random.default_rng(0)
CASES = {
    "gaussian": RNG.standard_normal((16, 256)).astype(np.float32),
    "heavy-tailed": RNG.standard_t(2, (16, 256)).astype(np.float32),
    "ties-and-zeros": np.tile(np.array([0.0, 0.5, -0.5, 1.5, -2.5, 127.0, -127.0, 63.5], np.float32), (4, 32)),
}


@pytest.mark.parametrize("case", CASES)
def test_q8_0_matches_gguf_py_bit_for_bit(case):
    x = CASES[case]
    ours = q8_0.quantize(x)
    ref = quants.quantize(x, GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(q8_0.dequantize(ours), quants.dequantize(ref, GGMLQuantizationType.Q8_0))
