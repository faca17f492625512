"""Quantization plans for the family: Super's LatentMoE projections and the MTP block."""

from __future__ import annotations

import re

import numpy as np
import pytest

from nemoq.convert.config import load_config
from nemoq.convert.plan import tensor_specs
from nemoq.gguf_file import read_gguf
from nemoq.quant.recipes import RECIPES, plan_types, summarize
from tests.conftest import ROOT, convert, run_cli
from tests.fixtures.family import write_super
from tests.oracles import llama_logits
from tests.test_convert_golden import random_ids

SUPER = ROOT / "tests" / "data" / "nemotron-3-super"
AT_LEAST_8_BITS = {"q8_0", "f16", "bf16", "f32"}
QUANTIZING = [name for name, r in RECIPES.items() if r.base not in ("f32", "f16", "bf16")]


@pytest.fixture(scope="module")
def super_config():
    return load_config(SUPER)


def test_super_config_has_the_published_size(super_config):
    """~120.6B in the trunk (the "120B" of the name), ~3B more in the MTP block."""
    trunk = summarize(plan_types(tensor_specs(super_config, mtp=False), RECIPES["BF16"], super_config.layer_kinds))
    full = summarize(plan_types(tensor_specs(super_config), RECIPES["BF16"], super_config.layer_kinds))
    assert 120.0e9 < trunk.n_elements < 121.5e9
    assert 2.5e9 < full.n_elements - trunk.n_elements < 3.5e9


def test_dry_run_of_super_prints_nq4_under_4_8_bits():
    result = run_cli("quantize", SUPER, "--recipe", "NQ4", "--dry-run")
    assert result.exit_code == 0, result.output
    bpw = float(re.search(r"NQ4: [\d,]+ weights, .* ([\d.]+) bits per weight", result.output).group(1))
    assert bpw <= 4.8, result.output[-500:]
    assert "blk.88.nextn.eh_proj.weight" in result.output and "blk.1.ffn_latent_down.weight" in result.output


def test_nq4_has_no_fallback_on_super(super_config):
    summary = summarize(plan_types(tensor_specs(super_config), RECIPES["NQ4"], super_config.layer_kinds))
    assert summary.fallback_tensors == 0


@pytest.mark.parametrize("recipe", QUANTIZING)
def test_mtp_block_stays_at_8_bits_or_more(recipe, super_config):
    typed = plan_types(tensor_specs(super_config), RECIPES[recipe], super_config.layer_kinds)
    mtp = [t for t in typed if t.spec.layer == super_config.n_layers]
    assert len(mtp) > 10
    below = [(t.spec.name, t.type) for t in mtp if t.type not in AT_LEAST_8_BITS]
    assert not below, below
    trunk_experts = [t for t in typed if t.spec.name == "blk.1.ffn_up_exps.weight"]
    assert trunk_experts and trunk_experts[0].type not in ("f32",)


@pytest.mark.parametrize("recipe", ["NQ4", "NQ5", "NVFP4"])
def test_nemoq_recipes_keep_latent_projections_at_8_bits(recipe, super_config):
    typed = plan_types(tensor_specs(super_config), RECIPES[recipe], super_config.layer_kinds)
    latent = [t for t in typed if "ffn_latent" in t.spec.name]
    assert len(latent) == 2 * (super_config.layer_kinds.count("moe") + 1)
    assert {t.type for t in latent} == {"q8_0"}


def _relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True)))


def test_quantized_super_runs_in_llama_cpp(tmp_path):
    """One pass from the checkpoint: LatentMoE and MTP tensors typed by the plan, and the file stays
    near the F32 conversion. (This random model amplifies rounding: routed scaling 5 and top-3 of 8
    experts flip choices, so even Q8_0 moves its logits by ~17%; a mis-mapped tensor moves them >100%.)"""
    ckpt = write_super(tmp_path / "ckpt")
    n, vocab = load_config(ckpt).n_layers, load_config(ckpt).vocab
    ids = random_ids(vocab, 64)
    ref = llama_logits(convert(ckpt, tmp_path / "f32.gguf", "--outtype", "f32"), ids)
    for recipe, max_error in (("Q8_0", 0.25), ("NQ4", 0.5)):
        out = tmp_path / f"{recipe}.gguf"
        result = run_cli("quantize", ckpt, "-o", out, "--recipe", recipe)
        assert result.exit_code == 0, result.output
        types = {t.name: t.type_name for t in read_gguf(out).tensors}
        assert types[f"blk.{n}.ffn_up_exps.weight"] == "Q8_0" and types[f"blk.{n}.nextn.eh_proj.weight"] == "Q8_0"
        assert types["blk.1.ffn_latent_down.weight"] == "Q8_0"
        ours = llama_logits(out, ids)
        assert np.isfinite(ours).all() and _relative_error(ours, ref) <= max_error, recipe
    assert types["blk.1.ffn_up_exps.weight"] == "IQ4_NL"


@pytest.mark.parametrize("name", ["super", "lightning", "puzzle"])
def test_quantizing_a_family_gguf_gives_the_checkpoints_file(name, tmp_path):
    """An F32 GGUF of the family (latent widths, the MTP block, Puzzle's per-layer arrays) is read back
    as a source: the same tensors, types and bytes, and the same model keys, as from the checkpoint."""
    from tests.family_reference import WRITERS
    ckpt = WRITERS[name](tmp_path / "ckpt")
    f32 = convert(ckpt, tmp_path / "f32.gguf", "--outtype", "f32")
    files = {}
    for src, out in ((ckpt, "from-ckpt.gguf"), (f32, "from-gguf.gguf")):
        result = run_cli("quantize", src, "-o", tmp_path / out, "--recipe", "NQ4")
        assert result.exit_code == 0, result.output
        files[out] = read_gguf(tmp_path / out)
    a, b = files["from-ckpt.gguf"], files["from-gguf.gguf"]
    assert [(t.name, t.type_name, t.shape) for t in a.tensors] == [(t.name, t.type_name, t.shape) for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert np.array_equal(np.asarray(a.tensor_data(ta.name).data), np.asarray(b.tensor_data(tb.name).data)), ta.name
    model_keys = lambda meta: {k: v for k, v in meta.items() if k.startswith("nemotron_h_moe.")}  # noqa: E731
    assert model_keys(a.metadata) == model_keys(b.metadata)


def test_mtp_tensors_forced_to_a_scaled_format_get_no_scale(tmp_path):
    """llama.cpp skips the MTP block unless asked to load it, and with it any `.scale` beside it:
    such a file would not load. MXFP4 MTP matrices are written without one."""
    from tests.test_calibrated_quantize import finite_logits
    ckpt = write_super(tmp_path / "ckpt")
    n = load_config(ckpt).n_layers
    out = tmp_path / "q.gguf"
    result = run_cli("quantize", ckpt, "-o", out, "--recipe", "MXFP4_MOE", "--tensor-type",
                     rf"blk\.{n}\.(attn_q|attn_output|ffn_up_exps|ffn_up_shexp)\.weight=mxfp4")
    assert result.exit_code == 0, result.output
    types = {t.name: t.type_name for t in read_gguf(out).tensors}
    assert types[f"blk.{n}.attn_q.weight"] == types[f"blk.{n}.ffn_up_exps.weight"] == "MXFP4"
    assert not [name for name in types if name.startswith(f"blk.{n}.") and name.endswith(".scale")]
    assert "blk.1.ffn_up_exps.scale" in types   # the trunk's experts keep theirs
    assert finite_logits(out)
