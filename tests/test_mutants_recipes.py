"""Recipe helpers that mutation testing (docs/mutation.md) found untested, against llama.cpp's
rules (llama_tensor_get_type, tensor_type_fallback) and the documented --tensor-type syntax."""

from __future__ import annotations

import pytest

from nemoq.quant.recipes import parse_override, use_more_bits


def test_use_more_bits_is_llama_cpps_for_nano():
    """llama.cpp's use_more_bits(i, 52) for Nemotron 3 Nano's 52 layers, written out: the first
    six (52 / 8), the last seven (from 7 * 52 / 8 = 45) and every third between, from 8."""
    chosen = [i for i in range(52) if use_more_bits(i, 52)]
    assert chosen == [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 44, 45, 46, 47, 48, 49, 50, 51]


def test_tensor_type_override_syntax():
    assert parse_override("ffn_up_exps=Q8_0") == ("ffn_up_exps", "q8_0")
    assert parse_override("a=b=F16") == ("a=b", "f16")   # the type follows the last '='
    for bad in ("ffn_up_exps", "=q8_0", "ffn_up_exps=q3_k", "ffn_up_exps="):
        with pytest.raises(ValueError, match="expected REGEX=TYPE"):
            parse_override(bad)
