"""`nemoq calibrate` end to end: the file, its names, quantize --imatrix, and data errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nemoq.calib.imatrix_file import read_imatrix
from nemoq.convert.pipeline import open_source
from tests.conftest import run_cli

SMALL = ("--tokens", "1024", "--ctx", "256")


@pytest.fixture(scope="module")
def tiny_imatrix(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("calib") / "imatrix.gguf"
    result = run_cli("calibrate", tiny_model, "-o", out, *SMALL)
    assert result.exit_code == 0, result.output
    return out, result.output


def quantized_matrices(src) -> set[str]:
    """Every matrix quantize would weight with an imatrix, except token_embd (a row lookup, no matmul:
    llama-imatrix collects nothing for it either)."""
    return {t.name for t in open_source(src).plan.tensors
            if len(t.shape) >= 2 and not t.keep_f32 and t.name != "token_embd.weight"}


def test_calibrate_writes_an_imatrix_quantize_accepts(tiny_imatrix, tiny_model, tmp_path):
    path, output = tiny_imatrix
    im = read_imatrix(path)
    assert set(im.sums) == quantized_matrices(tiny_model)
    assert (im.chunk_count, im.chunk_size, im.datasets) == (4, 256, ["nemoq-corpus:train"])
    assert im.counts["blk.0.ssm_in.weight"][0] == 1024 and im.counts["output.weight"][0] == 1024
    experts = im.counts["blk.1.ffn_down_exps.weight"]
    assert experts.shape == (8,) and experts.sum() == 1024 * 2
    assert "calibration tokens per routed expert" in output
    result = run_cli("quantize", tiny_model, "-o", tmp_path / "q.gguf", "--recipe", "Q4_K_M", "--imatrix", path)
    assert result.exit_code == 0, result.output
    assert "does not match" not in result.output and "token_embd.weight" in result.output  # the only uncovered one


def test_gguf_source_calibrates_like_its_checkpoint(tiny_imatrix, tiny_gguf_f32, tmp_path):
    out = tmp_path / "from-gguf.gguf"
    result = run_cli("calibrate", tiny_gguf_f32, "-o", out, *SMALL)
    assert result.exit_code == 0, result.output
    ours, reference = read_imatrix(out), read_imatrix(tiny_imatrix[0])
    assert set(ours.sums) == set(reference.sums)
    for name in reference.sums:
        np.testing.assert_array_equal(ours.counts[name], reference.counts[name])
        np.testing.assert_allclose(ours.sums[name], reference.sums[name], rtol=1e-4, atol=1e-6)


def test_calibrate_from_a_jsonl_of_chats_and_text(tiny_model, tmp_path):
    from nemoq.calib.corpus import iter_records
    records = [{"messages": list(r.messages)} if r.messages else {"text": r.text} for r in iter_records("val")]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    result = run_cli("calibrate", tiny_model, "-o", tmp_path / "im.gguf", "--data", data, *SMALL)
    assert result.exit_code == 0, result.output
    assert read_imatrix(tmp_path / "im.gguf").datasets == [str(data)]


def test_calibrate_refuses_to_overwrite(tiny_imatrix, tiny_model):
    result = run_cli("calibrate", tiny_model, "-o", tiny_imatrix[0], *SMALL)
    assert result.exit_code == 1 and "--force" in result.output


@pytest.mark.parametrize("case, content, message", [
    ("empty", b"", "calibration data is empty"),
    ("short", b"Only a few words of text.", "too little calibration text: found"),
    ("latin-1", "Grüße aus Köln, ça va très bien.\n".encode("latin-1") * 50, "not UTF-8"),
])
def test_bad_calibration_data_is_one_clear_error(case, content, message, tiny_model, tmp_path):
    data = tmp_path / f"{case}.txt"
    data.write_bytes(content)
    out = tmp_path / "im.gguf"
    result = run_cli("calibrate", tiny_model, "-o", out, "--data", data, "--ctx", "256")
    assert result.exit_code == 1, result.output
    assert message in result.output and data.name in result.output
    assert "Traceback" not in result.output and not out.exists()
    if case == "short":
        assert "need at least 256" in result.output


def llama_quantize_with(gguf_path, out, imatrix, ftype: int = 15) -> tuple[int, str]:
    """llama.cpp's llama_model_quantize (Q4_K_M) given our statistics as llama-quantize passes them:
    per tensor the mean x^2 (in_sum2 / counts), experts concatenated. Returns (rc, llama.cpp's log)."""
    import ctypes

    import llama_cpp
    logs = []
    callback = llama_cpp.llama_log_callback(lambda level, text, user: logs.append(text.decode(errors="replace")))
    llama_cpp.llama_log_set(callback, None)
    means = [(name, (imatrix.sums[name] / np.maximum(imatrix.counts[name], 1)[:, None]).astype(np.float32).reshape(-1))
             for name in sorted(imatrix.sums)]
    entries = [llama_cpp.llama_model_imatrix_data(n.encode(), m.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), m.size)
               for n, m in means] + [llama_cpp.llama_model_imatrix_data(None, None, 0)]
    array = (llama_cpp.llama_model_imatrix_data * len(entries))(*entries)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = 2, ftype
    params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    try:
        rc = llama_cpp.llama_model_quantize(str(gguf_path).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        from llama_cpp import _logger   # llama-cpp-python's own handler, as it installs it
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    return rc, "".join(logs)


def test_llama_cpp_quantizer_finds_our_statistics(tiny_imatrix, tiny_gguf_f32, tmp_path):
    im = read_imatrix(tiny_imatrix[0])
    rc, log = llama_quantize_with(tiny_gguf_f32, tmp_path / "q.gguf", im)
    assert rc == 0, log
    missing = sorted({line.split()[-1] for line in log.splitlines() if "did not find weights for" in line})
    assert missing == ["token_embd.weight"]
    im.sums["blk.0.ssm_in.weight"] = im.sums["blk.0.ssm_in.weight"][:, :-64]   # llama.cpp checks every size
    rc, log = llama_quantize_with(tiny_gguf_f32, tmp_path / "bad.gguf", im)
    assert rc != 0 and "imatrix size 256 is different from tensor size 320" in log
