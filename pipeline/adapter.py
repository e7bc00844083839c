"""A training checkpoint's weights as fuse and the fidelity gate read them.

`read_adapter` reads a PEFT LoRA folder into plain factors; `nf4_round_trip`
gives the base weights exactly as the NF4 model held them while the adapter
was trained. Both the merge (fuse) and the gate's layer-by-layer reference
(layered) build on them.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointMismatchError, FuseError
from .hf import DTYPES
from .soul import SoulState, fold_soul_rows

HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass
class LoraAdapter:
    """LoRA factors keyed by the base weight they modify."""

    scale: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # weight name -> (A [r, in], B [out, r])

    def merge_into(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """W + scale * B A in float32, without a separate delta tensor (W as float32 is
        modified in place when it is already a float32 copy of its own)."""
        a, b = self.factors[name]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointMismatchError(
                f"LoRA for {name} has shape {(b.shape[0], a.shape[1])}, base has {tuple(w.shape)}")
        return w.float().addmm_(b.float(), a.float(), alpha=self.scale)


def read_adapter(ckpt: Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder. Raises FuseError for unsupported variants."""
    cfg_path, weights = ckpt / "adapter_config.json", ckpt / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FuseError(f"{p}: missing (is {ckpt} a training checkpoint?)")
    acfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if acfg.get("peft_type") != "LORA":
        raise FuseError(f"{cfg_path}: peft_type {acfg.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out"):
        if acfg.get(key):
            raise FuseError(f"{cfg_path}: {key} is set; this fuse supports plain LoRA only")
    if acfg.get("bias", "none") != "none":
        raise FuseError(f"{cfg_path}: bias={acfg['bias']!r} is not supported (expected 'none')")
    r, alpha = acfg["r"], acfg["lora_alpha"]
    scale = alpha / (r ** 0.5) if acfg.get("use_rslora") else alpha / r

    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if not m:
                raise FuseError(f"{weights}: unexpected tensor {key!r}")
            parts.setdefault(m["module"] + ".weight", {})[m["ab"]] = f.get_tensor(key)
    factors = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise FuseError(f"{weights}: {name} has lora_{''.join(ab)} but not both A and B")
        factors[name] = (ab["A"], ab["B"])
    return LoraAdapter(scale=scale, factors=factors)


def nf4_round_trip(settings: dict) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """The base weights as the NF4 model held them during training.

    transformers quantizes every linear layer of the decoder (not the head, not
    embeddings) with bitsandbytes; quantizing and dequantizing the same input
    the same way gives back exactly what the adapter was trained against.
    """
    import bitsandbytes.functional as bnbf

    load_dtype = DTYPES[settings["load_dtype"]]

    def weights_as_trained(name: str, w: torch.Tensor) -> torch.Tensor:
        if not (name.startswith("model.layers.") and name.endswith(".weight") and w.ndim == 2):
            return w
        q, state = bnbf.quantize_4bit(w.to(load_dtype), blocksize=settings["blocksize"],
                                      compress_statistics=settings["double_quant"], quant_type="nf4")
        return bnbf.dequantize_4bit(q, state).float()

    return weights_as_trained


def merged_weight(name: str, w: torch.Tensor, adapter: LoraAdapter, soul: SoulState, dtype: torch.dtype,
                  base_weights: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                  ) -> torch.Tensor | Iterator[torch.Tensor]:
    """One tensor of the fused model: base weight `w` (stored under `name`; the head is
    asked for as lm_head.weight even when it is tied) with its LoRA merged and, for the
    head, the soul folded; in `dtype`.

    base_weights(name, W): the base weight to merge into (default: W as stored). The head
    comes back as an iterator of row blocks (a writer never holds the folded head whole);
    every other tensor as a tensor. A changed weight goes through float32; an untouched
    one is rounded once to `dtype`, with no float32 copy.
    """
    if not w.is_floating_point():
        return w
    if base_weights is not None:
        w = base_weights(name, w)
    if name in adapter.factors:
        w = adapter.merge_into(name, w)
    if name == HEAD:
        return fold_soul_rows(w, soul.rotation, soul.alpha, out_dtype=dtype)
    return w.to(dtype)


def whole(tensor_or_rows: torch.Tensor | Iterator[torch.Tensor]) -> torch.Tensor:
    """merged_weight's result as one tensor."""
    if isinstance(tensor_or_rows, torch.Tensor):
        return tensor_or_rows
    return torch.cat(list(tensor_or_rows))
