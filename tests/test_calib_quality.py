"""What calibration is for: the trained model quantized with nemoq's own importance matrix
is closer to its F16 than without one, measured by nemoq eval (llama.cpp) on held-out text."""

from __future__ import annotations

import json

from tests.conftest import convert, run_cli


RECIPE = "IQ4_NL"   # 4.5 bits: Q4_K_M of this model is mostly Q5_0, where importance moves the KLD by less than the noise


def test_imatrix_lowers_the_kld_of_a_4_bit_file_on_the_trained_model(tiny_model, tmp_path):
    from tests.fixtures.corpus import load_texts
    held_out = tmp_path / "held-out.txt"   # calibration reads the training split (the default)
    held_out.write_text("\n\n".join(load_texts("val")), encoding="utf-8")
    imatrix = tmp_path / "imatrix.gguf"
    result = run_cli("calibrate", tiny_model, "-o", imatrix, "--tokens", 32768)
    assert result.exit_code == 0, result.output
    f16 = convert(tiny_model, tmp_path / "f16.gguf", "--outtype", "f16")
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    assert run_cli("quantize", f16, "-o", plain, "--recipe", RECIPE).exit_code == 0
    assert run_cli("quantize", f16, "-o", weighted, "--recipe", RECIPE, "--imatrix", imatrix).exit_code == 0
    # the whole held-out split (~46 chunks): fewer chunks are too noisy for a 5% difference
    result = run_cli("eval", "--compare", plain, weighted, "--base", f16, "--data", held_out, "--ctx", 256,
                     "--json", tmp_path / "compare.json")
    assert result.exit_code == 0, result.output
    without, with_ = (m["kld"]["kld_mean"] for m in json.loads((tmp_path / "compare.json").read_text())["models"])
    assert with_ < 0.98 * without, (with_, without)
