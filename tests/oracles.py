"""Independent implementations our output is checked against: transformers and llama.cpp."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=8)
def _hf_model(checkpoint: str, clamp_dt: bool):
    import torch
    from transformers import NemotronHForCausalLM
    model, info = NemotronHForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, output_loading_info=True)
    model.eval()
    if model.config.tie_word_embeddings and "lm_head.weight" in info["missing_keys"]:
        # transformers 5's NemotronHForCausalLM ties nothing (_tied_weights_keys = {}): a tied
        # checkpoint's lm_head would stay random. Tied means the output projection is the embeddings.
        model.lm_head.weight = model.model.embeddings.weight
    if not clamp_dt:
        # transformers' torch path clamps the Mamba step size at time_step_min; the mamba_ssm
        # kernels the model was trained with (dt_limit=(0, inf)) and llama.cpp do not.
        for layer in model.model.layers:
            if hasattr(layer.mixer, "time_step_limit"):
                layer.mixer.time_step_limit = (0.0, float("inf"))
    return model


def hf_logits(checkpoint: Path, ids: list[int], clamp_dt: bool = True) -> np.ndarray:
    """All-position logits of transformers' NemotronHForCausalLM, float32."""
    import torch
    with torch.no_grad():
        return _hf_model(str(checkpoint), clamp_dt)(torch.tensor([ids])).logits[0].float().numpy()


def llama_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    """All-position logits of llama.cpp (through llama-cpp-python) for one fresh sequence."""
    from llama_cpp import Llama
    llm = Llama(str(gguf_path), n_ctx=max(256, len(ids)), n_batch=len(ids), n_ubatch=len(ids),
                logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_tokenize(gguf_path: Path, text: str) -> list[int]:
    from llama_cpp import Llama
    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    finally:
        llm.close()


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    return {
        "max_abs_diff": float(np.abs(ours - ref).max()),
        "max_abs_logit": float(np.abs(ref).max()),
        "top1": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
    }
