"""Finding and loading Hugging Face models: hub ids and local folders alike, and a
training checkpoint as trained (base + LoRA + soul)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import read_marker
from .config import Config, check_base_architecture
from .errors import ModelError
from .modeldir import folder_problems, is_lfs_pointer, lfs_pointer_problem
from .soul import SOUL_FILE, SO8Soul, SoulHead, load_soul

# What a model folder needs; weights must be safetensors (no pickles).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def resolve_base(cfg: Config) -> Path:
    """The local folder of the configured base model.

    A local folder is used as is; a hub id (`owner/name`) is fetched at
    `model.revision` into the Hugging Face cache (HF_TOKEN and HF_HUB_OFFLINE
    are honoured by huggingface_hub). Raises ModelError naming `model.base`.
    """
    if cfg.base_is_local():
        return usable_model_dir(cfg.resolve(cfg.model.base))
    return usable_model_dir(fetch_from_hub(cfg.model.base, cfg.model.revision))


def fetch_from_hub(repo_id: str, revision: str | None) -> Path:
    """Snapshot a hub model (weights as safetensors only) into the HF cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, missing revision: all end here
        raise ModelError(
            f"model.base: cannot fetch {repo_id}@{revision} from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Set HF_TOKEN for gated models, or point model.base at a local folder."
        ) from None


def usable_model_dir(path: Path) -> Path:
    """`path` if it is a Phi-3 model folder with complete safetensors weights and a tokenizer; else ModelError."""
    if not (path / "config.json").is_file():
        raise ModelError(f"model.base: {path} is not a Hugging Face model folder (no config.json)")
    if is_lfs_pointer(path / "config.json"):
        raise ModelError(lfs_pointer_problem(path / "config.json"))
    hf = read_model_config(path)
    problems = check_base_architecture(hf, str(path / "config.json")) + folder_problems(path)
    if problems:
        raise ModelError("; ".join(problems))
    return path


def read_model_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path / 'config.json'}: cannot read model config: {e}") from None


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device: cuda was asked for but torch sees no CUDA device")
    return torch.device(setting)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_causal_lm(path: Path, *, nf4: bool, compute_dtype: torch.dtype, device: torch.device,
                   double_quant: bool = True, dtype: torch.dtype = torch.float32):
    """Load a causal LM, optionally with its linear layers in 4-bit NF4.

    The model comes back in train mode: with bitsandbytes on CPU, a single
    eval-mode forward repacks NF4 weights so that gradients stop flowing
    through them (see shared notes), so no eval forward may come first.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_transformers()
    kwargs: dict = {"dtype": dtype}
    if nf4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        kwargs["dtype"] = compute_dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not nf4:
        model.to(device)
    model.train()
    if nf4:
        guard_nf4_cpu_repack(model)
    return model


def guard_nf4_cpu_repack(model) -> int:
    """Keep bitsandbytes from silently breaking NF4 training on CPU.

    On CPUs with AVX512-BF16, an eval-mode, no-grad forward through a
    Linear4bit repacks its weight into a CPU-only layout for good; after that
    no gradient flows through the frozen base and LoRA gradients are wrong
    while the loss still falls. This turns that fast path off for every
    Linear4bit of the model (call it before any forward) and returns how many
    it guarded. Repacking cannot be undone exactly (the round trip changes
    the weights by ~5e-4), so a model already repacked is refused.
    """
    import bitsandbytes as bnb

    guarded = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise ModelError(
                    f"{name}: bitsandbytes repacked this NF4 weight for CPU inference (an eval-mode forward "
                    "ran first); training through it would give wrong gradients. Load the model again."
                )
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


def load_trained(checkpoint: Path | str, *, device: torch.device | None = None, nf4: bool | None = None):
    """Load base + adapter + soul from a checkpoint folder; returns (model, tokenizer).

    device: default CUDA when present, else CPU. nf4: load the base in 4-bit
    NF4 (default: as it was trained; bitsandbytes runs NF4 on CPU too). Raises ModelError
    for a folder that is not a complete checkpoint or a base that cannot be found.
    """
    from peft import PeftModel

    checkpoint = Path(checkpoint)
    marker = read_marker(checkpoint)
    if marker is None:
        raise ModelError(f"{checkpoint}: not a complete checkpoint (no checkpoint.json)")
    if not (checkpoint / "adapter_model.safetensors").is_file():  # PEFT would fall back to a pickled .bin
        raise ModelError(f"{checkpoint}: no adapter_model.safetensors (a pickled adapter_model.bin is not loaded)")
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
