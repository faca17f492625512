"""One GGUF model run by llama.cpp (llama-cpp-python), chunk by chunk as llama-perplexity runs it.

The text is tokenized once (BOS added only when the model's add_bos metadata says so), split
into non-overlapping chunks of n_ctx tokens; each chunk starts from a cleared memory (KV cache
and the Mamba conv/SSM state), with its first token replaced by BOS when the model adds BOS,
and only the predictions of the second half are scored: positions n_ctx/2 ... n_ctx-2, each
predicting the next token.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jinja2 import TemplateError

from nemoq.errors import NemoqError
from nemoq.eval.metrics import log_softmax


@dataclass(frozen=True)
class ChunkLayout:
    ctx: int
    n_chunks: int
    bos: int | None          # written over each chunk's first token (models that add BOS)

    @property
    def first(self) -> int:
        return self.ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.ctx - 1 - self.first

    def chunk(self, tokens: np.ndarray, i: int) -> list[int]:
        ids = [int(t) for t in tokens[i * self.ctx:(i + 1) * self.ctx]]
        if self.bos is not None:
            ids[0] = self.bos
        return ids

    def targets(self, tokens: np.ndarray, i: int) -> np.ndarray:
        """The tokens the scored positions predict (the text's own, never the BOS)."""
        start = i * self.ctx
        return np.asarray(tokens[start + self.first + 1:start + self.ctx], dtype=np.int64)


def plan_chunks(n_tokens: int, ctx: int, max_chunks: int | None, data: Path | None = None) -> int:
    if ctx < 4:
        raise NemoqError(f"--ctx {ctx} is too small to score anything")
    if n_tokens < 2 * ctx:   # llama-perplexity's own requirement
        raise NemoqError(f"the text tokenizes to {n_tokens} tokens; perplexity with --ctx {ctx} "
                         f"needs at least {2 * ctx}: give more text or a smaller --ctx", data)
    n = n_tokens // ctx
    return n if max_chunks is None else min(max_chunks, n)


class LlamaLogs:
    """llama.cpp's own log lines (model loading, "llama_kv_cache: ... padding V cache"): on stderr
    with `show` (nemoq --verbose), otherwise kept from landing in the middle of nemoq's tables.
    Its error lines are kept either way, to explain a model that fails to load. llama.cpp has one
    log callback per process (for ggml's lines too), so this is one object."""
    ERROR = 4   # ggml.h's GGML_LOG_LEVEL_ERROR (llama-cpp-python's own logger takes 3, WARN, for it)

    def __init__(self):
        self.show = False
        self.errors: deque[str] = deque(maxlen=4)
        self._callback = None

    def install(self, llama_cpp) -> None:
        # Every time a model loads: something else (a test, llama-cpp-python) may have set its own.
        if self._callback is None:
            self._callback = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, user_data) -> None:
        line = text.decode("utf-8", "replace")
        if self.show:
            sys.stderr.write(line)
            sys.stderr.flush()
        elif level == self.ERROR and line.strip():
            self.errors.append(line.strip())


LLAMA_LOGS = LlamaLogs()


# Per-architecture keys llama.cpp reads with a GGML_ASSERT behind them (an abort, not an error),
# by ModelConfig field for the expert counts.
EXPERT_KEYS = {"n_experts": "expert_count", "n_experts_used": "expert_used_count",
               "n_expert_groups": "expert_group_count", "n_expert_groups_used": "expert_group_used_count"}
EPSILON_KEYS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")


def check_loadable(path: Path) -> None:
    """Refuse, with one error, a GGUF whose hyper-parameters would make llama.cpp abort the process
    (its load_hparams and norm ops assert on them rather than report). Values of the wrong type are
    left to llama.cpp, which reports those itself."""
    from nemoq.convert.config import MAX_LAYERS, expert_count_problem
    from nemoq.gguf_check import check_header

    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)
    meta = check_header(path).values   # the header walk alone: no tokenizer arrays parsed
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return
    blocks = meta.get(f"{arch}.block_count")
    if integer(blocks) and not 0 < blocks <= MAX_LAYERS:
        raise NemoqError(f"{arch}.block_count is {blocks}; llama.cpp loads 1 to {MAX_LAYERS} layers", path)
    names = {field: f"{arch}.{key}" for field, key in EXPERT_KEYS.items()}
    counts = {field: meta.get(name, 0) for field, name in names.items()}
    if all(integer(v) for v in counts.values()):
        if counts["n_experts"]:
            problem = expert_count_problem(counts, names)
        elif counts["n_experts_used"] or counts["n_expert_groups"]:
            problem = f"{names['n_experts']} is 0, but {names['n_experts_used']} or {names['n_expert_groups']} is not"
        else:
            problem = None
        if problem:
            raise NemoqError(problem, path)
    for key in EPSILON_KEYS:
        eps = meta.get(f"{arch}.{key}")
        if isinstance(eps, float) and not eps >= 0:   # NaN too
            raise NemoqError(f"{arch}.{key} is {eps}; llama.cpp needs an epsilon >= 0", path)


class LlamaModel:
    """A loaded GGUF with one context of n_ctx tokens that returns scored log-probs per chunk."""

    def __init__(self, path: Path, ctx: int, threads: int | None = None):
        import llama_cpp
        self.path = Path(path)
        if not self.path.is_file():
            raise NemoqError("no such file", self.path)
        check_loadable(self.path)
        threads = threads or os.cpu_count() or 1
        LLAMA_LOGS.install(llama_cpp)
        LLAMA_LOGS.errors.clear()
        try:   # whole chunks are batches: n_threads_batch is the count that matters
            # verbose=False also sends fds 1 and 2 to /dev/null while the weights load
            self.llm = llama_cpp.Llama(str(self.path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                                       verbose=LLAMA_LOGS.show, n_threads=threads, n_threads_batch=threads)
        except ValueError as e:   # llama-cpp-python's "Failed to load model from file"
            why = LLAMA_LOGS.errors[0] if LLAMA_LOGS.errors else str(e)   # the first says what
            raise NemoqError(f"llama.cpp could not load this model ({why})", self.path) from None
        except TemplateError as e:   # llama-cpp-python compiles the model's chat templates on load
            raise NemoqError(f"its chat template is not valid Jinja ({e})", self.path) from None
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.n_vocab = self.llm.n_vocab()
        self._memory = llama_cpp.llama_get_memory(self.llm.ctx)
        self._clear = llama_cpp.llama_memory_clear

    def tokenize(self, text: str) -> np.ndarray:
        # add_bos=True asks llama.cpp for the model's special tokens: BOS only where add_bos is set
        from nemoq.llama_tokens import tokenize
        return np.asarray(tokenize(self.llm, text.encode("utf-8"), True, False), dtype=np.int32)

    def layout(self, n_tokens: int, ctx: int, max_chunks: int | None, data: Path | None = None) -> ChunkLayout:
        bos = self.llm.token_bos() if self.add_bos else None
        return ChunkLayout(ctx, plan_chunks(n_tokens, ctx, max_chunks, data), bos)

    def scored_logprobs(self, ids: list[int], first: int) -> np.ndarray:
        """float64 log-softmax of positions first ... len(ids)-2, from a fresh state."""
        self.llm.reset()
        if self._memory is not None:
            self._clear(self._memory, True)   # KV cache and recurrent (Mamba) state, explicitly
        self.llm.eval(ids)
        return log_softmax(self.llm.scores[first:len(ids) - 1])

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tokens_digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                  "tokenizer.ggml.add_bos_token")
EDGE_BYTES = 1 << 20


def fingerprints(path: Path) -> dict:
    """Quick identities: the tokenizer (hash of its GGUF metadata) and the model (tensor table,
    file sizes and the first and last MiB of each file; cheap on a 60 GB model, not a full hash)."""
    import json
    from nemoq.gguf_file import read_gguf
    contents = read_gguf(path)
    tok = hashlib.sha256(json.dumps([contents.metadata.get(k) for k in TOKENIZER_KEYS], default=str).encode())
    model = hashlib.sha256(json.dumps([(t.name, t.type_name, t.shape) for t in contents.tensors]).encode())
    for f in contents.files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            model.update(str(size).encode() + fh.read(EDGE_BYTES))
            fh.seek(max(size - EDGE_BYTES, 0))
            model.update(fh.read(EDGE_BYTES))
    return {"tokenizer": tok.hexdigest()[:16], "model": model.hexdigest()[:16],
            "size_bytes": sum(f.stat().st_size for f in contents.files),
            "bits_per_weight": contents.bits_per_weight}
