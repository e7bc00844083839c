"""Talking to a checkpoint: base + LoRA adapter + soul, as trained.

    from pipeline.chat import load_trained
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

from .checkpoint import read_marker
from .errors import ModelError
from .hf import DTYPES, fetch_from_hub, load_causal_lm, load_tokenizer, usable_model_dir
from .soul import SOUL_FILE, SO8Soul, SoulHead, load_soul


def load_trained(checkpoint: Path | str, *, device: torch.device | None = None, nf4: bool | None = None):
    """Load base + adapter + soul from a checkpoint folder; returns (model, tokenizer).

    device: default CUDA when present, else CPU. nf4: load the base in 4-bit
    NF4 (default: as it was trained; bitsandbytes runs NF4 on CPU too). Raises ModelError
    for a folder that is not a complete checkpoint or a base that cannot be found.
    """
    checkpoint = Path(checkpoint)
    marker = read_marker(checkpoint)
    if marker is None:
        raise ModelError(f"{checkpoint}: not a complete checkpoint (no checkpoint.json)")
    if not (checkpoint / "adapter_model.safetensors").is_file():  # PEFT would fall back to a pickled .bin
        raise ModelError(f"{checkpoint}: no adapter_model.safetensors (a pickled adapter_model.bin is not loaded)")
    from peft import PeftModel
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if nf4 is None:
        nf4 = marker.get("quantization") == "nf4"
    settings = marker.get("nf4") or {}
    base = Path(marker["base"])
    base_dir = usable_model_dir(base) if base.is_dir() else usable_model_dir(
        fetch_from_hub(marker["base"], marker.get("revision")))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if nf4 and "load_dtype" in settings:  # the NF4 weights exactly as training quantized them
        dtype = DTYPES[settings["load_dtype"]]
    model = load_causal_lm(base_dir, nf4=nf4, compute_dtype=dtype, device=device, dtype=dtype,
                           double_quant=settings.get("double_quant", True))
    model = PeftModel.from_pretrained(model, str(checkpoint))
    soul = SO8Soul.from_state(load_soul(checkpoint / SOUL_FILE)).to(device)
    inner = model.base_model.model
    inner.lm_head = SoulHead(inner.lm_head, soul)
    return model.eval(), load_tokenizer(base_dir)


def reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    """One assistant turn for `messages`, stopping at the model's end-of-turn tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
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
