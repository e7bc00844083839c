"""Stage 3, gguf: convert the fused model with the pinned llama.cpp, then quantize.

`convert` runs llama.cpp's own `convert_hf_to_gguf.py` (with its vendored
gguf-py) on `<run>/fused/` to `gguf/<run>-<outtype>.gguf`; `quantize` runs
`llama-quantize` from that file to `gguf/<run>-<type>.gguf`. Both write
under a temporary name and rename when llama.cpp has finished and the
header checks out. The gate's figures for a GGUF go into its sidecar record with it
(integrity.write_sidecar), so they travel with the file: the model card states them from there.
"""
from __future__ import annotations

from pathlib import Path

from . import llamacpp
from .config import FUSION_MARKER, Config
from .errors import BadInputError, ToolchainError
from .formats import validate_gguf
from .fidelity import check_converted, check_converter_exactness, check_quantized, gguf_model
from .integrity import verify_file, verify_folder
from .resources import require


def convert(cfg: Config) -> Path:
    """Fused HF folder -> GGUF at `gguf.outtype`. Raises ToolchainError."""
    fused = cfg.fused_dir
    if not cfg.fused_marker.is_file():
        raise ToolchainError(f"{fused}: no complete fused model ({cfg.fused_marker.name} missing); run `make fuse`")
    verify_folder(fused, FUSION_MARKER)
    require(cfg, "convert")
    out = cfg.gguf_path(cfg.gguf.outtype)
    print(f"[convert] {fused} -> {out}")
    exact = {}
    if cfg.fidelity.enabled and cfg.fidelity.compare_f32 and cfg.gguf.outtype != "f32":
        exact = check_converter_exactness(cfg, fused)  # first: its temporary files are gone before the GGUF is written

    def check(tmp: Path) -> dict | None:
        require_folded_head(tmp)
        return {**exact, **check_converted(cfg, fused, tmp)} if cfg.fidelity.enabled else None
    return llamacpp.convert_hf_to_gguf(fused, out, cfg.gguf.outtype, model_name=cfg.gguf_model_name, check=check)


# The GGUF tensor llama.cpp uses as the LM head; without it, it uses token_embd ("if output is NULL,
# init from the input tok embed": src/models/qwen3.cpp, llama.cpp, gemma3.cpp, ... at the pin), and
# the soul folded into the head is gone.
OUTPUT_TENSOR = "output.weight"


def require_folded_head(path: Path) -> None:
    """The folded head is in the GGUF. Always checked, gate or not: a converter that drops an untied
    head (Gemma-2's does) makes a model that loads, runs and is not the trained one.
    Errors: ToolchainError naming the file."""
    if OUTPUT_TENSOR not in validate_gguf(path).tensor_types:
        raise ToolchainError(
            f"{path.name}: no {OUTPUT_TENSOR} tensor, so llama.cpp would use token_embd as the LM head and the "
            "soul folded into the head would be lost; the converter dropped the fused model's lm_head")


def quantize(cfg: Config, qtype: str) -> Path:
    """Converted GGUF -> `qtype` (case-insensitive, e.g. Q4_K_M)."""
    matches = [q for q in cfg.gguf.quantizations if q.lower() == qtype.lower()]
    if not matches:
        raise BadInputError(f"{cfg.source}: gguf.quantizations does not list {qtype!r} ({cfg.gguf.quantizations})")
    src, out = cfg.gguf_path(cfg.gguf.outtype), cfg.gguf_path(matches[0])
    verify_file(src)
    require(cfg, "quantize")
    print(f"[quantize] {src.name} -> {out.name} ({matches[0]})")
    def check(tmp: Path) -> dict | None:
        require_folded_head(tmp)
        return check_quantized(cfg, src, tmp, matches[0]) if cfg.fidelity.enabled else None
    imatrix = cfg.imatrix_path
    if imatrix is not None:
        if not imatrix.is_file():
            raise ToolchainError(f"gguf.imatrix.calibration is set but {imatrix} is missing; run `make gguf`")
        verify_file(imatrix)
    return llamacpp.quantize(src, out, matches[0], output_tensor_type=cfg.gguf.output_tensor_type,
                             imatrix=imatrix, check=check)


def imatrix(cfg: Config) -> Path:
    """Converted GGUF + gguf.imatrix.calibration text -> <run>/imatrix.gguf."""
    out, calibration = cfg.imatrix_path, cfg.imatrix_calibration
    if out is None or calibration is None:
        raise BadInputError(f"{cfg.source}: gguf.imatrix.calibration is not set; there is no importance matrix to build")
    src = cfg.gguf_path(cfg.gguf.outtype)
    verify_file(src)
    try:
        text = calibration.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"{calibration}: gguf.imatrix.calibration is not UTF-8 text ({e})") from None
    n = len(gguf_model(src, n_ctx=64, vocab_only=True).tokenize(text.encode(), add_bos=True, special=False))
    ctx = cfg.gguf.imatrix.ctx
    if n < 2 * ctx:
        raise BadInputError(f"{calibration}: {n} tokens, but gguf.imatrix.ctx = {ctx} needs at least {2 * ctx} "
                            "(two chunks); give more text or a smaller ctx")
    # After the text check: a ctx past the text is the problem to name, not the memory it would take
    # (logits of ctx tokens over 32064 rows: 259 GB at ctx 1e6 with Phi-3's vocabulary).
    require(cfg, "imatrix")
    print(f"[imatrix] {src.name} on {calibration.name} ({n} tokens, chunks of {ctx}) -> {out.name}")
    return llamacpp.compute_imatrix(src, calibration, out, ctx=ctx, chunks=cfg.gguf.imatrix.chunks)
