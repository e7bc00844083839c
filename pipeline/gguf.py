"""Stage 3, gguf: convert the fused model with the pinned llama.cpp, then quantize.

`convert` runs llama.cpp's own `convert_hf_to_gguf.py` (with its vendored
gguf-py) on `<run>/fused/` to `gguf/<run>-<outtype>.gguf`; `quantize` runs
`llama-quantize` from that file to `gguf/<run>-<type>.gguf`. Both write
under a temporary name and rename when llama.cpp has finished and the
header checks out.
"""
from __future__ import annotations

from pathlib import Path

from . import llamacpp
from .config import Config
from .errors import ToolchainError


def convert(cfg: Config) -> Path:
    """Fused HF folder -> GGUF at `gguf.outtype`. Raises ToolchainError."""
    fused = cfg.fused_dir
    if not cfg.fused_marker.is_file():
        raise ToolchainError(f"{fused}: no complete fused model ({cfg.fused_marker.name} missing); run `make fuse`")
    out = cfg.gguf_path(cfg.gguf.outtype)
    print(f"[convert] {fused} -> {out}")
    check = None
    if cfg.fidelity.enabled:
        from .fidelity import check_converted

        def check(tmp: Path) -> None:
            check_converted(cfg, fused, tmp)
    return llamacpp.convert_hf_to_gguf(fused, out, cfg.gguf.outtype, model_name=gguf_model_name(cfg), check=check)


def gguf_model_name(cfg: Config) -> str:
    """general.name of the GGUF: the run's name, marked as Phi-3.

    llama.cpp gives Phi-3's special tokens their right-strip (as tokenizer.json
    has it) only when general.name says phi3; without it chat turns tokenize
    differently in llama.cpp and Ollama than in training.
    """
    name = cfg.run.name
    return name if "phi3" in name.lower() or "phi-3" in name.lower() else f"{name}-phi3"


def quantize(cfg: Config, qtype: str) -> Path:
    """Converted GGUF -> `qtype` (case-insensitive, e.g. Q4_K_M)."""
    matches = [q for q in cfg.gguf.quantizations if q.lower() == qtype.lower()]
    if not matches:
        raise ToolchainError(f"gguf.quantizations does not list {qtype!r} ({cfg.gguf.quantizations})")
    src, out = cfg.gguf_path(cfg.gguf.outtype), cfg.gguf_path(matches[0])
    llamacpp.validate_gguf(src)
    print(f"[quantize] {src.name} -> {out.name} ({matches[0]})")
    check = None
    if cfg.fidelity.enabled:
        from .fidelity import check_quantized

        def check(tmp: Path) -> None:
            check_quantized(cfg, src, tmp, matches[0])
    return llamacpp.quantize(src, out, matches[0], output_tensor_type=cfg.gguf.output_tensor_type, check=check)
