"""llama.cpp's own log lines stay out of `nemoq eval`'s tables unless --verbose. Some of them
are printed from C, so only a real process shows what a user sees."""

from __future__ import annotations

import subprocess
import sys


def eval_output(model, tmp_path, *app_options) -> str:
    data = tmp_path / "text.txt"
    data.write_text(" ".join(f"word{i % 97} and more text" for i in range(600)))
    done = subprocess.run([sys.executable, "-m", "nemoq.cli", *app_options, "eval", str(model), "--data", str(data),
                           "--ctx", "64", "--chunks", "2", "--base", str(model)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_eval_prints_no_llama_cpp_log_lines(tiny_gguf_f32, tmp_path):
    output = eval_output(tiny_gguf_f32, tmp_path)
    assert "PPL(model)" in output
    assert [line for line in output.splitlines() if "llama_" in line or "ggml_" in line] == []


def test_verbose_eval_shows_llama_cpp_log_lines(tiny_gguf_f32, tmp_path):
    output = eval_output(tiny_gguf_f32, tmp_path, "--verbose")
    assert "PPL(model)" in output
    assert "llama_kv_cache: the V embeddings have different sizes" in output
    assert "llama_model_loader:" in output


def test_a_model_llama_cpp_cannot_load_is_one_line_with_its_reason(tiny_gguf_f32, tmp_path):
    # Its log is silenced, but not its reason: the error names what llama.cpp said.
    from tests.conftest import run_cli
    from tests.gguf_edit import rewrite_gguf
    broken = tmp_path / "missing-tensor.gguf"
    rewrite_gguf(tiny_gguf_f32, broken, lambda name, t: False if name == "blk.0.ssm_in.weight" else None)
    data = tmp_path / "text.txt"
    data.write_text("some text " * 200)
    result = run_cli("eval", broken, "--data", data, "--ctx", "64")
    assert result.exit_code == 1, result.output
    assert "llama.cpp could not load this model" in result.output
    assert "tensor 'blk.0.ssm_in.weight' not found" in result.output and "Traceback" not in result.output
