"""The named shapes of tests/fixtures/train_tiny.py: w256 is what the benches' second model needs.

w256 must let llama.cpp's k-quants (256-value super-blocks along a row) apply to every weight
matrix, so every matrix's row length (its input width) is a multiple of 256, while the committed
shape keeps the real model's divisibility (multiples of 64, hidden size not of 256). The two
stay about the same size, so training takes about as long.
"""

from __future__ import annotations

import pytest

from tests.fixtures.checkpoints import hub_tensor_shapes, tiny_config
from tests.fixtures.train_tiny import SHAPES


def matrix_rows(dims: dict) -> dict[str, int]:
    """Row length of every 2-D weight of the hub checkpoint (conv1d kernels are not matrices)."""
    cfg = tiny_config(**dims)
    return {name: shape[-1] for name, shape in hub_tensor_shapes(cfg)
            if len(shape) == 2 and "conv1d" not in name}


def parameters(dims: dict) -> int:
    total = 0
    for _, shape in hub_tensor_shapes(tiny_config(**dims)):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def test_w256_rows_are_whole_k_quant_super_blocks():
    rows = matrix_rows(SHAPES["w256"])
    assert rows and {name: n for name, n in rows.items() if n % 256} == {}


def test_tiny_keeps_widths_that_are_not_multiples_of_256():
    rows = matrix_rows(SHAPES["tiny"])
    assert all(n % 64 == 0 for n in rows.values())
    assert any(n % 256 for n in rows.values())


@pytest.mark.parametrize("key", ["mamba_head_dim", "vocab_size", "hybrid_override_pattern", "n_routed_experts"])
def test_w256_keeps_what_the_real_model_fixes(key):
    assert SHAPES["w256"][key] == SHAPES["tiny"][key]


def test_shapes_have_about_the_same_parameter_count():
    tiny, w256 = parameters(SHAPES["tiny"]), parameters(SHAPES["w256"])
    assert 0.85 < w256 / tiny < 1.15
