"""llama.cpp tokenizes our GGUF's vocabulary exactly as the `tokenizers` library does."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from tests.oracles import llama_tokenize

SAMPLES = {
    "prose": "The quick brown fox jumps over the lazy dog. It's 2026; isn't it? Mr. O'Neil paid $3.50.",
    "code": "def add(a, b):\n    return a + b  # sum\n\nfor i in range(10):\n\tprint(f\"{i:>3}\")\n",
    "non-latin": "Grüße aus Köln! Ça va très bien. Привет, мир. Καλημέρα. 日本語のテキスト。中文文本。",
    "whitespace": "  leading spaces\n\n\ntrailing   \t\n  ",
    "special": "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\nHi<|im_end|>",
}


@pytest.mark.parametrize("sample", SAMPLES)
def test_llama_cpp_tokenizes_like_tokenizers(sample, tiny_model, tiny_gguf_f32):
    text = SAMPLES[sample]
    expected = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert llama_tokenize(tiny_gguf_f32, text) == expected


def test_chat_template_is_carried_unchanged(tiny_model, tiny_gguf_f32):
    import json

    from nemoq.gguf_file import read_gguf
    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if template is None:
        template = (tiny_model / "chat_template.jinja").read_text()
    metadata = read_gguf(tiny_gguf_f32).metadata
    assert metadata["tokenizer.chat_template"] == template
    assert "enable_thinking" in template
