"""`nemoq quantize --calibrate`: the same file as plain quantize tensor for tensor, rounded with
error compensation; lower KLD on the trained model; the imatrix it writes is `nemoq calibrate`'s;
bad combinations and interruptions."""

from __future__ import annotations

import json
import re
import signal

import numpy as np
import pytest

from nemoq.calib.imatrix_file import read_imatrix
from nemoq.gguf_file import read_gguf
from nemoq.quant.recipes import RECIPES, plan_types
from tests.conftest import convert, run_cli
from tests.fixtures.checkpoints import write_checkpoint
from tests.test_output_safety import assert_one_line_interrupted, start_nemoq, stop_with, wait_for

SMALL = ("--tokens", "2048", "--ctx", "256")
# every width a multiple of 256: k-quants, NVFP4 and MXFP4 all take their own types
WIDE = dict(hidden_size=256, head_dim=64, mamba_head_dim=64, moe_intermediate_size=256,
            moe_shared_expert_intermediate_size=256, intermediate_size=256)


@pytest.fixture(scope="module")
def wide_random(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("wide"), layout="hub", dtype="float32", config_overrides=WIDE)


def tensor_table(path) -> list[tuple[str, tuple[int, ...], str]]:
    return [(t.name, tuple(t.shape), t.type_name) for t in read_gguf(path).tensors]


def finite_logits(path) -> bool:
    from nemoq.eval.model import LlamaModel
    with LlamaModel(path, 64) as model:
        return bool(np.isfinite(model.scored_logprobs(list(range(1, 33)), 16)).all())


@pytest.mark.parametrize("recipe", ["Q4_K_M", "NVFP4", "MXFP4_MOE"])
def test_calibrated_file_is_the_plain_plan_tensor_for_tensor(recipe, wide_random, tmp_path):
    plain, calibrated = tmp_path / "plain.gguf", tmp_path / "calibrated.gguf"
    assert run_cli("quantize", wide_random, "-o", plain, "--recipe", recipe).exit_code == 0
    result = run_cli("quantize", wide_random, "-o", calibrated, "--recipe", recipe, "--calibrate", *SMALL)
    assert result.exit_code == 0, result.output
    assert "output error" in result.output and "compensated" in result.output
    table = tensor_table(calibrated)
    assert table == tensor_table(plain)
    ours, theirs = read_gguf(calibrated).metadata, read_gguf(plain).metadata
    assert ours.pop("nemoq.recipe") == f"{recipe} --calibrate" and theirs.pop("nemoq.recipe") == recipe
    assert ours == theirs                 # general.file_type included
    from nemoq.convert.pipeline import open_source
    source = open_source(wide_random)
    typed = {t.spec.name: t.type for t in plan_types([t.spec for t in source.plan.tensors], RECIPES[recipe],
                                                      source.layer_kinds)}
    assert {name: kind for name, _, kind in table if name in typed} == {n: t.upper() for n, t in typed.items()}
    wanted = {"Q4_K_M": "Q4_K", "NVFP4": "NVFP4", "MXFP4_MOE": "MXFP4"}[recipe]
    assert wanted in {kind for _, _, kind in table}
    plain_data, calibrated_data = tensor_data(plain), tensor_data(calibrated)
    quantized = [name for name, _, kind in table if kind not in ("F32", "F16", "BF16")]
    changed = [name for name in quantized if not np.array_equal(plain_data[name], calibrated_data[name])]
    assert set(changed) == set(quantized)   # token_embd too: through layer 0's input matrices
    assert finite_logits(calibrated)


def test_tied_embeddings_are_rounded_as_plain_quantize_rounds_them(tmp_path):
    """Without output.weight token_embd is the output head too: layer 0's H does not describe its
    error, so it keeps plain rounding while every other quantized tensor is compensated."""
    tied = write_checkpoint(tmp_path / "tied", dtype="float32", config_overrides={"tie_word_embeddings": True})
    plain, calibrated = tmp_path / "plain.gguf", tmp_path / "calibrated.gguf"
    assert run_cli("quantize", tied, "-o", plain, "--recipe", "IQ4_NL").exit_code == 0
    result = run_cli("quantize", tied, "-o", calibrated, "--recipe", "IQ4_NL", "--calibrate", *SMALL)
    assert result.exit_code == 0, result.output
    ours, theirs = tensor_data(calibrated), tensor_data(plain)
    assert "output.weight" not in ours
    assert np.array_equal(ours["token_embd.weight"], theirs["token_embd.weight"])
    assert not np.array_equal(ours["blk.0.ssm_in.weight"], theirs["blk.0.ssm_in.weight"])


def tensor_data(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for r in read_gguf(path).readers for t in r.tensors}


def test_calibrate_from_an_f32_gguf(random_hub_gguf, tmp_path):
    out = tmp_path / "from-gguf.gguf"
    result = run_cli("quantize", random_hub_gguf, "-o", out, "--recipe", "Q8_0", "--calibrate", *SMALL)
    assert result.exit_code == 0, result.output
    assert "Q8_0" in {kind for _, _, kind in tensor_table(out)}
    assert finite_logits(out)


def test_few_tokens_per_expert_fall_back_and_say_so(random_hub, tmp_path):
    # 128 tokens, top-2 of 8 experts: ~32 tokens per expert, under compensate's 64-token floor
    result = run_cli("quantize", random_hub, "-o", tmp_path / "q.gguf", "--recipe", "Q8_0", "--calibrate",
                     "--tokens", "128", "--ctx", "64")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert re.search(r"fallback blk\.1\.ffn_up_exps\.weight: importance-weighted rounding \(\d of 8 experts "
                     r"\(#\d[^)]*\): fewer than 64 tokens\)", text), result.output
    assert "fallback blk.0.ssm_in" not in text   # 128 tokens: compensated, more damped


def test_an_expert_no_token_reaches_is_rounded_and_reported(tmp_path):
    import safetensors.torch
    ckpt = write_checkpoint(tmp_path / "ckpt", layout="hub", dtype="float32")
    bias = "backbone.layers.1.mixer.gate.e_score_correction_bias"
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][bias]
    tensors = safetensors.torch.load_file(shard)
    tensors[bias][3] = -100.0             # the router never picks expert 3 of layer 1
    safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    out, imatrix = tmp_path / "q.gguf", tmp_path / "imatrix.gguf"
    result = run_cli("quantize", ckpt, "-o", out, "--recipe", "Q8_0", "--calibrate", *SMALL, "--imatrix-out", imatrix)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for name in ("ffn_up_exps", "ffn_down_exps"):
        assert f"fallback blk.1.{name}.weight: importance-weighted rounding (1 of 8 experts (#3): no calibration " \
               "input (H = 0))" in text, result.output
    assert read_imatrix(imatrix).counts["blk.1.ffn_up_exps.weight"][3] == 0
    assert finite_logits(out)


@pytest.fixture(scope="module")
def trained_files(tmp_path_factory, tiny_model):
    """The trained model as F32, quantized plainly and with --calibrate (and its --imatrix-out)."""
    work = tmp_path_factory.mktemp("trained")
    f32 = convert(tiny_model, work / "f32.gguf", "--outtype", "f32")
    files = {"f32": f32, "plain": work / "plain.gguf", "calibrated": work / "calibrated.gguf",
             "imatrix": work / "imatrix.gguf"}
    assert run_cli("quantize", tiny_model, "-o", files["plain"], "--recipe", "IQ4_NL").exit_code == 0
    result = run_cli("quantize", tiny_model, "-o", files["calibrated"], "--recipe", "IQ4_NL", "--calibrate",
                     "--tokens", "8192", "--imatrix-out", files["imatrix"])
    assert result.exit_code == 0, result.output
    return files


def test_calibration_lowers_the_kld_of_the_trained_model(trained_files, tmp_path):
    from tests.fixtures.corpus import load_texts
    held_out = tmp_path / "held-out.txt"   # calibration reads the training split (the default)
    held_out.write_text("\n\n".join(load_texts("val")), encoding="utf-8")
    result = run_cli("eval", "--compare", trained_files["plain"], trained_files["calibrated"], "--base",
                     trained_files["f32"], "--data", held_out, "--ctx", 256, "--chunks", 24,
                     "--json", tmp_path / "compare.json")
    assert result.exit_code == 0, result.output
    plain, calibrated = (m["kld"]["kld_mean"] for m in json.loads((tmp_path / "compare.json").read_text())["models"])
    assert calibrated < 0.92 * plain, (calibrated, plain)   # 0.80-0.84 measured on 16 and 46 chunks
    assert tensor_table(trained_files["calibrated"]) == tensor_table(trained_files["plain"])


def test_imatrix_out_is_what_calibrate_writes_on_the_same_tokens(trained_files, tiny_model, tmp_path):
    reference = tmp_path / "reference.gguf"
    assert run_cli("calibrate", tiny_model, "-o", reference, "--tokens", "8192").exit_code == 0
    ours, theirs = read_imatrix(trained_files["imatrix"]), read_imatrix(reference)
    assert (ours.datasets, ours.chunk_count, ours.chunk_size) == (theirs.datasets, theirs.chunk_count, theirs.chunk_size)
    assert set(ours.sums) == set(theirs.sums)
    for name in theirs.sums:
        np.testing.assert_array_equal(ours.counts[name], theirs.counts[name])
        np.testing.assert_allclose(ours.sums[name], theirs.sums[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("case, extra, message", [
    ("dry run", ("--calibrate", "--dry-run"), "--dry-run plans without reading weights"),
    ("imatrix", ("--calibrate", "--imatrix", "IMATRIX"), "--calibrate computes its own statistics"),
    ("quantized source", ("--calibrate",), "already quantized"),
    ("options without it", ("--data", "DATA", "--tokens", "512"), "--data, --tokens only go with --calibrate"),
])
def test_bad_combinations_are_one_error_line(case, extra, message, random_hub, random_hub_gguf, tmp_path):
    src = random_hub
    if case == "quantized source":
        src = tmp_path / "q8.gguf"
        assert run_cli("quantize", random_hub_gguf, "-o", src, "--recipe", "Q8_0").exit_code == 0
    (tmp_path / "imatrix.gguf").write_bytes(b"")
    (tmp_path / "data.txt").write_text("some text\n")
    extra = [str(tmp_path / "imatrix.gguf") if a == "IMATRIX" else str(tmp_path / "data.txt") if a == "DATA" else a
             for a in extra]
    before = set(tmp_path.iterdir())
    out = tmp_path / "out.gguf"
    result = run_cli("quantize", src, "-o", out, "--recipe", "Q4_K_M", *extra)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert set(tmp_path.iterdir()) == before


def test_sigterm_during_calibrated_quantize_leaves_nothing(tiny_model, tmp_path):
    out, imatrix = tmp_path / "q.gguf", tmp_path / "imatrix.gguf"
    proc = start_nemoq("quantize", tiny_model, "-o", out, "--recipe", "IQ4_NL", "--calibrate", "--imatrix-out", imatrix)
    # the writer's partial folder appears before the walk starts (65536 tokens: ~30 s on 2 cores)
    wait_for(proc, lambda: any(".partial-" in p.name for p in tmp_path.iterdir()))
    code, err = stop_with(proc, signal.SIGTERM, still_busy=lambda: not out.exists())
    assert code == 143, err
    assert_one_line_interrupted(err, "SIGTERM")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def feeds_files(tmp_path_factory, wide_random):
    from nemoq.calib.calibrated import quantize_calibrated
    from nemoq.calib.walk import FEEDS
    work = tmp_path_factory.mktemp("feeds")
    files = {}
    for feed in FEEDS:
        files[feed] = work / f"{feed}.gguf"
        result = quantize_calibrated(wide_random, files[feed], RECIPES["Q4_K_M"], tokens=2048, ctx=256, feeds=feed)
        assert result.feeds == feed
    return files


def test_every_feed_makes_the_same_plan_with_other_bytes(feeds_files):
    """Sequential inputs differ from full-precision ones after the first rounded matrix; the
    asymmetric targets differ from sequential rounding wherever the inputs were bent."""
    tables = {feed: tensor_table(path) for feed, path in feeds_files.items()}
    assert len({repr(t) for t in tables.values()}) == 1
    data = {feed: tensor_data(path) for feed, path in feeds_files.items()}
    quantized = [name for name, _, kind in tables["asymmetric"] if kind not in ("F32", "F16", "BF16")]
    for a, b in (("sequential", "full-precision"), ("asymmetric", "sequential")):
        differ = [name for name in quantized if not np.array_equal(data[a][name], data[b][name])]
        assert "blk.1.ffn_down_exps.weight" in differ and "output.weight" in differ, (a, b, differ)
    assert all(finite_logits(path) for path in feeds_files.values())


def test_an_unknown_feed_is_refused(wide_random, tmp_path):
    from nemoq.calib.calibrated import quantize_calibrated
    with pytest.raises(ValueError, match="feeds"):
        quantize_calibrated(wide_random, tmp_path / "x.gguf", RECIPES["Q4_K_M"], tokens=2048, ctx=256, feeds="both")
    assert not (tmp_path / "x.gguf").exists()
