"""Stage 2, fuse: merge the LoRA into the 16-bit base and fold the soul into the head.

For every base weight W (read one tensor at a time, in float32):
  - a LoRA-adapted linear layer becomes W + (alpha_lora / r) * B A;
  - the LM head becomes W + sigmoid(alpha) * W R, R the soul's rotation;
then it is cast to `fuse.dtype` and streamed to the output shard. With tied
embeddings the head is written as its own tensor and the config untied, so
the input embeddings stay as they were. The result is a standard Phi-3
Hugging Face folder (no remote code) with the tokenizer files, and
`fusion.json` (provenance) written last as the completion marker.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .artifacts import atomic_dir, atomic_write_text, sha256_file
from .checkpoint import read_marker
from .config import CHECKPOINT_MARKER, FUSION_MARKER, SOUL_BLOCK, Config
from .errors import CheckpointMismatchError, FuseError
from .hf import DTYPES, read_model_config, resolve_base
from .integrity import folder_records, verify_folder
from .soul import SOUL_FILE, SoulState, fold_soul_rows, load_soul
from .tensors import SafetensorsReader, return_freed_memory_eagerly, weight_shards, write_safetensors

HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
# Files of a model folder that carry over unchanged (tokenizer, generation).
CARRIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
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


def fuse_tensors(base_dir: Path, out_dir: Path, adapter: LoraAdapter, soul: SoulState, dtype: torch.dtype,
                 base_weights: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Stream the base's shards to out_dir with LoRA merged and the soul folded.

    base_weights(name, W): the base weight to merge into (default: W as stored).
    """
    hf = read_model_config(base_dir)
    tied = bool(hf.get("tie_word_embeddings", False))
    check_soul_fits(soul, hf)
    return_freed_memory_eagerly()
    unused = set(adapter.factors)
    head_written = False
    weight_map: dict[str, str] = {}
    for shard in weight_shards(base_dir):
        with SafetensorsReader(shard) as f:
            names = f.keys()
            untie = tied and EMBED in names and HEAD not in names
            if untie:
                names.append(HEAD)  # the folded head becomes its own tensor

            def source(name: str) -> str:
                return EMBED if name == HEAD and untie else name

            specs = []
            for n in names:
                src_dtype, shape = f.spec(source(n))
                specs.append((n, dtype if src_dtype.is_floating_point else src_dtype, shape))

            def produce(name: str, f=f) -> torch.Tensor:
                nonlocal head_written
                w = f.get(source(name))
                if not w.is_floating_point():
                    return w
                # Only a changed weight goes through float32; an untouched one is
                # rounded once to the output dtype, with no float32 copy.
                if base_weights is not None:
                    w = base_weights(name, w).float()
                if name in adapter.factors:
                    w = adapter.merge_into(name, w)
                    unused.discard(name)
                if name == HEAD:  # the fold works in float32, a few rows at a time, straight to the file
                    head_written = True
                    return fold_soul_rows(w, soul.rotation, soul.alpha, out_dtype=dtype)
                return w.to(dtype)

            write_safetensors(out_dir / shard.name, specs, produce, metadata={"format": "pt"})
            weight_map.update({n: shard.name for n in names})
    if unused:
        raise FuseError(f"the adapter modifies weights the base does not have: {sorted(unused)[:5]}")
    if not head_written:
        raise FuseError(f"{base_dir}: no {HEAD} (nor tied {EMBED}) found to fold the soul into")
    if (base_dir / "model.safetensors.index.json").is_file():
        total = sum((out_dir / s).stat().st_size for s in set(weight_map.values()))
        atomic_write_text(out_dir / "model.safetensors.index.json", json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


def check_soul_fits(soul: SoulState, hf: dict) -> None:
    hidden = hf["hidden_size"]
    if soul.rotation.shape[0] * SOUL_BLOCK != hidden:
        raise CheckpointMismatchError(
            f"soul has {soul.rotation.shape[0]} blocks of {SOUL_BLOCK} ({soul.rotation.shape[0] * SOUL_BLOCK} dims) "
            f"but the base's hidden_size is {hidden}"
        )


def fused_config(hf: dict, dtype_name: str) -> dict:
    """The base's config.json for the fused model: untied, no remote code."""
    out = {k: v for k, v in hf.items() if k != "auto_map"}
    out["tie_word_embeddings"] = False
    out["dtype"] = dtype_name
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype_name
    out["architectures"] = ["Phi3ForCausalLM"]
    return out


def fuse(cfg: Config, checkpoint: Path | None = None, out_dir: Path | None = None) -> Path:
    """Merge LoRA and fold the soul into a standalone Hugging Face model.

    Inputs: the config (base model, fuse.dtype) and a checkpoint folder
    (default `checkpoints/final/` of the run). Output: `out_dir` (default
    `<run>/fused/`), replaced atomically, with fusion.json written last.
    Raises FuseError for a checkpoint that does not fit the base, ModelError
    for a base that cannot be found.
    """
    ckpt = checkpoint or cfg.run_dir / "checkpoints" / "final"
    out_dir = out_dir or cfg.run_dir / "fused"
    state = read_marker(ckpt)
    if state is None:
        raise FuseError(f"{ckpt}: not a complete checkpoint (no {CHECKPOINT_MARKER}); run `make train` first")
    base_dir = resolve_base(cfg)
    verify_folder(ckpt, CHECKPOINT_MARKER, remove_damaged=checkpoint is None)
    adapter = read_adapter(ckpt)
    soul = load_soul(ckpt / SOUL_FILE)
    dtype = DTYPES[cfg.fuse.dtype]
    print(f"[fuse] {base_dir.name} + {ckpt.name} (step {state.get('step')}, alpha {soul.alpha:+.4f}, "
          f"gate {soul.gate:.4f}) -> {out_dir} ({cfg.fuse.dtype})")

    hf = read_model_config(base_dir)
    check_soul_fits(soul, hf)
    nf4 = state.get("nf4")
    candidates = merge_candidates(cfg.fuse.merge_base, nf4)
    reference = None
    if cfg.fidelity.enabled or len(candidates) > 1:
        from .fidelity import compare_fused, gate_fused, trained_reference

        reference = trained_reference(cfg, ckpt)

    with atomic_dir(out_dir) as tmp:
        scores = {}
        for name in candidates:
            where = tmp if len(candidates) == 1 else tmp / f".candidate-{name}"
            write_model_folder(base_dir, where, hf, cfg.fuse.dtype)
            fuse_tensors(base_dir, where, adapter, soul, dtype,
                         base_weights=nf4_round_trip(nf4) if name == "dequantized" else None)
            if reference is not None:
                scores[name] = compare_fused(reference, where)
        chosen = min(scores, key=lambda n: scores[n].kl) if len(candidates) > 1 else candidates[0]
        if len(candidates) > 1:
            for f in (tmp / f".candidate-{chosen}").iterdir():
                f.rename(tmp / f.name)
            for name in candidates:
                shutil.rmtree(tmp / f".candidate-{name}", ignore_errors=True)
            print(f"[fuse] merge base {chosen}: KL to the trained model "
                  + ", ".join(f"{n} {scores[n].kl:.3g}" for n in candidates))
        files = folder_records(tmp)
        provenance = {
            "base": cfg.model.base,
            "revision": cfg.model.revision,
            "checkpoint": ckpt.name,
            "step": state.get("step"),
            "alpha": soul.alpha,
            "gate": soul.gate,
            "dtype": cfg.fuse.dtype,
            "merge_base": chosen,
            "merge_base_setting": cfg.fuse.merge_base,
            "merge_base_kl": {n: c.kl for n, c in scores.items()},
            "merge_base_reason": merge_reason(cfg.fuse.merge_base, nf4, chosen),
            "tied_input": bool(hf.get("tie_word_embeddings", False)),
            "inputs": {p.name: sha256_file(p) for p in (ckpt / "adapter_model.safetensors", ckpt / SOUL_FILE)},
            "outputs": {n: r["sha256"] for n, r in files.items() if n.endswith(".safetensors")},
            # Every file with its size: integrity.sweep/verify_folder find a damaged one.
            "files": files,
        }
        atomic_write_text(tmp / FUSION_MARKER, json.dumps(provenance, indent=1) + "\n")
        if cfg.fidelity.enabled:
            gate_fused(cfg, scores[chosen], chosen)
    return out_dir


def merge_candidates(setting: str, nf4: dict | None) -> list[str]:
    """Which merge bases to build: without NF4 training both are the same weights."""
    if not nf4:
        return ["original"]
    return ["original", "dequantized"] if setting == "auto" else [setting]


def merge_reason(setting: str, nf4: dict | None, chosen: str) -> str:
    if not nf4:
        return "trained without quantization: the original weights are what the adapter saw"
    if setting == "auto":
        return f"auto: {chosen} is closer to the trained model (lower KL on the fidelity prompts)"
    return f"fuse.merge_base is {setting}"


def write_model_folder(base_dir: Path, folder: Path, hf: dict, dtype_name: str) -> None:
    """config.json (untied, no remote code) and the tokenizer/generation files."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.json", json.dumps(fused_config(hf, dtype_name), indent=2) + "\n")
    for name in CARRIED_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, folder / name)
