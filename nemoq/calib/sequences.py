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
from jinja2 import TemplateError

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


def _special_token(config: dict, key: str, path: Path) -> str:
    """A tokenizer_config.json special token: a string, or an object with its "content"."""
    value = config.get(key)
    text = value.get("content", "") if isinstance(value, dict) else (value or "")
    if not isinstance(text, str):
        raise NemoqError(f"{key} must be a token string, not {json.dumps(text)[:40]}", path)
    return text


def _chat_template(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):   # named templates: use the default one
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    return template


def checkpoint_text(folder: Path) -> ModelText:
    from tokenizers import Tokenizer

    from nemoq.convert.tokenizer import read_chat_template, read_tokenizer_config
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise NemoqError("no tokenizer.json: calibration tokenizes with the model's own tokenizer", folder)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:   # the tokenizers library raises plain Exception for any bad file
        raise NemoqError(f"the tokenizers library cannot load it ({e})", path) from None
    config_path = folder / "tokenizer_config.json"
    config = read_tokenizer_config(config_path) if config_path.is_file() else {}
    template = _chat_template(config)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = read_chat_template(folder / "chat_template.jinja")
    bos, eos = _special_token(config, "bos_token", config_path), _special_token(config, "eos_token", config_path)
    return ModelText(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, template,
                     (bos, tokenizer.token_to_id(bos) if bos else None),
                     (eos, tokenizer.token_to_id(eos) if eos else None), bool(config.get("add_bos_token", False)))


def gguf_text(path: Path) -> ModelText:
    from llama_cpp import Llama

    from nemoq.gguf_file import read_gguf
    from nemoq.llama_tokens import tokenize
    meta = read_gguf(path).metadata
    try:
        llm = Llama(str(path), vocab_only=True, verbose=False)
    except ValueError as e:   # llama-cpp-python's "Failed to load model from file"
        raise NemoqError(f"llama.cpp could not load this model's vocabulary ({e})", path) from None
    except TemplateError as e:   # llama-cpp-python compiles the model's chat templates on load
        raise NemoqError(f"its chat template is not valid Jinja ({e})", path) from None
    tokens = meta.get("tokenizer.ggml.tokens")
    template = meta.get("tokenizer.chat_template")
    if not isinstance(tokens, list) or template is not None and not isinstance(template, str):
        raise NemoqError("tokenizer.ggml.tokens or tokenizer.chat_template is not of its GGUF type", path)

    def special(key: str) -> tuple[str, int | None]:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is None:
            return "", None
        if not isinstance(i, int) or not 0 <= i < len(tokens):
            raise NemoqError(f"tokenizer.ggml.{key}_token_id {i!r} is not a token of its {len(tokens)}", path)
        return tokens[i], i
    return ModelText(lambda text: tokenize(llm, text.encode("utf-8"), False, True), template,
                     special("bos"), special("eos"), bool(meta.get("tokenizer.ggml.add_bos_token", False)))


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
        try:
            rendered_texts = text.render(item)
        except (TemplateError, TypeError) as e:   # a template's raise_exception, or a chat it cannot join
            raise NemoqError(f"the model's chat template fails on a chat of the calibration data "
                             f"({type(e).__name__}: {e})", where) from None
        for rendered in rendered_texts:
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
