"""What quantize says about its file, and what the file says about itself: --tensor-type overrides
that change nothing are warnings naming them, general.file_type names a llama.cpp recipe only for
llama.cpp's own mixes (nemoq.recipe names the rest), and a file with `.scale` companions says
which llama.cpp build it needs."""

from __future__ import annotations

import ctypes

import gguf
import pytest

from nemoq.convert.mapping import llama_cpp_build_for
from nemoq.quant.recipes import FALLBACKS, GUESSED_FILE_TYPES
from tests.conftest import ROOT, run_cli

REAL = ROOT / "tests" / "data" / "nemotron-3-nano"
FT = gguf.LlamaFileType


def quantize(model, out, *args):
    result = run_cli("quantize", model, "-o", out, *args)
    assert result.exit_code == 0, result.output
    assert out.exists()
    return result.output


def field(path, key):
    f = gguf.GGUFReader(path).fields.get(key)
    return None if f is None else f.contents()


def types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning:")]


# --tensor-type that changes nothing

def test_tensor_type_on_tensors_kept_f32_is_a_warning_naming_them(tiny_model, tmp_path):
    output = quantize(tiny_model, tmp_path / "a.gguf", "--tensor-type", "norm=q8_0")
    [line] = warnings(output)
    assert "--tensor-type norm=q8_0" in line and "blk.0.attn_norm.weight" in line
    assert "stay F32" in line and "norms, SSM parameters and the router" in line
    assert all(t == "F32" for name, t in types(tmp_path / "a.gguf").items() if "norm" in name)


def test_tensor_type_matching_no_tensor_is_a_warning(tiny_model, tmp_path):
    output = quantize(tiny_model, tmp_path / "a.gguf", "--tensor-type", "ffn_gate_exps=q8_0")
    assert warnings(output) == ["warning: --tensor-type ffn_gate_exps=q8_0 matches no tensor of this model: "
                                "it changes nothing"]


def test_tensor_type_whose_tensors_an_earlier_one_sets_is_a_warning(tiny_model, tmp_path):
    output = quantize(tiny_model, tmp_path / "a.gguf", "--tensor-type", "_exps=q8_0",
                      "--tensor-type", "ffn_up_exps=q4_0")
    [line] = warnings(output)
    assert "--tensor-type ffn_up_exps=q4_0 changes nothing" in line and "earlier --tensor-type" in line
    assert {t for name, t in types(tmp_path / "a.gguf").items() if "_exps" in name} == {"Q8_0"}


def test_a_router_pattern_warns_about_the_router_only(tiny_model, tmp_path):
    """`ffn` matches the F32 router as well as the projections it does retype."""
    output = quantize(tiny_model, tmp_path / "a.gguf", "--tensor-type", "ffn=q8_0")
    [line] = warnings(output)
    assert "ffn_gate_inp.weight" in line and "ffn_up_exps" not in line
    assert types(tmp_path / "a.gguf")["blk.1.ffn_up_exps.weight"] == "Q8_0"


def test_tensor_types_that_apply_warn_nothing(tiny_model, tmp_path):
    output = quantize(tiny_model, tmp_path / "a.gguf", "--tensor-type", "ffn_up_exps=q8_0",
                      "--tensor-type", "norm=f32")
    assert warnings(output) == []


def test_dry_run_warns_the_same(tmp_path):
    result = run_cli("quantize", REAL, "--dry-run", "--tensor-type", "ssm_conv1d=q8_0", "--tensor-type", "mtp=q8_0")
    assert result.exit_code == 0, result.output
    lines = warnings(result.output)
    assert len(lines) == 2 and "blk.0.ssm_conv1d.weight" in lines[0] and "mtp=q8_0 matches no tensor" in lines[1]
    assert list(tmp_path.iterdir()) == []


# general.file_type and nemoq.recipe

@pytest.mark.parametrize("recipe, file_type", [("Q4_K_M", FT.MOSTLY_Q4_K_M), ("MXFP4_MOE", FT.MOSTLY_MXFP4_MOE),
                                               ("Q8_0", FT.MOSTLY_Q8_0)])
def test_llama_cpp_recipes_keep_llama_cpps_file_type(recipe, file_type, tiny_model, tmp_path):
    quantize(tiny_model, tmp_path / "a.gguf", "--recipe", recipe)
    assert field(tmp_path / "a.gguf", "general.file_type") == file_type
    assert field(tmp_path / "a.gguf", "nemoq.recipe") == recipe


@pytest.mark.parametrize("recipe, file_type", [("NQ4", FT.MOSTLY_IQ4_NL), ("NQ5", FT.MOSTLY_Q5_0),
                                               ("NVFP4", FT.MOSTLY_NVFP4)])
def test_nemoq_recipes_are_labelled_as_guessed_from_their_main_type(recipe, file_type, tiny_model, tmp_path):
    """No llama.cpp recipe makes these mixes: the label is what llama.cpp's loader would guess
    from the type holding most weights, with its GUESSED bit; the recipe is in nemoq.recipe."""
    quantize(tiny_model, tmp_path / "a.gguf", "--recipe", recipe)
    assert field(tmp_path / "a.gguf", "general.file_type") == file_type | FT.GUESSED
    assert field(tmp_path / "a.gguf", "nemoq.recipe") == recipe


def test_an_override_that_changes_the_mix_relabels_the_file(tiny_model, tmp_path):
    out = tmp_path / "a.gguf"
    quantize(tiny_model, out, "--recipe", "Q4_K_M", "--tensor-type", "ffn_(up|down)_exps=q8_0")
    assert field(out, "general.file_type") == FT.MOSTLY_Q8_0 | FT.GUESSED   # the experts hold most weights
    assert field(out, "nemoq.recipe") == "Q4_K_M --tensor-type ffn_(up|down)_exps=q8_0"


def test_an_override_that_changes_no_type_keeps_the_recipes_label(tiny_model, tmp_path):
    quantize(tiny_model, tmp_path / "a.gguf", "--recipe", "Q8_0", "--tensor-type", "ffn_up_exps=q8_0")
    assert field(tmp_path / "a.gguf", "general.file_type") == FT.MOSTLY_Q8_0


def test_every_type_a_recipe_writes_has_a_guessed_file_type():
    assert {*FALLBACKS, "f32", "f16", "bf16"} <= set(GUESSED_FILE_TYPES)


def llama_description(path) -> str:
    from llama_cpp import Llama, llama_model_desc
    model = Llama(str(path), verbose=False, n_ctx=64)
    buf = ctypes.create_string_buffer(256)
    llama_model_desc(model._model.model, buf, len(buf))
    model.close()
    return buf.value.decode()


def test_llama_cpp_loads_a_guessed_label_and_shows_it(tiny_model, tmp_path):
    quantize(tiny_model, tmp_path / "nq4.gguf", "--recipe", "NQ4")
    quantize(tiny_model, tmp_path / "q8_0.gguf", "--recipe", "Q8_0")
    description = llama_description(tmp_path / "nq4.gguf")
    assert "IQ4_NL" in description and "(guessed)" in description
    assert "guessed" not in llama_description(tmp_path / "q8_0.gguf")


def test_llama_quantize_copy_keeps_the_labels(tiny_model, tmp_path):
    """What `ollama create` runs on a GGUF (llama-quantize --allow-requantize IN OUT COPY)."""
    import llama_cpp
    quantize(tiny_model, tmp_path / "nq4.gguf", "--recipe", "NQ4")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.only_copy, params.allow_requantize = 2, True, True
    assert llama_cpp.llama_model_quantize(str(tmp_path / "nq4.gguf").encode(), str(tmp_path / "copy.gguf").encode(),
                                          ctypes.byref(params)) == 0
    assert field(tmp_path / "copy.gguf", "general.file_type") == FT.MOSTLY_IQ4_NL | FT.GUESSED
    assert field(tmp_path / "copy.gguf", "nemoq.recipe") == "NQ4"


def test_quantizing_a_gguf_nemoq_wrote_records_the_new_recipe(tiny_model, tmp_path):
    quantize(tiny_model, tmp_path / "f16.gguf", "--recipe", "F16")
    assert field(tmp_path / "f16.gguf", "nemoq.recipe") == "F16"
    quantize(tmp_path / "f16.gguf", tmp_path / "nq4.gguf", "--recipe", "NQ4")
    assert field(tmp_path / "nq4.gguf", "nemoq.recipe") == "NQ4"


# `.scale` companions

def test_fp4_recipes_write_scale_companions_by_default_and_say_which_llama_cpp_needs_them(tiny_model, tmp_path):
    output = quantize(tiny_model, tmp_path / "a.gguf", "--recipe", "MXFP4_MOE")
    scales = [name for name in types(tmp_path / "a.gguf") if name.endswith(".scale")]
    assert scales and all("_exps" in name for name in scales)
    line = f"this file carries {len(scales)} .scale tensor(s): it needs llama.cpp b8372 or newer"
    assert line in " ".join(output.split())
    assert "--no-tensor-scales writes the file without them" in " ".join(output.split())


def test_no_tensor_scales_writes_none_and_says_nothing_of_llama_cpp(tiny_model, tmp_path):
    output = quantize(tiny_model, tmp_path / "a.gguf", "--recipe", "NVFP4", "--no-tensor-scales")
    assert not any(name.endswith(".scale") for name in types(tmp_path / "a.gguf"))
    assert "needs llama.cpp" not in output


def test_files_without_fp4_say_nothing_of_llama_cpp(tiny_model, tmp_path):
    assert "needs llama.cpp" not in quantize(tiny_model, tmp_path / "a.gguf", "--recipe", "NQ4")


def test_dry_run_says_which_llama_cpp_the_planned_scales_need():
    result = run_cli("quantize", REAL, "--recipe", "NVFP4", "--dry-run")
    assert "the file will carry" in result.output and "b8372 or newer" in result.output
    # attention `.scale` came later to llama.cpp's nemotron_h graph than the experts' and Mamba's
    result = run_cli("quantize", REAL, "--recipe", "NVFP4", "--dry-run", "--tensor-type", "attn_q=nvfp4")
    assert "b8827 or newer" in result.output


def test_the_build_a_file_needs_is_its_latest_scale_kind():
    assert llama_cpp_build_for(["blk.0.ssm_in.weight", "token_embd.weight"]) == 0
    assert llama_cpp_build_for(["blk.1.ffn_up_exps.scale", "blk.0.ssm_out.scale", "blk.1.ffn_down_shexp.scale"]) == 8372
    assert llama_cpp_build_for(["blk.1.ffn_up_exps.scale", "blk.5.attn_output.scale"]) == 8827
    assert llama_cpp_build_for(["blk.1.ffn_up_exps.input_scale"]) == 8827


def test_convert_of_a_modelopt_nvfp4_checkpoint_says_which_llama_cpp_its_scales_need(tmp_path):
    """NVIDIA's weight_scale_2 that does not fold becomes `.scale` (and input_scale `.input_scale`)."""
    pytest.importorskip("torch")
    from tests.fixtures.modelopt import write_modelopt_checkpoint
    ckpt = write_modelopt_checkpoint(tmp_path / "ckpt", scale_2="realistic")
    result = run_cli("convert", ckpt, "-o", tmp_path / "a.gguf")
    assert result.exit_code == 0, result.output
    names = types(tmp_path / "a.gguf")
    assert any(n.endswith(".input_scale") for n in names)
    scales = [n for n in names if n.endswith((".scale", ".input_scale"))]
    assert f"this file carries {len(scales)} .scale tensor(s): it needs llama.cpp b8827 or newer" in \
        " ".join(result.output.split())
    assert "--no-tensor-scales" not in result.output   # a quantize option
