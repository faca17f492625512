"""The model's own tokenizer and chat template, and calibration sequences of --ctx tokens.

A checkpoint brings tokenizer.json (read with the `tokenizers` library) and a chat template in
tokenizer_config.json or chat_template.jinja; a GGUF brings both in its metadata and is
tokenized by llama.cpp (llama-cpp-python, vocabulary only). Chats are rendered with
enable_thinking true and false (the second only when it renders differently). Documents are
joined with the end-of-sequence token; as llama-imatrix does, each sequence starts with BOS
when the tokenizer adds one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from nemoq.calib.data import Item
from nemoq.errors import NemoqError


@dataclass
class ModelText:
    encode: Callable[[str], list[int]]
    chat_template: str | None
    bos: tuple[str, int | None]        # (token text, id)
    eos: tuple[str, int | None]
    add_bos: bool

    @cached_property
    def _template(self):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        # as transformers compiles chat templates (and tojson without HTML escaping)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def render(self, item: Item) -> list[str]:
        if item.messages is None:
            return [item.text]
        if not self.chat_template:
            raise NemoqError("the calibration data has chats, but the model has no chat template")
        texts = []
        for thinking in (True, False):
            text = self._template.render(messages=item.messages, tools=item.tools, add_generation_prompt=False,
                                         enable_thinking=thinking, bos_token=self.bos[0], eos_token=self.eos[0])
            if text not in texts:
                texts.append(text)
        return texts


def _token_text(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def checkpoint_text(folder: Path) -> ModelText:
    from tokenizers import Tokenizer
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise NemoqError("no tokenizer.json: calibration tokenizes with the model's own tokenizer", folder)
    tokenizer = Tokenizer.from_file(str(path))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):   # named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    return ModelText(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, template,
                     (bos, tokenizer.token_to_id(bos) if bos else None),
                     (eos, tokenizer.token_to_id(eos) if eos else None), bool(config.get("add_bos_token", False)))


def gguf_text(path: Path) -> ModelText:
    from llama_cpp import Llama

    from nemoq.gguf_file import read_gguf
    meta = read_gguf(path).metadata
    llm = Llama(str(path), vocab_only=True, verbose=False)
    tokens = meta.get("tokenizer.ggml.tokens", [])

    def special(key: str) -> tuple[str, int | None]:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return (tokens[i] if i is not None and i < len(tokens) else "", i)
    return ModelText(lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=True),
                     meta.get("tokenizer.chat_template"), special("bos"), special("eos"),
                     bool(meta.get("tokenizer.ggml.add_bos_token", False)))


def model_text(source) -> ModelText:
    return gguf_text(Path(source.path)) if source.plan.layout == "GGUF" else checkpoint_text(Path(source.path))


def make_sequences(items: list[Item], text: ModelText, ctx: int, max_tokens: int, where: str) -> np.ndarray:
    """(n, ctx) token ids: the first max_tokens // ctx whole sequences of the joined documents."""
    if ctx < 2:
        raise NemoqError("--ctx must be at least 2 tokens")
    if max_tokens < ctx:
        raise NemoqError(f"--tokens ({max_tokens}) is smaller than one sequence of --ctx {ctx} tokens")
    wanted = max_tokens // ctx * ctx
    ids: list[int] = []
    for item in items:
        for rendered in text.render(item):
            ids.extend(text.encode(rendered))
            if text.eos[1] is not None:
                ids.append(text.eos[1])
        if len(ids) >= wanted:
            break
    n = min(len(ids), wanted) // ctx
    if n == 0:
        raise NemoqError(f"too little calibration text: found {len(ids)} tokens, need at least {ctx} "
                         f"for one sequence of --ctx {ctx}", where)
    sequences = np.asarray(ids[: n * ctx], dtype=np.int32).reshape(n, ctx)
    if text.add_bos and text.bos[1] is not None:
        sequences[:, 0] = text.bos[1]
    return sequences
