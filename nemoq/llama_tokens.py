"""Tokenizing with llama.cpp through a buffer sized by the text.

llama-cpp-python's `Llama.tokenize` allocates (and zeroes) one int32 per token of the model's
training context, read from the GGUF's `<arch>.context_length`: 4 MiB for a 1M-context model,
8 GiB for a damaged file claiming 2^31, and a ValueError past that. A text of n bytes never
yields more than n tokens plus the special ones added around it.
"""

from __future__ import annotations

SPECIAL_ROOM = 16   # BOS / EOS and the like, added around the text


def tokenize(llm, text: bytes, add_special: bool, parse_special: bool) -> list[int]:
    """`llm.tokenize(text, add_special, parse_special)` without the context-sized buffer."""
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    room = len(text) + SPECIAL_ROOM
    tokens = (llama_cpp.llama_token * room)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), tokens, room, add_special, parse_special)
    if n < 0:   # more room needed after all: llama.cpp says how much
        room = -n
        tokens = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), tokens, room, add_special, parse_special)
    if n < 0:
        raise RuntimeError(f"llama_tokenize failed ({n})")
    return list(tokens[:n])
