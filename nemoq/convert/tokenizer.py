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


def _split_regexes(node: dict | None) -> list[str]:
    """Regexes applied by a pre_tokenizer node, in order (ByteLevel's own regex included)."""
    if not node:
        return []
    kind = node.get("type")
    if kind == "Sequence":
        return [r for child in node.get("pretokenizers", []) for r in _split_regexes(child)]
    if kind == "Split":
        pattern = node.get("pattern", {})
        return [pattern.get("Regex") or pattern.get("String", "")]
    if kind == "ByteLevel" and node.get("use_regex", True):
        return [GPT2_REGEX]
    return []


def detect_pre_tokenizer(tokenizer_json: dict, path: Path) -> str:
    regexes = tuple(_split_regexes(tokenizer_json.get("pre_tokenizer")))
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
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NemoqError(f"not valid JSON ({e})", path) from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise NemoqError(f"tokenizer model is {model.get('type')!r}; nemoq converts byte-level BPE only", path)
    pre = pre or detect_pre_tokenizer(tok, path)

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
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
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise NemoqError("tokenizer.json has no BPE merges", path)
    return Vocab(tokens, [int(t) for t in types], pre, special)
