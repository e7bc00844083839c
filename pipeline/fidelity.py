"""The fidelity gate: each conversion must keep the model that was trained.

At every step the output is compared with its input on fixed chat-formatted
Japanese and English prompts, before the output is renamed into place:

  fuse      trained model (as trained: NF4 or not, + LoRA + soul) vs fused HF model
  convert   (fidelity.compare_f32) a slice of the fused HF model vs its temporary
            f32 GGUF, to float rounding; then the fused HF model vs the converted
            GGUF in llama.cpp as Ollama runs it (the context it allocates,
            cfg.served_context, and its F16 KV cache), and the two tokenizers on the same texts
  quantize  converted GGUF vs each quantized GGUF, at that context too

HF models are evaluated layer by layer from their files (pipeline/layered.py),
so the gate needs memory for a layer, not for a model; the fused model's
logits are kept beside it (fused/fidelity_logits.npz) for convert.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import llamacpp
from .adapter import EMBED, HEAD, LoraAdapter, merged_weight, nf4_round_trip, read_adapter, whole
from .artifacts import atomic_file, atomic_write_text
from .chattext import encode_rendered, without_bos
from .checkpoint import read_marker
from .config import Config
from .constants import LONG_CONTEXT_PROBE
from .errors import PipelineError
from .hf import load_tokenizer, load_trained
from .integrity import remove
from .layered import Variant, layered_logits, stored_weight, write_layer_slice
from .modeldir import context_lengths
from .soul import SOUL_FILE, SO8Soul, SoulState, load_soul

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


# Beside the fused model's weights: its logits on the gate's prompts, so convert never loads it.
FUSED_LOGITS = "fidelity_logits.npz"


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
    return [list(encode_rendered(tokenizer, t).input_ids) for t in prompt_texts(tokenizer)]


def hf_logits(model, ids: list[list[int]]) -> list[np.ndarray]:
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for seq in ids:
            logits = model(torch.tensor([seq], device=device)).logits[0]
            out.append(logits.double().cpu().numpy())
    return out


# llama.cpp's ggml types for the KV cache: F32 for comparisons down to float rounding (the
# default F16 cache alone adds ~1e-3 of logit error), F16 for the model as Ollama runs it
# (OLLAMA_KV_CACHE_TYPE defaults to f16, envconfig/config.go) at the context it allocates.
KV_F32, KV_F16 = 0, 1


def gguf_model(path: Path, n_ctx: int, vocab_only: bool = False, kv_type: int = KV_F32):
    llama_cpp = llamacpp.load_bindings()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, type_k=kv_type, type_v=kv_type,
                           n_gpu_layers=-1, n_threads=os.cpu_count(), verbose=False, vocab_only=vocab_only)


def gguf_logits(path: Path, ids: list[list[int]], n_ctx: int = 0) -> list[np.ndarray]:
    """llama.cpp's logits for each prompt. n_ctx 0: a context just long enough, F32 KV cache
    (float rounding only). n_ctx > 0: the context Ollama allocates, with Ollama's F16 KV cache;
    for LongRoPE models the allocated context, not the prompt, picks the RoPE factors."""
    shortest = max(len(s) for s in ids) + 8
    llm = gguf_model(path, n_ctx=max(n_ctx, shortest), kv_type=KV_F16 if n_ctx else KV_F32)
    out = []
    for seq in ids:
        llm.reset()
        llm.eval(seq)
        out.append(np.array(llm.scores[: len(seq)], dtype=np.float64))
    return out


def tokenization_mismatches(path: Path, tokenizer) -> list[str]:
    """Prompts that llama.cpp tokenizes differently from the HF tokenizer, each side as it is served:
    llama.cpp gets the text without a leading BOS text and adds the GGUF's BOS (what Ollama sends
    it), HF counts the BOS once (chattext.encode_rendered)."""
    vocab = gguf_model(path, n_ctx=64, vocab_only=True)
    texts = prompt_texts(tokenizer) + ["こんにちは、世界！ 1.618 ✨", "  leading spaces\tand tabs\n"]
    return [t for t in texts if vocab.tokenize(without_bos(tokenizer, t).encode(), add_bos=True, special=True)
            != encode_rendered(tokenizer, t).input_ids]


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
        verdict = "pass" if e["passed"] else "FAIL"
        if e.get("enforced") is False:  # report_long_context: shown, not gated
            verdict = f"{'within' if e['passed'] else 'OVER'} bound, reported only (ollama.allow_long_context)"
        rows.append(f"| {name} | {e['reference']} | {e['candidate']} | {e['kl']:.3g} | {e['top1']:.3f} | "
                    f"{e['max_abs']:.3g} | {e['bound']:.3g} | {verdict} |")
    atomic_write_text(path.with_suffix(".md"), "# Fidelity\n\n" + "\n".join(rows) + "\n")


def gate(cfg: Config, step: str, reference: str, candidate: str, result: Comparison, bound: float,
         key: str, extra: dict | None = None) -> dict:
    """Record the comparison and return its entry; raise FidelityError (and clear downstream
    artifacts) past the bound."""
    passed = result.kl <= bound and not (extra or {}).get("tokenization_mismatches")
    entry = {"reference": reference, "candidate": candidate, **asdict(result), "bound": bound,
             "bound_key": key, "passed": passed, **(extra or {})}
    record(cfg, step, entry)
    print(f"[fidelity] {step}: KL {result.kl:.3g} (bound {bound:.3g}), top-1 {result.top1:.3f}, "
          f"max |diff| {result.max_abs:.3g} -> {'pass' if passed else 'FAIL'}")
    if passed:
        return entry
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
            remove(p)  # with its .sha256 sidecar
        if cfg.imatrix_path is not None:
            remove(cfg.imatrix_path)
    if kind == "quantize":
        remove(cfg.gguf_path(detail))


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


def gate_on_gpu(cfg: Config) -> bool:
    """Whether the trained reference runs whole on the GPU (as trained there) rather than layer by layer."""
    return torch.cuda.is_available() and cfg.train.device != "cpu"


def trained_variant(checkpoint: Path) -> Variant:
    """The trained model as the layer-by-layer evaluator computes it: the base weights as training
    saw them (NF4 round trip when trained in NF4), LoRA unmerged, the soul before the head."""
    marker = read_marker(checkpoint) or {}
    base_weights = nf4_round_trip(marker["nf4"]) if marker.get("nf4") else stored_weight
    soul = SO8Soul.from_state(load_soul(checkpoint / SOUL_FILE)).eval()
    return Variant(weight=lambda name, w: base_weights(name, w).float(), lora=read_adapter(checkpoint), soul=soul)


def merge_candidate(adapter: LoraAdapter, soul: SoulState, dtype: torch.dtype,
                    base_weights: Callable[[str, torch.Tensor], torch.Tensor] | None) -> Variant:
    """A fused model as fuse would write it (same merged_weight, same dtype), never written.

    merged_weight may merge into a float32 weight in place; the stored tensor is shared by
    every variant of the pass, so a float32 one is copied first."""

    def weight(name: str, w: torch.Tensor) -> torch.Tensor:
        own = w.clone() if w.dtype == torch.float32 else w
        return whole(merged_weight(name, own, adapter, soul, dtype, base_weights)).float()

    # The fold is row by row; a LoRA on the embeddings or the head is not.
    return Variant(weight=weight, by_rows=not {EMBED, HEAD} & adapter.factors.keys())


def score_merge(cfg: Config, base_dir: Path, checkpoint: Path, candidates: dict[str, Variant],
                ) -> tuple[Reference, dict[str, Comparison]]:
    """The trained model's logits on the gate's prompts, and each merge candidate compared with them.

    On CPU, one layer-by-layer pass over the base computes the trained model and every
    candidate together (each layer read once, no model whole in memory); with a GPU the
    trained model runs whole there, as it was trained, and the candidates layer by layer.
    """
    ids = prompt_ids(load_tokenizer(base_dir))
    variants = dict(candidates)
    if gate_on_gpu(cfg):
        trained, _ = load_trained(checkpoint, device=torch.device("cuda"))
        reference = Reference(ids, hf_logits(trained, ids))
        del trained
        torch.cuda.empty_cache()
    else:
        variants["trained"] = trained_variant(checkpoint)
    logits = layered_logits(base_dir, ids, variants) if variants else {}
    if "trained" in logits:
        reference = Reference(ids, logits.pop("trained"))
    return reference, {name: compare(reference.logits, logits[name]) for name in candidates}


def fused_logits(fused_dir: Path, ids: list[list[int]]) -> list[np.ndarray]:
    """A fused folder's logits, layer by layer from its files (what convert compares against)."""
    return layered_logits(fused_dir, ids, {"fused": Variant()})["fused"]


def save_logits(path: Path, ids: list[list[int]], logits: list[np.ndarray]) -> None:
    """The gate's prompts and a model's logits on them, as plain arrays (no pickles)."""
    arrays = {}
    for i, (seq, lg) in enumerate(zip(ids, logits)):
        arrays[f"ids_{i}"] = np.asarray(seq, dtype=np.int64)
        arrays[f"logits_{i}"] = lg.astype(np.float32)  # float32 logits widened to float64: exact both ways
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def load_logits(path: Path, ids: list[list[int]]) -> list[np.ndarray] | None:
    """save_logits' logits when they are for exactly these prompts; else None."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if len(f.files) != 2 * len(ids) or any(f[f"ids_{i}"].tolist() != seq for i, seq in enumerate(ids)):
                return None
            return [f[f"logits_{i}"].astype(np.float64) for i in range(len(ids))]
    except (OSError, ValueError, KeyError):
        return None


def gate_fused(cfg: Config, result: Comparison, merge_base: str) -> dict:
    return gate(cfg, "fuse", "trained", f"fused (merge base {merge_base})", result, cfg.fidelity.max_kl_fused,
                "fidelity.max_kl_fused")


def fused_reference(fused_dir: Path, ids: list[list[int]]) -> list[np.ndarray]:
    """The fused model's logits: those fuse kept beside its weights, or computed layer by layer."""
    kept = load_logits(fused_dir / FUSED_LOGITS, ids)
    return kept if kept is not None else fused_logits(fused_dir, ids)


def check_converter_exactness(cfg: Config, fused_dir: Path) -> dict:
    """convert:f32 (fidelity.compare_f32): the converter and llama.cpp reproduce the model to
    float rounding, so what the outtype comparison then measures is the outtype's own rounding.

    That property does not depend on depth, and an f32 GGUF of the whole model would be a
    temporary twice the size of the f16 one (15 GB for Phi-3.5-mini). So the first
    `fidelity.f32_slice_layers` decoder layers of the fused model, with its embeddings,
    final norm and folded head, are written as a model of their own, converted to f32 and
    compared with that slice's HF logits; the whole model when it has no more layers than
    that. Runs before the outtype conversion and removes its files before returning, so
    convert's peak extra disk stays at the converted GGUF's size. Returns {"convert:f32": its entry}.
    """
    f = cfg.fidelity
    gguf_dir = cfg.gguf_path(cfg.gguf.outtype).parent
    gguf_dir.mkdir(parents=True, exist_ok=True)
    ids = prompt_ids(load_tokenizer(fused_dir))
    layers = int(json.loads((fused_dir / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])
    with tempfile.TemporaryDirectory(prefix=".tmp-f32-", dir=gguf_dir) as tmp:
        if layers > f.f32_slice_layers:
            source = write_layer_slice(fused_dir, Path(tmp) / "slice", f.f32_slice_layers)
            reference = fused_logits(source, ids)
            what = f"first {f.f32_slice_layers} of {layers} layers"
        else:
            source, reference, what = fused_dir, fused_reference(fused_dir, ids), "whole model"
        f32 = llamacpp.convert_hf_to_gguf(source, Path(tmp) / f"{cfg.run.name}-f32.gguf", "f32",
                                          model_name=cfg.gguf_model_name)
        return {"convert:f32": gate(cfg, "convert:f32", f"fused ({what})", f"{f32.name} (temporary)",
                                    compare(reference, gguf_logits(f32, ids)), f.max_kl_converted_f32,
                                    "fidelity.max_kl_converted_f32")}


def gate_contexts(cfg: Config, model_dir: Path) -> tuple[int, int | None]:
    """(n_ctx the gate runs llama.cpp at, n_ctx of the long-context report or None).

    Ollama runs the model at cfg.served_context. Up to the model's original context that is the
    gated context itself. Above it (only with ollama.allow_long_context) llama.cpp uses LongRoPE's
    long factors for every prompt (src/llama-model.cpp: `n_ctx_seq > n_ctx_orig_yarn`), so the
    model Ollama runs is not the trained one: the gate then checks the conversion at the original
    context and reports the long-factor model beside it. The factor choice is the only way the
    allocated context changes a prompt's logits, so that report runs at the served context or at
    LONG_CONTEXT_PROBE tokens past the original one, whichever is less: the same model, without
    a KV cache sized for 131072 tokens.
    """
    served = cfg.served_context
    known = context_lengths(model_dir)
    original = known[0] if known else served
    if served <= original:
        return served, None
    return original, min(served, original + LONG_CONTEXT_PROBE)


def report_long_context(cfg: Config, reference: list[np.ndarray], candidate: list[np.ndarray], n_ctx: int,
                        what: str, against: str, bound: float, key: str) -> None:
    """Record (never fail) the long-factor model against `against`, the trained model at its
    original context: the user accepted it with ollama.allow_long_context, and this says what it costs."""
    result = compare(reference, candidate)
    record(cfg, f"{what}:long-context", {
        "reference": against, "candidate": f"{what} at n_ctx {n_ctx} (LongRoPE long factors)", **asdict(result),
        "bound": bound, "bound_key": key, "passed": result.kl <= bound, "enforced": False, "n_ctx": n_ctx,
        "served_context": cfg.served_context})
    print(f"[fidelity] {what} at the served context {cfg.served_context} (long RoPE factors): KL {result.kl:.3g} "
          f"against the model at its original context (bound {bound:.3g} not enforced: ollama.allow_long_context)")


def check_converted(cfg: Config, fused_dir: Path, gguf: Path) -> dict:
    """convert: the fused HF model vs its GGUF in llama.cpp, tokens and logits.

    llama.cpp runs at the context Ollama will allocate (gate_contexts); with
    ollama.allow_long_context and a num_ctx above the original context, the long-factor model's
    KL is reported beside the gate (reports/fidelity.md, "convert:long-context") and does not fail it.
    The fused model's logits are the ones fuse kept beside it (fused/fidelity_logits.npz),
    so no HF model is loaded here; an older fused folder without them is evaluated layer by layer.
    Returns {"convert": the gate's entry}.
    """
    tokenizer = load_tokenizer(fused_dir)
    ids = prompt_ids(tokenizer)
    reference = fused_reference(fused_dir, ids)
    mismatches = tokenization_mismatches(gguf, tokenizer)
    f = cfg.fidelity
    n_ctx, long_ctx = gate_contexts(cfg, fused_dir)
    name = cfg.gguf_path(cfg.gguf.outtype).name
    entry = gate(cfg, "convert", "fused", f"{name} (n_ctx {n_ctx})", compare(reference, gguf_logits(gguf, ids, n_ctx)),
                 f.max_kl_converted, "fidelity.max_kl_converted",
                 extra={"tokenization_mismatches": mismatches, "n_ctx": n_ctx})
    if long_ctx is not None:
        report_long_context(cfg, reference, gguf_logits(gguf, ids, long_ctx), long_ctx, "convert", "fused",
                            f.max_kl_converted, "fidelity.max_kl_converted")
    return {"convert": entry}


def check_quantized(cfg: Config, converted: Path, quantized: Path, qtype: str) -> dict:
    """quantize: the converted GGUF vs a quantized one, both at the gate's context
    (gate_contexts); the quantized model at the long context is reported beside it.
    Returns {"quantize:<type>": the gate's entry}."""
    ids = prompt_ids(load_tokenizer(cfg.fused_dir))
    bound, key = bound_for(cfg, qtype)
    n_ctx, long_ctx = gate_contexts(cfg, cfg.fused_dir)
    reference = gguf_logits(converted, ids, n_ctx)
    step = f"quantize:{qtype}"
    entry = gate(cfg, step, converted.name, f"{cfg.gguf_path(qtype).name} (n_ctx {n_ctx})",
                 compare(reference, gguf_logits(quantized, ids, n_ctx)), bound, key, extra={"n_ctx": n_ctx})
    if long_ctx is not None:
        report_long_context(cfg, reference, gguf_logits(quantized, ids, long_ctx), long_ctx,
                            step, converted.name, bound, key)
    return {step: entry}
