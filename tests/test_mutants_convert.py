"""The converter's name and metadata helpers, as mutation testing (docs/mutation.md) found them
untested: against llama.cpp's tensor names and GGUF keys as gguf-py spells them, and the A
transform against llama.cpp's converter (`-torch.exp(A_log)` in float32)."""

from __future__ import annotations

import numpy as np
import torch
from gguf import MODEL_TENSOR

from nemoq.convert.mapping import ROWS_BY_LAYER_KIND, TAIL_ROWS, Row, llama_cpp_build_for, neg_exp


def test_neg_exp_is_llama_cpps_a_transform_in_float32():
    a_log = np.array([[-3.0, -0.5, 0.0], [0.25, 1.0, 2.5]], np.float32)
    ours = neg_exp(a_log)
    theirs = (-torch.exp(torch.from_numpy(a_log).double())).float().numpy()   # exact exp, rounded once
    assert ours.shape == a_log.shape and ours.dtype == np.float32
    assert (ours == theirs).all()
    assert (np.abs(ours - (-torch.exp(torch.from_numpy(a_log))).numpy()) <= np.spacing(np.abs(ours))).all()


def test_gguf_names_are_llama_cpps():
    """The names llama.cpp's nemotron_h_moe loader looks up (llama-arch.cpp)."""
    a = next(r for r in ROWS_BY_LAYER_KIND["mamba"] if r.tensor == MODEL_TENSOR.SSM_A)
    conv_bias = next(r for r in ROWS_BY_LAYER_KIND["mamba"] if r.suffix == "bias")
    assert a.gguf_name(7) == "blk.7.ssm_a"
    assert conv_bias.gguf_name(0) == "blk.0.ssm_conv1d.bias"
    assert TAIL_ROWS[-1].gguf_name(None) == "output.weight"
    assert Row("x", MODEL_TENSOR.FFN_DOWN_EXP, "weight", ()).gguf_name(12) == "blk.12.ffn_down_exps.weight"


def test_the_llama_cpp_build_is_the_newest_any_scale_needs():
    assert llama_cpp_build_for([]) == 0
    assert llama_cpp_build_for(["output.scale", "token_embd.weight"]) == 0     # not a scale llama.cpp loads
    assert llama_cpp_build_for(["blk.12.ssm_in.scale"]) == 8372                # any layer number
    assert llama_cpp_build_for(["blk.0.attn_v.scale", "blk.3.ssm_out.scale"]) == 8827
    assert llama_cpp_build_for(["blk.3.ssm_out.scale", "blk.0.attn_v.scale"]) == 8827   # in any order
    assert llama_cpp_build_for(["blk.3.ssm_out.weight.scale"]) == 0
