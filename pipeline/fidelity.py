"""The fidelity gate: each conversion must keep the model that was trained.

At every step the output is compared with its input on fixed chat-formatted
Japanese and English prompts, before the output is renamed into place:

  fuse      trained model (as trained: NF4 or not, + LoRA + soul) vs fused HF model
  convert   fused HF model vs the converted GGUF in llama.cpp (F32 KV cache),
            and the two tokenizers on the same texts; and (fidelity.compare_f32)
            fused HF model vs a temporary f32 GGUF, to float rounding
  quantize  converted GGUF vs each quantized GGUF

A comparison is the mean KL divergence of the next-token distributions over
all positions, plus top-1 agreement and the largest logit difference. When
KL exceeds its `fidelity.*` bound the stage fails naming the step and the
figure, nothing is renamed into place, and the run's artifacts past that
step are removed, so no later `make` or Ollama picks up a model that does not
match. Every result goes to `<run>/reports/fidelity.json` and a readable
`fidelity.md`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import llamacpp
from .artifacts import atomic_write_text
from .config import Config
from .errors import PipelineError
from .hf import load_trained

# Each under 2047 tokens: llama.cpp ignores Phi-3's sliding window beyond it.
CONVERSATIONS = [
    [{"role": "user", "content": "日本の四季について、短く説明してください。"}],
    [{"role": "system", "content": "あなたは親切で正確な日本語アシスタントです。"},
     {"role": "user", "content": "黄金比とは何ですか？身近な例を一つ挙げてください。"}],
    [{"role": "user", "content": "おすすめの朝ごはんは？"},
     {"role": "assistant", "content": "ご飯とみそ汁、焼き魚はいかがでしょうか。"},
     {"role": "user", "content": "パン派の人には何がいいですか？"}],
    [{"role": "user", "content": "Explain in one sentence why the sky is blue."}],
]


class FidelityError(PipelineError):
    """A converted model that no longer matches its source."""


@dataclass(frozen=True)
class Comparison:
    kl: float  # mean over positions of KL(reference || candidate), nats
    top1: float  # fraction of positions whose most likely next token agrees
    max_abs: float  # largest absolute logit difference
    positions: int


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Comparison:
    """Compare per-prompt logits [positions, vocab] of two models."""
    kls, agree, max_abs, n = [], 0, 0.0, 0
    for ref, cand in zip(reference, candidate):
        v = min(ref.shape[-1], cand.shape[-1])  # GGUF vocab may drop padding rows
        p = torch.log_softmax(torch.from_numpy(ref[:, :v]).double(), -1)
        q = torch.log_softmax(torch.from_numpy(cand[:, :v]).double(), -1)
        kls.append((p.exp() * (p - q)).sum(-1))
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        max_abs = max(max_abs, float(np.abs(ref[:, :v] - cand[:, :v]).max()))
        n += ref.shape[0]
    return Comparison(kl=float(torch.cat(kls).mean()), top1=agree / n, max_abs=max_abs, positions=n)


def prompt_texts(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]


def prompt_ids(tokenizer) -> list[list[int]]:
    return [list(tokenizer(t).input_ids) for t in prompt_texts(tokenizer)]


def hf_logits(model, ids: list[list[int]]) -> list[np.ndarray]:
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for seq in ids:
            logits = model(torch.tensor([seq], device=device)).logits[0]
            out.append(logits.double().cpu().numpy())
    return out


def gguf_model(path: Path, n_ctx: int, vocab_only: bool = False):
    llama_cpp = llamacpp.load_bindings()
    # F32 KV cache (type 0): the default F16 cache alone adds ~1e-3 of logit error.
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0,
                           n_gpu_layers=-1, n_threads=os.cpu_count(), verbose=False, vocab_only=vocab_only)


def gguf_logits(path: Path, ids: list[list[int]]) -> list[np.ndarray]:
    llm = gguf_model(path, n_ctx=max(len(s) for s in ids) + 8)
    out = []
    for seq in ids:
        llm.reset()
        llm.eval(seq)
        out.append(np.array(llm.scores[: len(seq)], dtype=np.float64))
    return out


def tokenization_mismatches(path: Path, tokenizer) -> list[str]:
    """Prompts that llama.cpp tokenizes differently from the HF tokenizer."""
    vocab = gguf_model(path, n_ctx=64, vocab_only=True)
    texts = prompt_texts(tokenizer) + ["こんにちは、世界！ 1.618 ✨", "  leading spaces\tand tabs\n"]
    return [t for t in texts if vocab.tokenize(t.encode(), add_bos=True, special=True) != tokenizer(t).input_ids]


# -- the gate ---------------------------------------------------------------

def report_path(cfg: Config) -> Path:
    return cfg.run_dir / "reports" / "fidelity.json"


def record(cfg: Config, step: str, entry: dict) -> None:
    """Add one step's result to reports/fidelity.json and re-render fidelity.md."""
    path = report_path(cfg)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        report = {}
    report[step] = entry
    atomic_write_text(path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    rows = ["| step | reference | candidate | KL | top-1 | max abs logit diff | bound | result |",
            "|---|---|---|---|---|---|---|---|"]
    for name, e in report.items():
        rows.append(f"| {name} | {e['reference']} | {e['candidate']} | {e['kl']:.3g} | {e['top1']:.3f} | "
                    f"{e['max_abs']:.3g} | {e['bound']:.3g} | {'pass' if e['passed'] else 'FAIL'} |")
    atomic_write_text(path.with_suffix(".md"), "# Fidelity\n\n" + "\n".join(rows) + "\n")


def gate(cfg: Config, step: str, reference: str, candidate: str, result: Comparison, bound: float,
         key: str, extra: dict | None = None) -> None:
    """Record the comparison; raise FidelityError (and clear downstream artifacts) past the bound."""
    passed = result.kl <= bound and not (extra or {}).get("tokenization_mismatches")
    record(cfg, step, {"reference": reference, "candidate": candidate, **asdict(result), "bound": bound,
                       "bound_key": key, "passed": passed, **(extra or {})})
    print(f"[fidelity] {step}: KL {result.kl:.3g} (bound {bound:.3g}), top-1 {result.top1:.3f}, "
          f"max |diff| {result.max_abs:.3g} -> {'pass' if passed else 'FAIL'}")
    if passed:
        return
    discard_from(cfg, step)
    if (extra or {}).get("tokenization_mismatches"):
        raise FidelityError(f"fidelity gate failed at {step}: llama.cpp tokenizes "
                            f"{len(extra['tokenization_mismatches'])} prompt(s) differently from {reference}")
    raise FidelityError(
        f"fidelity gate failed at {step}: KL({reference} || {candidate}) = {result.kl:.4g} > {bound:.4g} "
        f"({key}); top-1 agreement {result.top1:.3f}. Report: {report_path(cfg).with_suffix('.md')}"
    )


def discard_from(cfg: Config, step: str) -> None:
    """Remove the run's artifacts from `step` ("fuse", "convert[:f32]", "quantize:<type>") on:
    none may outlive a failed gate."""
    kind, _, detail = step.partition(":")
    gguf_dir = cfg.gguf_path("x").parent
    if kind == "fuse":
        shutil.rmtree(cfg.fused_dir, ignore_errors=True)
    if kind in ("fuse", "convert"):
        for p in gguf_dir.glob(f"{cfg.run.name}-*.gguf"):
            p.unlink()
        if cfg.imatrix_path is not None:
            cfg.imatrix_path.unlink(missing_ok=True)
    if kind == "quantize":
        cfg.gguf_path(detail).unlink(missing_ok=True)


def bound_for(cfg: Config, qtype: str) -> tuple[float, str]:
    f = cfg.fidelity
    for name, value in f.max_kl_quantized.items():
        if name.lower() == qtype.lower():
            return value, f"fidelity.max_kl_quantized.{name}"
    return f.max_kl_quantized_default, "fidelity.max_kl_quantized_default"


@dataclass
class Reference:
    """The trained model's logits on the gate's prompts."""

    ids: list[list[int]]
    logits: list[np.ndarray]
    device: torch.device


def trained_reference(cfg: Config, checkpoint: Path) -> Reference:
    """Load the trained model as trained (NF4 or not, + LoRA + soul) and run the prompts."""
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    trained, tokenizer = load_trained(checkpoint, device=device)
    ids = prompt_ids(tokenizer)
    return Reference(ids, hf_logits(trained, ids), device)


def compare_fused(reference: Reference, fused_dir: Path) -> Comparison:
    """The trained model's logits vs a fused folder's (float32 on CPU, as saved on GPU)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if reference.device.type == "cpu" else "auto"
    fused = AutoModelForCausalLM.from_pretrained(str(fused_dir), dtype=dtype).to(reference.device).eval()
    return compare(reference.logits, hf_logits(fused, reference.ids))


def gate_fused(cfg: Config, result: Comparison, merge_base: str) -> None:
    gate(cfg, "fuse", "trained", f"fused (merge base {merge_base})", result, cfg.fidelity.max_kl_fused,
         "fidelity.max_kl_fused")


def check_converted(cfg: Config, fused_dir: Path, gguf: Path) -> None:
    """convert: the fused HF model vs its GGUF (tokens and logits), and vs an f32 GGUF.

    The f32 GGUF (fidelity.compare_f32) is converted into a temporary folder and
    removed: it shows the converter and llama.cpp reproduce the model to float
    rounding, so what the outtype comparison measures is the outtype's own rounding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(fused_dir))
    ids = prompt_ids(tokenizer)
    fused = AutoModelForCausalLM.from_pretrained(str(fused_dir), dtype=torch.float32).eval()
    reference = hf_logits(fused, ids)
    del fused
    mismatches = tokenization_mismatches(gguf, tokenizer)
    f = cfg.fidelity
    if f.compare_f32 and cfg.gguf.outtype != "f32":
        with tempfile.TemporaryDirectory(prefix=".tmp-f32-", dir=gguf.parent) as tmp:
            f32 = llamacpp.convert_hf_to_gguf(fused_dir, Path(tmp) / f"{cfg.run.name}-f32.gguf", "f32",
                                              model_name=cfg.gguf_model_name)
            gate(cfg, "convert:f32", "fused", f"{f32.name} (temporary)", compare(reference, gguf_logits(f32, ids)),
                 f.max_kl_converted_f32, "fidelity.max_kl_converted_f32")
    gate(cfg, "convert", "fused", cfg.gguf_path(cfg.gguf.outtype).name, compare(reference, gguf_logits(gguf, ids)),
         f.max_kl_converted, "fidelity.max_kl_converted", extra={"tokenization_mismatches": mismatches})


def check_quantized(cfg: Config, converted: Path, quantized: Path, qtype: str) -> None:
    """quantize: the converted GGUF vs a quantized one."""
    from transformers import AutoTokenizer

    ids = prompt_ids(AutoTokenizer.from_pretrained(str(cfg.fused_dir)))
    bound, key = bound_for(cfg, qtype)
    gate(cfg, f"quantize:{qtype}", converted.name, cfg.gguf_path(qtype).name,
         compare(gguf_logits(converted, ids), gguf_logits(quantized, ids)), bound, key)
