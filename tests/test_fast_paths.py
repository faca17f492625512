"""Fast paths that must give what the plain library calls give."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from nemoq.convert.dtypes import count_non_finite
from nemoq.gguf_file import FastGGUFReader, field_value


@pytest.mark.parametrize("dtype,name", [(np.float16, "F16"), (np.float32, "F32")])
def test_non_finite_count_by_bits_equals_isfinite(dtype, name):
    rng = np.random.default_rng(0)
    info = np.finfo(dtype)
    x = (rng.standard_normal(3 * 2**18 + 5) * 3).astype(dtype)
    edges = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, np.inf, -np.inf, np.nan],
                     dtype=dtype)
    x[rng.choice(x.size, edges.size, replace=False)] = edges
    assert count_non_finite(x, name) == int((~np.isfinite(x)).sum()) == 3
    assert count_non_finite(np.nan_to_num(x), name) == 0


def test_fast_reader_reads_what_gguf_py_reads(tiny_gguf_f32):
    plain, fast = gguf.GGUFReader(tiny_gguf_f32), FastGGUFReader(tiny_gguf_f32)
    assert list(plain.fields) == list(fast.fields)
    for name, f in plain.fields.items():
        a, b = field_value(f), field_value(fast.fields[name])
        assert (list(a) == list(b)) if isinstance(a, (list, np.ndarray)) else a == b, name
        assert f.types == fast.fields[name].types and f.data == fast.fields[name].data
    for a, b in zip(plain.tensors, fast.tensors, strict=True):
        assert (a.name, a.tensor_type, a.data_offset) == (b.name, b.tensor_type, b.data_offset)
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
