"""The tokenizer as llama.cpp wants it: BPE tokens, types, merges, special ids, chat template.

llama.cpp's own converter recognises the pre-tokenizer by hashing the tokenizer's output
on a fixed text and fails on any unknown hash. nemoq reads the pre-tokenizer regexes out
of tokenizer.json and looks them up in a table; an unknown one is a clear error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import TokenType

from nemoq.inputs import read_json_object, read_text
from nemoq.errors import NemoqError

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Split regexes of tokenizer.json's pre_tokenizer, in order -> llama.cpp's pre-tokenizer name.
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    # Mistral-Nemo "tekken", used by Nemotron-H and Nemotron 3
    (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
     r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
     r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",): "tekken",
    # Llama 3
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
     r"\s*[\r\n]+|\s+(?!\S)|\s+",): "llama-bpe",
    # Qwen 2 / 2.5 / 3
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
     r"\s*[\r\n]+|\s+(?!\S)|\s+",): "qwen2",
    # GPT-2 (ByteLevel with its built-in regex)
    (GPT2_REGEX,): "gpt-2",
}
KNOWN_PRE_NAMES = sorted(set(PRE_TOKENIZERS.values()))


@dataclass
class Vocab:
    tokens: list[str]
    token_types: list[int]
    pre: str
    special: gguf.SpecialVocab

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        self.special.add_to_gguf(writer, quiet=True)


def _split_regexes(node, path: Path) -> list[str]:
    """Regexes applied by a pre_tokenizer node, in order (ByteLevel's own regex included)."""
    if not node:
        return []
    if not isinstance(node, dict):
        raise NemoqError(f"pre_tokenizer entry {json.dumps(node)[:40]} is not an object", path)
    kind = node.get("type")
    if kind == "Sequence":
        children = node.get("pretokenizers", [])
        if not isinstance(children, list):
            raise NemoqError("pre_tokenizer.pretokenizers is not a list", path)
        return [r for child in children for r in _split_regexes(child, path)]
    if kind == "Split":
        pattern = node.get("pattern", {})
        regex = pattern.get("Regex") or pattern.get("String", "") if isinstance(pattern, dict) else None
        if not isinstance(regex, str):
            raise NemoqError(f"pre_tokenizer Split pattern {json.dumps(pattern)[:40]} is not a regex or string", path)
        return [regex]
    if kind == "ByteLevel" and node.get("use_regex", True):
        return [GPT2_REGEX]
    return []


def _check_bpe(tok: dict, path: Path) -> tuple[dict, list]:
    """The BPE model's vocab (token -> id) and the added tokens, with the types nemoq relies on."""
    model = tok.get("model") or {}
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else model
        raise NemoqError(f"tokenizer model is {kind!r}; nemoq converts byte-level BPE only", path)
    vocab, added, merges = model.get("vocab"), tok.get("added_tokens") or [], model.get("merges")
    if not isinstance(vocab, dict) or not all(_is_id(i) for i in vocab.values()):
        raise NemoqError("model.vocab must map tokens to ids (integers >= 0)", path)
    if not isinstance(added, list) or not all(
            isinstance(a, dict) and _is_id(a.get("id")) and isinstance(a.get("content"), str) for a in added):
        raise NemoqError("added_tokens must be a list of {\"id\": integer >= 0, \"content\": string}", path)
    if merges is not None and not _merges_ok(merges):
        raise NemoqError("model.merges must be a list of \"a b\" strings or of [a, b] pairs", path)
    return vocab, added


def _merges_ok(merges) -> bool:
    """Merges as "a b" strings, or as [a, b] pairs (transformers >= 4.45)."""
    return isinstance(merges, list) and (all(isinstance(m, str) for m in merges) or all(
        isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in merges))


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json, its chat_template a string or a list of named template strings."""
    config = read_json_object(path)
    template = config.get("chat_template")
    named = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template)
    if template is not None and not isinstance(template, str) and not named:
        raise NemoqError('chat_template must be a string or a list of {"name": ..., "template": ...} strings', path)
    return config


def read_chat_template(path: Path) -> str:
    """A chat_template.jinja file's text."""
    return read_text(path)


def _special_vocab(model_dir: Path, vocab_size: int, path: Path) -> gguf.SpecialVocab:
    """gguf-py's special tokens, merges and chat template. It reads tokenizer.json,
    tokenizer_config.json, chat_template.jinja and config.json itself; those are checked before
    (config.py, here), so what it still trips over is in tokenizer.json."""
    config, template = model_dir / "tokenizer_config.json", model_dir / "chat_template.jinja"
    if config.is_file():
        read_tokenizer_config(config)
    if template.is_file():
        read_chat_template(template)
    try:
        return gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
        raise NemoqError(f"unexpected tokenizer entry ({type(e).__name__}: {e})", path) from None


def detect_pre_tokenizer(tokenizer_json: dict, path: Path) -> str:
    regexes = tuple(_split_regexes(tokenizer_json.get("pre_tokenizer"), path))
    name = PRE_TOKENIZERS.get(regexes)
    if name is None:
        shown = " | ".join(repr(r) for r in regexes) or "(none)"
        raise NemoqError(f"unknown pre-tokenizer regex {shown}; if you know which llama.cpp pre-tokenizer "
                         f"matches it, pass --pre NAME (known: {', '.join(KNOWN_PRE_NAMES)})", path)
    return name


def load_vocab(model_dir: Path, vocab_size: int, pre: str | None = None) -> Vocab:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise NemoqError("tokenizer.json not found (nemoq needs the model's BPE tokenizer)", model_dir)
    tok = read_json_object(path)
    vocab, added_tokens = _check_bpe(tok, path)
    pre = pre or detect_pre_tokenizer(tok, path)

    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in added_tokens}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise NemoqError(f"tokenizer has token id {max(by_id)}, but config.json vocab_size is {vocab_size}", path)

    # The token list must have exactly vocab_size entries, as many as token_embd has rows;
    # ids the tokenizer never produces become unused placeholders.
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    special = _special_vocab(Path(model_dir), vocab_size, path)
    if not special.merges:
        raise NemoqError("tokenizer.json has no BPE merges", path)
    return Vocab(tokens, [int(t) for t in types], pre, special)
