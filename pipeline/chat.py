"""Talking to a checkpoint: base + LoRA adapter + soul, as trained.

    from pipeline.hf import load_trained
    model, tokenizer = load_trained("build/demo/checkpoints/final")

    python -m pipeline chat --checkpoint build/demo/checkpoints/final
    python -m pipeline chat --checkpoint DIR --prompt "自己紹介をしてください。"

The checkpoint names its base (checkpoint.json: a local folder or a hub id
and revision), so nothing else is needed. The model is the trained one, not
the fused one: this is the reference the fused and GGUF models must match.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .chattext import encode_rendered
from .hf import load_trained


def reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    """One assistant turn for `messages`, stopping at the model's end-of-turn tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = encode_rendered(tokenizer, text, return_tensors="pt").input_ids.to(model.device)
    gen = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        gen["temperature"] = temperature
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def chat(checkpoint: Path, *, prompt: str | None = None, system: str | None = None,
         max_new_tokens: int = 128, temperature: float = 0.0) -> None:
    """One answer to `prompt`, or an interactive session reading lines from stdin."""
    model, tokenizer = load_trained(checkpoint)
    messages = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
        print(reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature))
        return
    print(f"[chat] {checkpoint}: type a message, an empty line ends the session.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        answer = reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature)
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
