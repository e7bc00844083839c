"""Stage 2, fuse: merge the LoRA into the 16-bit base and fold the soul into the head.

For every base weight W (read one tensor at a time, in float32):
  - a LoRA-adapted linear layer becomes W + (alpha_lora / r) * B A;
  - the LM head becomes W + sigmoid(alpha) * W R, R the soul's rotation;
then it is cast to `fuse.dtype` and streamed to the output shard. With tied
embeddings the head is written as its own tensor and the config untied, so
the input embeddings stay as they were. The result is a standard Hugging Face
folder of the base's own architecture (no remote code) with the tokenizer files,
`fusion.json` (provenance) as the completion marker, and the model card README.md
(pipeline/modelcard.py), which later stages refresh and fusion.json does not list.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .adapter import EMBED, HEAD, LoraAdapter, merged_weight, nf4_round_trip, read_adapter
from .artifacts import atomic_dir, atomic_write_text, sha256_file
from .checkpoint import read_marker
from .config import CHECKPOINT_MARKER, FUSION_MARKER, SOUL_BLOCK, Config
from .errors import CheckpointMismatchError, FuseError
from .families import family_of
from .fidelity import FUSED_LOGITS, compare, fused_logits, gate_fused, merge_candidate, save_logits, score_merge
from .hf import DTYPES, read_model_config, resolve_base
from .integrity import folder_records, verify_folder
from .modelcard import CARD_FILE, write_card
from .resources import require
from .soul import SOUL_FILE, SoulState, load_soul
from .tensors import SafetensorsReader, return_freed_memory_eagerly, weight_shards, write_safetensors
# Files of a model folder that carry over unchanged (tokenizer, generation).
CARRIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def fuse_tensors(base_dir: Path, out_dir: Path, adapter: LoraAdapter, soul: SoulState, dtype: torch.dtype,
                 base_weights: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Stream the base's shards to out_dir with LoRA merged and the soul folded (merged_weight).

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

            def produce(name: str, f=f):
                nonlocal head_written
                head_written |= name == HEAD
                unused.discard(name)
                return merged_weight(name, f.get(source(name)), adapter, soul, dtype, base_weights)

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
    """The base's config.json for the fused model: untied, no remote code, the family's own
    architecture (transformers' class, which the converter also picks its class by)."""
    out = {k: v for k, v in hf.items() if k != "auto_map"}
    out["tie_word_embeddings"] = False
    out["dtype"] = dtype_name
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype_name
    out["architectures"] = [family_of(hf).architectures[0]]
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
    require(cfg, "fuse")
    adapter = read_adapter(ckpt)
    soul = load_soul(ckpt / SOUL_FILE)
    dtype = DTYPES[cfg.fuse.dtype]
    print(f"[fuse] {base_dir.name} + {ckpt.name} (step {state.get('step')}, alpha {soul.alpha:+.4f}, "
          f"gate {soul.gate:.4f}) -> {out_dir} ({cfg.fuse.dtype})")

    hf = read_model_config(base_dir)
    check_soul_fits(soul, hf)
    nf4 = state.get("nf4")
    candidates = merge_candidates(cfg.fuse.merge_base, nf4)
    chosen, reference, scores = choose_merge_base(cfg, base_dir, ckpt, adapter, soul, dtype, candidates, nf4)

    with atomic_dir(out_dir) as tmp:
        write_model_folder(base_dir, tmp, hf, cfg.fuse.dtype)
        fuse_tensors(base_dir, tmp, adapter, soul, dtype,
                     base_weights=nf4_round_trip(nf4) if chosen == "dequantized" else None)
        result, gated = None, None
        if cfg.fidelity.enabled:  # the gate reads back what was written, and keeps its logits for convert
            logits = fused_logits(tmp, reference.ids)
            save_logits(tmp / FUSED_LOGITS, reference.ids, logits)
            result = compare(reference.logits, logits)
            gated = gate_fused(cfg, result, chosen)
        files = folder_records(tmp, exclude=(CARD_FILE,))  # the card changes after fuse (modelcard.py)
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
            "merge_base_kl": {n: c.kl for n, c in scores.items()} or ({chosen: result.kl} if result else {}),
            "merge_base_reason": merge_reason(cfg.fuse.merge_base, nf4, chosen),
            "tied_input": bool(hf.get("tie_word_embeddings", False)),
            "inputs": {p.name: sha256_file(p) for p in (ckpt / "adapter_model.safetensors", ckpt / SOUL_FILE)},
            "outputs": {n: r["sha256"] for n, r in files.items() if n.endswith(".safetensors")},
            # Every file with its size: integrity.sweep/verify_folder find a damaged one.
            "files": files,
            # The gate's figure belongs to the model: the card states it from here, so a card
            # rendered without reports/ (cleaned, or a fused folder moved) still has it.
            "fidelity": gated,
        }
        atomic_write_text(tmp / FUSION_MARKER, json.dumps(provenance, indent=1) + "\n")
        write_card(cfg, tmp)
    return out_dir


def choose_merge_base(cfg: Config, base_dir: Path, ckpt: Path, adapter: LoraAdapter, soul: SoulState,
                      dtype: torch.dtype, candidates: list[str], nf4: dict | None):
    """(chosen merge base, the trained model's reference logits or None, KL of each candidate).

    With several candidates (merge_base auto after NF4 training) each is evaluated as fuse
    would write it, layer by layer and never written, in the same pass as the trained
    model; the closer one is kept.
    """
    if not (cfg.fidelity.enabled or len(candidates) > 1):
        return candidates[0], None, {}
    variants = {}
    if len(candidates) > 1:
        variants = {name: merge_candidate(adapter, soul, dtype, nf4_round_trip(nf4) if name == "dequantized" else None)
                    for name in candidates}
    reference, scores = score_merge(cfg, base_dir, ckpt, variants)
    chosen = min(scores, key=lambda n: scores[n].kl) if len(candidates) > 1 else candidates[0]
    if len(candidates) > 1:
        print(f"[fuse] merge base {chosen}: KL to the trained model "
              + ", ".join(f"{n} {scores[n].kl:.3g}" for n in candidates))
    return chosen, reference, scores


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
