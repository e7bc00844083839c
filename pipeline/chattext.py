"""Chat-rendered text to token ids with BOS exactly once, as llama.cpp and Ollama tokenize it.

Some families' chat templates write the BOS token's text themselves (Llama-3's
`{{ bos_token }}`, Gemma's `<bos>`), and their tokenizers add a BOS as well:
tokenized as it is, such a prompt starts with two BOS tokens. llama.cpp and
Ollama take one: Ollama strips a leading textual BOS when the GGUF's tokenizer
adds one (llm/llama_server.go, completionPrompt), and its TEMPLATE never writes
one. So here a text that starts with the BOS text is tokenized without the
tokenizer's own special tokens (its BOS is the one in the text), any other text
with them: the ids are the same either way, BOS once where the family has one.
"""
from __future__ import annotations


def starts_with_bos(tokenizer, text: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def without_bos(tokenizer, text: str) -> str:
    """The text as a runtime that adds BOS itself wants it: a leading BOS text removed."""
    return text[len(tokenizer.bos_token):] if starts_with_bos(tokenizer, text) else text


def encode_rendered(tokenizer, text: str, **kwargs):
    """tokenizer(text, **kwargs) with BOS exactly once (see the module's docstring)."""
    return tokenizer(text, add_special_tokens=not starts_with_bos(tokenizer, text), **kwargs)
