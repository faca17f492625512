"""Per-matrix `.scale` tensors of the FP4 formats: encoding, sizes, and what llama.cpp does with them."""

from __future__ import annotations

import numpy as np
import pytest

from nemoq import kernels_c
from nemoq.quant.encodings import BLOCK_ENCODINGS
from nemoq.quant.tensor_scale import SCALE_RULES, ScaledEncoding, best_scale, candidate_errors, matrix_scale
from tests.conftest import run_cli
from tests.gguf_edit import dequantized, rewrite_gguf


def experts(n=3, rows=32, cols=128, std=0.01, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, rows, cols)).astype(np.float32) * std
    x *= np.float32(1) + np.arange(n, dtype=np.float32)[:, None, None]   # a different scale per expert
    return x


def encode_in_chunks(fmt, x, chunk_rows, importance=None):
    enc = ScaledEncoding(BLOCK_ENCODINGS[fmt], x.shape, importance)
    rows = x.reshape(-1, x.shape[-1])
    out = [enc.encode(rows[i:i + chunk_rows], "F32") for i in range(0, rows.shape[0], chunk_rows)]
    return np.concatenate(out), enc.scales


@pytest.mark.parametrize("fmt", sorted(SCALE_RULES))
def test_chunking_does_not_change_the_bytes_or_scales(fmt):
    x = experts()
    whole, scales = encode_in_chunks(fmt, x, x.shape[0] * x.shape[1])
    for chunk_rows in (5, 32, 45):   # chunks that end inside, at and across expert boundaries
        data, s = encode_in_chunks(fmt, x, chunk_rows)
        np.testing.assert_array_equal(data, whole)
        np.testing.assert_array_equal(s, scales)


@pytest.mark.parametrize("fmt", sorted(SCALE_RULES))
def test_each_matrix_is_quantized_divided_by_its_own_scale(fmt):
    x = experts()
    data, scales = encode_in_chunks(fmt, x, 7)
    assert len(set(scales.tolist())) == 3   # one per expert
    base = BLOCK_ENCODINGS[fmt]
    for e in range(3):
        expected = base.quantize(x[e] / scales[e])
        np.testing.assert_array_equal(data.reshape(3, 32, -1)[e], expected)
        y = BLOCK_ENCODINGS[fmt].dequantize(data.reshape(3, 32, -1)[e]) * scales[e]
        assert np.abs(y - x[e]).max() <= 0.5 * np.abs(x[e]).max()


def test_nvfp4_scale_is_the_power_of_two_below_modelopts():
    x = experts(n=1)[0]
    assert matrix_scale(x, 6 * 448) == np.float32(np.abs(x).max() / (6 * 448))
    assert matrix_scale(np.zeros_like(x), 6 * 448) == 1
    chosen = best_scale(BLOCK_ENCODINGS["nvfp4"], x, None, SCALE_RULES["nvfp4"])
    assert np.log2(chosen) == np.floor(np.log2(chosen))
    assert matrix_scale(x, 6 * 448) / 2 < chosen <= matrix_scale(x, 6 * 448)


def test_nvfp4_with_small_weights_is_more_accurate_with_a_tensor_scale():
    # |w| ~ 0.01: without a tensor scale, max/6 per block is an E4M3 subnormal (< 2^-6)
    x = experts(n=1, rows=64, cols=256, std=0.002)[0]
    base = BLOCK_ENCODINGS["nvfp4"]
    plain = np.square(base.dequantize(base.quantize(x)) - x).sum()
    data, scales = encode_in_chunks("nvfp4", x[None], 64)
    scaled = np.square(base.dequantize(data) * scales[0] - x).sum()
    assert scaled < 0.7 * plain


def test_mxfp4_scale_search_is_no_worse_than_the_octave_start():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    w = np.exp(rng.uniform(-3, 3, 256)).astype(np.float32)
    base, rule = BLOCK_ENCODINGS["mxfp4"], SCALE_RULES["mxfp4"]

    def error(scale):
        return float((np.square(base.dequantize(base.quantize(x / scale, w)) * scale - x) * w).sum())
    chosen = best_scale(base, x, w, rule)
    candidates = [matrix_scale(x, rule.full_scale) * 2.0 ** (-k / rule.factors) for k in range(rule.factors)]
    assert error(chosen) == pytest.approx(min(error(np.float32(c)) for c in candidates))


@pytest.mark.parametrize("fmt", sorted(kernels_c.SCALE_SEARCH_FORMATS))
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
def test_c_scale_search_errors_equal_numpys(fmt, weighted, monkeypatch):
    """kernels_c.scale_errors (row by row in C) == the numpy search's errors, and so the same scale."""
    if not kernels_c.available(fmt):
        pytest.skip("C kernels unavailable")
    rng = np.random.default_rng(5)
    rows = (rng.standard_t(3, (24, 192)) * 0.02).astype(np.float32)
    w = np.exp(rng.uniform(-3, 3, 192)).astype(np.float32) if weighted else None
    scales = (np.float32(0.01) * 2.0 ** (-np.arange(16) / 16)).astype(np.float32)
    base = BLOCK_ENCODINGS[fmt]
    c_errors = candidate_errors(base, rows, scales, w)
    per_row = kernels_c.scale_errors(fmt, rows, scales, w, threads=3)
    np.testing.assert_array_equal(per_row, kernels_c.scale_errors(fmt, rows, scales, w, threads=1))
    monkeypatch.setattr(kernels_c, "SCALE_SEARCH_FORMATS", {})   # the numpy search
    numpy_errors = candidate_errors(base, rows, scales, w)
    np.testing.assert_allclose(c_errors, numpy_errors, rtol=1e-12)
    assert np.argmin(c_errors) == np.argmin(numpy_errors)


@pytest.mark.parametrize("recipe", ["NVFP4", "MXFP4_MOE"])
def test_llama_cpp_applies_the_scales_as_nemoq_writes_them(recipe, tiny_model, tmp_path):
    """The quantized file runs in llama.cpp like an F32 file holding dequantized values times
    the scales, and unlike one holding the values without them."""
    from tests.oracles import llama_logits
    q = tmp_path / "q.gguf"
    assert run_cli("quantize", tiny_model, "-o", q, "--recipe", recipe).exit_code == 0
    import gguf
    tensors = {t.name: t for t in gguf.GGUFReader(q).tensors}
    scaled = {n.removesuffix(".scale") + ".weight" for n in tensors if n.endswith(".scale")}
    assert scaled and all(tensors[n].tensor_type.name in ("NVFP4", "MXFP4") for n in scaled)

    def as_f32(apply_scale):
        def edit(name, t):
            if name.endswith(".scale"):
                return False
            if name not in scaled:
                return None
            values = dequantized(t)
            scale = np.asarray(tensors[name.removesuffix(".weight") + ".scale"].data, dtype=np.float32)
            return values * (scale.reshape(-1, 1, 1) if values.ndim == 3 else scale) if apply_scale else values
        return edit
    rewrite_gguf(q, tmp_path / "with.gguf", as_f32(True))
    rewrite_gguf(q, tmp_path / "without.gguf", as_f32(False))
    ids = [1] + list(range(20, 84))
    ours, with_, without = (llama_logits(p, ids) for p in (q, tmp_path / "with.gguf", tmp_path / "without.gguf"))
    close, far = np.abs(ours - with_).max(), np.abs(ours - without).max()
    assert close < 0.1 * far, (close, far)
    assert (ours.argmax(-1) == with_.argmax(-1)).mean() >= 0.95


def test_no_tensor_scales_writes_plain_blocks(tiny_model, tmp_path):
    from nemoq.gguf_file import read_gguf
    out = tmp_path / "plain.gguf"
    assert run_cli("quantize", tiny_model, "-o", out, "--recipe", "NVFP4", "--no-tensor-scales").exit_code == 0
    assert not [t.name for t in read_gguf(out).tensors if t.name.endswith(".scale")]


def test_dry_run_counts_the_scale_bytes(tiny_model):
    from nemoq.convert.config import load_config
    from nemoq.convert.plan import tensor_specs
    from nemoq.quant.recipes import RECIPES, plan_types, summarize
    config = load_config(tiny_model)
    with_scales = summarize(plan_types(tensor_specs(config), RECIPES["NVFP4"], config.layer_kinds))
    without = summarize(plan_types(tensor_specs(config), RECIPES["NVFP4"], config.layer_kinds, tensor_scales=False))
    n_scales = sum((s.shape[0] if len(s.shape) == 3 else 1) for s in tensor_specs(config)
                   if s.name in {t.spec.name for t in plan_types(tensor_specs(config), RECIPES["NVFP4"],
                                                                    config.layer_kinds) if t.type == "nvfp4"})
    assert with_scales.total_bytes - without.total_bytes == 4 * n_scales > 0


def test_output_and_embeddings_in_fp4_get_no_scale_and_still_load(tiny_model, tmp_path):
    """llama.cpp refuses `output.scale` and ignores a `token_embd.scale`: those stay plain blocks."""
    from nemoq.gguf_file import read_gguf
    from tests.oracles import llama_logits
    out = tmp_path / "fp4-head.gguf"
    result = run_cli("quantize", tiny_model, "-o", out, "--recipe", "NVFP4",
                     "--tensor-type", "^output\\.weight|token_embd=nvfp4")
    assert result.exit_code == 0, result.output
    types = {t.name: t.type_name for t in read_gguf(out).tensors}
    assert types["output.weight"] == types["token_embd.weight"] == "NVFP4"
    assert "output.scale" not in types and "token_embd.scale" not in types
    assert "blk.1.ffn_up_exps.scale" in types
    assert np.isfinite(llama_logits(out, [1, 20, 21, 22])).all()
