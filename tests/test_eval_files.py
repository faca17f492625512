"""Inputs of the eval tests (built once per session) and the pieces every evaluation starts
from: the text, its tokens and the chunk layout of llama-perplexity."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nemoq.errors import NemoqError
from nemoq.eval.model import ChunkLayout, LlamaModel, plan_chunks
from nemoq.eval.text import load_text
from tests.conftest import TINY_MODEL, run_cli
from tests.gguf_edit import dequantized, rewrite_gguf
from tests.oracles import llama_tokenize

DAMAGED_TENSOR = "blk.1.ffn_down_exps.weight"   # an MoE layer of the tiny model (pattern MEM*EME)
DAMAGED_EXPERT = 0


@dataclass(frozen=True)
class EvalFiles:
    f16: Path          # the tiny trained model, converted to F16: the base of every KLD test
    q4_k_m: Path       # nemoq quantize --recipe Q4_K_M of it
    damaged: Path      # the F16 with one expert of one MoE layer zeroed
    text: Path         # the corpus' validation split, UTF-8


def _cli_ok(*args) -> None:
    result = run_cli(*args)
    assert result.exit_code == 0, result.output


def _zero_one_expert(name: str, tensor):
    if name != DAMAGED_TENSOR:
        return None
    weights = dequantized(tensor)       # (experts, hidden, expert ffn)
    weights[DAMAGED_EXPERT] = 0.0
    return weights


@functools.lru_cache(maxsize=1)
def build_eval_files(folder: Path) -> EvalFiles:
    from tests.fixtures.corpus import load_texts
    folder.mkdir(parents=True, exist_ok=True)
    files = EvalFiles(folder / "tiny-f16.gguf", folder / "tiny-q4_k_m.gguf", folder / "tiny-damaged.gguf",
                      folder / "val.txt")
    files.text.write_text("\n\n".join(load_texts("val")), encoding="utf-8")
    _cli_ok("convert", TINY_MODEL, "-o", files.f16, "--outtype", "f16")
    _cli_ok("quantize", files.f16, "-o", files.q4_k_m, "--recipe", "Q4_K_M")
    rewrite_gguf(files.f16, files.damaged, _zero_one_expert)
    return files


def eval_files(tmp_path_factory) -> EvalFiles:
    """The same files for every eval test module of a session."""
    return build_eval_files(tmp_path_factory.getbasetemp() / "eval-files")


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> EvalFiles:
    return eval_files(tmp_path_factory)


def test_damaged_model_differs_only_in_the_zeroed_expert(files):
    import gguf
    base = {t.name: t for t in gguf.GGUFReader(files.f16).tensors}
    damaged = {t.name: t for t in gguf.GGUFReader(files.damaged).tensors}
    assert base.keys() == damaged.keys()
    a, b = dequantized(base[DAMAGED_TENSOR]), dequantized(damaged[DAMAGED_TENSOR])
    assert np.abs(a[DAMAGED_EXPERT]).max() > 0 and not b[DAMAGED_EXPERT].any()
    np.testing.assert_array_equal(np.delete(a, DAMAGED_EXPERT, 0), np.delete(b, DAMAGED_EXPERT, 0))


def test_text_is_tokenized_as_llama_perplexity_does(files):
    """BOS only per the model's add_bos (the tiny model: none), and special-token markup in the
    text is read as plain text (common_tokenize's parse_special = false)."""
    text = load_text(files.text)
    prose = "\n\n".join(t for t in text.split("\n\n") if "<|" not in t)
    im_start, = llama_tokenize(files.f16, "<|im_start|>")
    with LlamaModel(files.f16, ctx=128, threads=1) as model:
        assert not model.add_bos
        assert model.tokenize(prose).tolist() == llama_tokenize(files.f16, prose)
        tokens = model.tokenize(text)
    assert im_start in llama_tokenize(files.f16, text) and im_start not in tokens


def test_chunk_layout_scores_the_second_half_and_writes_bos():
    tokens = np.arange(1000, 1000 + 3 * 16, dtype=np.int32)
    layout = ChunkLayout(ctx=16, n_chunks=3, bos=7)
    assert layout.first == 8 and layout.scored_per_chunk == 7
    assert layout.chunk(tokens, 1) == [7] + list(range(1017, 1032))
    # position first .. ctx-2 predict tokens first+1 .. ctx-1 of the text
    assert layout.targets(tokens, 1).tolist() == list(range(1016 + 9, 1032))
    assert ChunkLayout(16, 3, None).chunk(tokens, 2)[0] == tokens[32]


@pytest.mark.parametrize("n_tokens, ctx, chunks, expected", [(1000, 128, None, 7), (1000, 128, 3, 3), (256, 128, None, 2)])
def test_chunk_count_follows_llama_perplexity(n_tokens, ctx, chunks, expected):
    assert plan_chunks(n_tokens, ctx, chunks) == expected


def test_too_short_text_is_refused():
    with pytest.raises(NemoqError, match="at least 256"):
        plan_chunks(255, 128, None)


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\xff\xfe bad", "not UTF-8")])
def test_unreadable_text_is_refused(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(NemoqError, match=message):
        load_text(path)


def test_each_chunk_starts_from_a_cleared_state(files):
    """The Mamba conv/SSM state (and KV cache) must not carry over: the same chunk gives the
    same log-probs after another chunk, and those of a freshly loaded model."""
    from tests.oracles import llama_logits
    from nemoq.eval.metrics import log_softmax
    tokens = llama_tokenize(files.f16, load_text(files.text))
    a, b = tokens[:128], tokens[128:256]
    with LlamaModel(files.f16, ctx=128, threads=1) as model:
        first = model.scored_logprobs(a, 64)
        model.scored_logprobs(b, 64)
        again = model.scored_logprobs(a, 64)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, log_softmax(llama_logits(files.f16, a)[64:127]), atol=1e-4)


def test_eval_package_needs_no_torch():
    """DESIGN.md: eval/ runs on machines without torch (importing every module pulls none in)."""
    import subprocess
    import sys
    code = ("import importlib, pkgutil, sys, nemoq.eval\n"
            "for m in pkgutil.iter_modules(nemoq.eval.__path__): importlib.import_module('nemoq.eval.' + m.name)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
