"""Perplexity of a GGUF through llama.cpp equals an independent computation: transformers'
NemotronHForCausalLM on the same chunks and tokens, cross-entropy of the second halves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nemoq.eval.metrics import log_softmax, mean_and_stderr
from nemoq.eval.model import LlamaModel
from nemoq.eval.run import RunOptions, evaluate
from nemoq.eval.text import load_text
from tests.conftest import TINY_MODEL
from tests.oracles import hf_logits
from tests.test_eval_files import eval_files

CTX, CHUNKS = 256, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return eval_files(tmp_path_factory)


def test_perplexity_matches_transformers(files):
    text = load_text(files.text)
    record = evaluate(files.f16, RunOptions(text=text, data=files.text, ctx=CTX, chunks=CHUNKS, threads=1))
    with LlamaModel(files.f16, ctx=CTX, threads=1) as model:   # tokenization: test_eval_files.py
        tokens = model.tokenize(text).tolist()
    nll = []
    for i in range(CHUNKS):
        ids = tokens[i * CTX:(i + 1) * CTX]
        logp = log_softmax(hf_logits(TINY_MODEL, ids, clamp_dt=False))
        first = CTX // 2
        nll.append(-logp[np.arange(first, CTX - 1), ids[first + 1:CTX]])
    ln_ppl, ln_se = mean_and_stderr(np.concatenate(nll))
    print(f"nemoq {record['model']['ppl']:.4f}, transformers {math.exp(ln_ppl):.4f}")
    assert record["data"]["scored_tokens"] == CHUNKS * (CTX - 1 - CTX // 2)
    assert record["model"]["ppl"] == pytest.approx(math.exp(ln_ppl), rel=5e-3)
    assert record["model"]["ppl_stderr"] == pytest.approx(math.exp(ln_ppl) * ln_se, rel=2e-2)


def test_perplexity_is_llama_perplexitys_formula():
    """ppl = exp(mean NLL), +- exp(mean) * sqrt(var / (n - 1)) as llama-perplexity prints it."""
    from nemoq.eval.metrics import ppl_summary
    rng = np.random.default_rng(0)
    nll = rng.gamma(2.0, 1.5, size=500)
    s = ppl_summary(nll)
    assert s["ppl"] == pytest.approx(math.exp(nll.mean()))
    assert s["ppl_stderr"] == pytest.approx(math.exp(nll.mean()) * nll.std(ddof=0) / math.sqrt(len(nll) - 1))
