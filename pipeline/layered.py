"""Logits of a causal LM computed one decoder layer at a time, from its safetensors.

The fidelity gate compares models as large as the machine: Phi-3.5-mini is
15 GB in float32, and loading it whole (three times: two merge candidates and
the fused result) is what made fuse need 22 GB. Here a model is never whole:

  1. the skeleton is built without weights (accelerate's init_empty_weights;
     buffers such as the rotary frequencies are real), from the folder's
     config.json, exactly as from_pretrained would configure it;
  2. transformers' own decoder forward (Phi3Model, LlamaModel, Qwen2Model,
     Qwen3Model, Gemma3TextModel) runs once per prompt with every decoder
     layer replaced by a recorder, which keeps the inputs that layer gets
     (causal or sliding-window mask, position ids, cos/sin: LongRoPE, Llama-3's
     scaled frequencies, Gemma-3's local and global ones) and passes the
     hidden state on unchanged;
  3. each layer's weights are then read (one tensor at a time), turned into
     the float32 weights of every variant being evaluated, and every prompt's
     hidden state of that variant goes through transformers' own decoder
     layer, before the next layer is read; so each layer is read once;
  4. the final norm, the soul (when the variant has one), the head, and the
     family's final logit softcapping where its config sets one.

The embeddings go through the model's own embedding module, so a family that
scales them (Gemma's sqrt(hidden_size)) is computed as from_pretrained's model
computes it.

Same modules, same operations on the same float32 tensors: the logits equal
the whole-model forward's bit for bit on CPU (tests/test_layered.py checks
untied, tied and LongRoPE Phi-3 and each family's test model). Memory: one layer per variant in float32
and the head, about 0.5 + 0.4 GB at Phi-3.5-mini's size, against 15 GB.

A Variant says what weights a layer gets: the stored ones (a fused folder),
the fuse stage's merge of a candidate (computed, never written), or the base
as training saw it with its LoRA unmerged and its soul in front of the head
(the trained model, as PEFT computes it).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapter import EMBED, HEAD, LoraAdapter
from .soul import SO8Soul
from .tensors import SafetensorsReader, weight_shards, write_safetensors

NORM = "model.norm.weight"


def stored_weight(name: str, w: torch.Tensor) -> torch.Tensor:
    """A weight as stored, in float32 (a fused folder, or an untouched base)."""
    return w.float()


@dataclass
class Variant:
    """One model to evaluate over the same base files.

    weight(name, stored tensor) -> the float32 weight this model uses (name is the
    folder's tensor name; the head is asked for as lm_head.weight even when tied).
    lora: factors applied beside their base weight, unmerged (PEFT's forward).
    soul: applied to the final hidden state before the head (SoulHead's forward).
    """

    weight: Callable[[str, torch.Tensor], torch.Tensor] = stored_weight
    lora: LoraAdapter | None = None
    soul: SO8Soul | None = None
    # weight() may be given a block of the embeddings' or the head's rows: true where those tables'
    # weights are computed row by row (a cast, Gemma's nothing, the soul's fold; not a LoRA on them).
    by_rows: bool = True


class _LoraLinear(nn.Module):
    """PEFT's LoRA forward in eval mode: base(x) + lora_B(lora_A(x)) * scaling."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a.float(), b.float(), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        return result + nn.functional.linear(nn.functional.linear(x.to(self.a.dtype), self.a), self.b) * self.scale


class _Captured(Exception):
    pass


class _CaptureInputs(nn.Module):
    """Stands in for one decoder layer: records what the model's forward passes it and returns
    the hidden state unchanged; the last one stops the forward (the final norm has no weights)."""

    def __init__(self, last: bool):
        super().__init__()
        self.last = last
        self.kwargs: dict = {}

    def forward(self, hidden_states, **kwargs):
        self.kwargs = kwargs
        if self.last:
            raise _Captured
        return hidden_states


class ModelFiles:
    """Tensor name -> its shard, each shard opened once (plain reads, see tensors.py)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        for shard in weight_shards(self.folder):
            with SafetensorsReader(shard) as f:
                self._where.update(dict.fromkeys(f.keys(), shard))
        self._open: dict[Path, SafetensorsReader] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _reader(self, name: str) -> SafetensorsReader:
        shard = self._where[name]
        if shard not in self._open:
            self._open[shard] = SafetensorsReader(shard)
        return self._open[shard]

    def get(self, name: str) -> torch.Tensor:
        return self._reader(name).get(name)

    def names(self) -> list[str]:
        return list(self._where)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._reader(name).spec(name)

    def head_name(self) -> str:
        """Where the head's weight is stored: its own tensor, or the tied embeddings."""
        return HEAD if HEAD in self else EMBED

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


@dataclass
class _Stream:
    """One variant's hidden states, one per prompt."""

    variant: Variant
    hidden: list[torch.Tensor] = field(default_factory=list)


def skeleton(folder: Path):
    """The folder's causal LM with no weights (parameters on the meta device), in eval mode;
    configured as from_pretrained configures it (same config reader, same attention)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def layer_inputs(model, embeds: torch.Tensor) -> list[dict]:
    """What each decoder layer gets for this prompt (its mask and position embeddings, which
    differ between sliding-window and full-attention layers), from transformers' own forward."""
    inner = model.model
    layers = inner.layers
    n = len(layers)
    captures = [_CaptureInputs(last=i == n - 1) for i in range(n)]
    inner.layers = nn.ModuleList(captures)
    try:
        inner(inputs_embeds=embeds, use_cache=False)
    except _Captured:
        pass
    finally:
        inner.layers = layers
    return [c.kwargs for c in captures]


def layered_logits(folder: Path, ids: list[list[int]], variants: dict[str, Variant]) -> dict[str, list[np.ndarray]]:
    """Per-prompt logits [positions, vocab] (float32, as the model computes them) of each variant
    over the model in `folder`.

    Inputs: an HF folder of a supported family (config.json + safetensors, sharded or not); token ids per
    prompt; the variants by name. Output: {variant name: [logits per prompt]}.
    Errors: KeyError naming a tensor the folder lacks; ValueError for a damaged shard.
    """
    files = ModelFiles(folder)
    try:
        model = skeleton(files.folder)
        with torch.no_grad():
            streams = embed_prompts(files, model, ids, variants)
            per_prompt = [layer_inputs(model, h) for h in next(iter(streams.values())).hidden]
            for i, layer in enumerate(model.model.layers):
                run_layer(files, layer, f"model.layers.{i}.", streams, [p[i] for p in per_prompt])
            return {name: head_logits(files, model, s) for name, s in streams.items()}
    finally:
        files.close()


def embed_prompts(files: ModelFiles, model, ids: list[list[int]], variants: dict[str, Variant]) -> dict[str, _Stream]:
    """Each variant's embeddings of each prompt, through the model's own embedding module (Gemma's
    scales them). Only the rows of the prompts' tokens are turned into a variant's weights: a
    151936-row table in float32 is 1.6 GB at Qwen3-4B's width."""
    stored = files.get(EMBED)
    used = sorted({t for seq in ids for t in seq})
    at = {t: i for i, t in enumerate(used)}
    embed = model.model.embed_tokens
    padding_idx, embed.padding_idx = embed.padding_idx, None  # it only shapes gradients
    streams = {}
    try:
        for name, v in variants.items():
            table, seqs = ((v.weight(EMBED, stored[used]), [[at[t] for t in seq] for seq in ids]) if v.by_rows
                           else (v.weight(EMBED, stored), ids))
            embed.weight = nn.Parameter(table, requires_grad=False)
            streams[name] = _Stream(v, [embed(torch.tensor([seq])) for seq in seqs])
            # Frees this variant's table; the module's buffers (Gemma's embed_scale) stay real.
            embed.weight = nn.Parameter(embed.weight.to("meta"), requires_grad=False)
    finally:
        embed.padding_idx = padding_idx
    return streams


def run_layer(files: ModelFiles, layer: nn.Module, prefix: str, streams: dict[str, _Stream], inputs: list[dict]) -> None:
    """Read one decoder layer's weights once; run every variant's hidden states through it."""
    names = [n for n, _ in layer.named_parameters()]
    stored = {n: files.get(prefix + n) for n in names}
    for stream in streams.values():
        v = stream.variant
        layer.load_state_dict({n: v.weight(prefix + n, w) for n, w in stored.items()}, assign=True, strict=True)
        restore = attach_lora(layer, prefix, v.lora)
        stream.hidden = [layer(h, **kw) for h, kw in zip(stream.hidden, inputs)]
        restore()
        layer.to("meta")  # frees this variant's weights before the next is built


def attach_lora(layer: nn.Module, prefix: str, lora: LoraAdapter | None) -> Callable[[], None]:
    """Put PEFT's unmerged LoRA forward around the layer's adapted linears; returns the undo."""
    if lora is None:
        return lambda: None
    swapped = []
    for name, module in list(layer.named_modules()):
        factors = lora.factors.get(f"{prefix}{name}.weight")
        if factors is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        setattr(parent, child, _LoraLinear(module, *factors, lora.scale))
        swapped.append((parent, child, module))

    def undo() -> None:
        for parent, child, module in swapped:
            setattr(parent, child, module)

    return undo


# Rows of the head turned into a variant's weights at a time: a 151936-row head in float32 is
# 1.6 GB at Qwen3-4B's width, a block of 8192 rows 84 MB.
HEAD_BLOCK_ROWS = 8192


def head_logits(files: ModelFiles, model, stream: _Stream) -> list[np.ndarray]:
    """Per-prompt float32 logits: the final norm, the soul (when the variant has one), the head
    (one block of rows at a time where the variant allows it), and the family's final softcap."""
    v = stream.variant
    norm = model.model.norm
    norm.load_state_dict({"weight": v.weight(NORM, files.get(NORM))}, assign=True)
    hidden = []
    for h in stream.hidden:
        h = norm(h)
        hidden.append(v.soul(h) if v.soul is not None else h)
    norm.to("meta")
    stored = files.get(files.head_name())
    rows = stored.shape[0]
    out = [torch.empty(h.shape[1], rows) for h in hidden]
    block = HEAD_BLOCK_ROWS if v.by_rows else rows
    for start in range(0, rows, block):
        w = v.weight(HEAD, stored[start:start + block])
        for h, logits in zip(hidden, out):
            logits[:, start:start + w.shape[0]] = nn.functional.linear(h, w)[0]
        del w
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:  # as Gemma's forward does after its head
        out = [torch.tanh(logits / cap) * cap for logits in out]
    return [logits.numpy() for logits in out]


def write_layer_slice(folder: Path, out: Path, layers: int) -> Path:
    """A model of its own made of the first `layers` decoder layers of `folder`'s model, with
    its embeddings, final norm and head (as stored, one safetensors file) and its
    tokenizer files; config.json says num_hidden_layers = layers. Returns `out`."""
    out.mkdir(parents=True)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for p in folder.iterdir():
        if p.is_file() and p.suffix not in (".safetensors", ".npz") and p.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copyfile(p, out / p.name)
    files = ModelFiles(folder)
    try:
        keep = [n for n in files.names() if not n.startswith("model.layers.")
                or int(n.split(".")[2]) < layers]
        specs = [(n, *files.spec(n)) for n in keep]
        write_safetensors(out / "model.safetensors", specs, files.get, metadata={"format": "pt"})
    finally:
        files.close()
    return out
