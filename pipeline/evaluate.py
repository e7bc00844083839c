"""Stage eval: does the model keep its Japanese? Perplexity on held-out text.

    make eval [CONFIG=config.yaml]
    python -m pipeline eval --config demo.yaml

The held-out text (`eval.heldout`, never trained on) is tokenized once with
the run's tokenizer, and the same token ids are scored by every model of the
run:

  base       the configured base, original weights (float32 on CPU, layer by layer; bf16 on CUDA)
  trained    base + LoRA + soul from checkpoints/final, as trained (pipeline.hf.load_trained)
  fused      fused/, the plain HF model
  <outtype>  the converted GGUF, in llama.cpp (F32 KV cache)
  <quant>    each quantized GGUF, in llama.cpp

The ids are cut into chunks of `eval.chunk_tokens`, each scored on its own
after a BOS token, so every held-out token is predicted exactly once;
perplexity = exp(mean negative log-likelihood). The seeds' promise,
"Japanese ability maintained", is the bound trained / base perplexity <=
`eval.max_ppl_ratio`.

`reports/eval.json` and `reports/eval.md` are written whatever the outcome
(they are the evidence), with the fidelity figures of reports/fidelity.json
beside each converted model. `reports/eval.passed`, what Make takes as
done, is written only when the bound holds; a failed eval exits 1 naming
the figure and the bound, and the next `make eval` runs it again.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_write_text
from .config import Config
from .errors import BadInputError, PipelineError
from .fidelity import fused_logits, gguf_logits, hf_logits, trained_variant
from .hf import load_causal_lm, load_tokenizer, load_trained, resolve_base
from .layered import Variant, layered_logits

BOUND_KEY = "eval.max_ppl_ratio"


class EvalError(PipelineError):
    """The trained model is worse on held-out text than its bound allows."""


def heldout_chunks(cfg: Config, tokenizer) -> list[list[int]]:
    """The held-out text as token-id chunks, each opening with BOS (when the tokenizer has one)."""
    path = cfg.heldout_path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"eval.heldout: cannot read {path}: {e}") from None
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)[: cfg.eval.max_tokens]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = cfg.eval.chunk_tokens - len(bos)
    chunks = [bos + ids[i:i + body] for i in range(0, len(ids), body)]
    chunks = [c for c in chunks if len(c) >= 2]  # a chunk must predict at least one token
    if not chunks:
        raise BadInputError(f"eval.heldout: {path} holds no text to evaluate")
    return chunks


def negative_log_likelihood(logits: list[np.ndarray], chunks: list[list[int]]) -> tuple[float, int]:
    """(summed NLL in nats, tokens predicted): position t's logits score token t + 1 of its chunk."""
    total, count = 0.0, 0
    for chunk_logits, ids in zip(logits, chunks, strict=True):
        logp = torch.log_softmax(torch.from_numpy(np.asarray(chunk_logits[: len(ids) - 1])).double(), -1)
        target = torch.tensor(ids[1:])
        total -= float(logp.gather(1, target[:, None]).sum())
        count += len(ids) - 1
    return total, count


def _row(name: str, source: str, runtime: str, logits: list[np.ndarray], chunks: list[list[int]]) -> dict:
    nll, count = negative_log_likelihood(logits, chunks)
    row = {"model": name, "source": source, "runtime": runtime, "tokens": count, "nll": nll / count,
           "perplexity": math.exp(nll / count)}
    print(f"[eval] {name}: perplexity {row['perplexity']:.4g} over {count} tokens")
    return row


def _hf_logits_of(load, chunks: list[list[int]]) -> list[np.ndarray]:
    """Load one HF model, score the chunks, and let the model go before the next one loads."""
    model = load()
    logits = hf_logits(model, chunks)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return logits


def measure(cfg: Config) -> tuple[list[dict], list[list[int]]]:
    """Perplexity of every model of the run on the held-out chunks; returns (rows, chunks)."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    base_dir = resolve_base(cfg)
    chunks = heldout_chunks(cfg, load_tokenizer(base_dir))

    def in_run(p: Path) -> str:
        """An artifact of the run as a path inside the run folder (a folder ends in /)."""
        if not p.is_relative_to(cfg.run_dir):
            return str(p)
        return str(p.relative_to(cfg.run_dir)) + ("/" if p.is_dir() else "")

    sources = {"base": str(base_dir), "trained": in_run(cfg.final_checkpoint), "fused": in_run(cfg.fused_dir)}
    if device.type == "cpu":
        # Layer by layer from the files (pipeline/layered.py): memory for a layer, not for
        # three float32 models; the same logits bit for bit.
        logits = layered_logits(base_dir, chunks, {"base": Variant(), "trained": trained_variant(cfg.final_checkpoint)})
        logits["fused"] = fused_logits(cfg.fused_dir, chunks)
    else:
        logits = {
            "base": _hf_logits_of(lambda: load_causal_lm(base_dir, nf4=False, compute_dtype=dtype, device=device,
                                                         dtype=dtype).eval(), chunks),
            "trained": _hf_logits_of(lambda: load_trained(cfg.final_checkpoint, device=device)[0], chunks),
            "fused": _hf_logits_of(lambda: AutoModelForCausalLM.from_pretrained(
                str(cfg.fused_dir), dtype=dtype).to(device).eval(), chunks),
        }
    rows = [_row(name, sources[name], "transformers", logits.pop(name), chunks) for name in ("base", "trained", "fused")]
    for kind in [cfg.gguf.outtype, *cfg.gguf.quantizations]:
        path = cfg.gguf_path(kind)
        rows.append(_row(kind, in_run(path), "llama.cpp", gguf_logits(path, chunks), chunks))
    return rows, chunks


def fidelity_steps(cfg: Config) -> dict[str, str]:
    """Which fidelity-gate step produced each evaluated model."""
    return {"fused": "fuse", cfg.gguf.outtype: "convert", **{q: f"quantize:{q}" for q in cfg.gguf.quantizations}}


def build_report(cfg: Config, rows: list[dict], chunks: list[list[int]]) -> dict:
    """The eval report: rows with ratios and fidelity figures, and the bound's verdict."""
    try:
        fidelity = json.loads((cfg.reports_dir / "fidelity.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        fidelity = {}
    by_name = {r["model"]: r for r in rows}
    base_ppl = by_name["base"]["perplexity"]
    steps = fidelity_steps(cfg)
    for r in rows:
        r["ratio_to_base"] = r["perplexity"] / base_ppl
        entry = fidelity.get(steps.get(r["model"], ""))
        if entry:
            r["fidelity"] = {k: entry[k] for k in ("reference", "kl", "top1", "bound", "bound_key", "passed")
                             if k in entry} | {"step": steps[r["model"]]}
    ratio = by_name["trained"]["ratio_to_base"]
    heldout = cfg.heldout_path
    return {
        "run": cfg.run.name,
        "heldout": str(heldout),
        "heldout_sha256": hashlib.sha256(heldout.read_bytes()).hexdigest(),
        "tokens": rows[0]["tokens"],
        "chunks": len(chunks),
        "chunk_tokens": cfg.eval.chunk_tokens,
        "rows": rows,
        "bound": {"key": BOUND_KEY, "figure": "trained / base perplexity", "value": ratio,
                  "max": cfg.eval.max_ppl_ratio},
        "passed": ratio <= cfg.eval.max_ppl_ratio,
    }


def render_markdown(report: dict) -> str:
    b = report["bound"]
    lines = [
        f"# Evaluation: {report['run']}",
        "",
        f"Perplexity on held-out Japanese text (`{Path(report['heldout']).name}`, {report['tokens']} tokens "
        f"in {report['chunks']} chunk(s) of at most {report['chunk_tokens']}; the same token ids for every "
        "model). Lower is better.",
        "",
        "| model | file | runtime | perplexity | vs base | fidelity KL | vs | bound | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        f = r.get("fidelity")
        fid = (f"{f['kl']:.3g} | {f['reference']} | {f['bound']:.3g} | {'pass' if f['passed'] else 'FAIL'}"
               if f else " | | | ")
        lines.append(f"| {r['model']} | {r['source']} | {r['runtime']} | {r['perplexity']:.4g} | "
                     f"{r['ratio_to_base']:.4g} | {fid} |")
    verdict = "PASS" if report["passed"] else "FAIL"
    sign = "<=" if report["passed"] else ">"
    lines += ["", f"**Japanese ability maintained: {verdict}**: {b['figure']} = {b['value']:.4g} {sign} "
                  f"{b['max']:g} (`{b['key']}`)."]
    return "\n".join(lines) + "\n"


def evaluate(cfg: Config) -> dict:
    """Measure, write reports/eval.json and eval.md, and check the bound.

    Returns the report. Raises EvalError (after writing the report) when
    trained / base perplexity exceeds eval.max_ppl_ratio; BadInputError for
    an unreadable held-out file; ModelError, ToolchainError for missing models.
    """
    cfg.eval_passed.unlink(missing_ok=True)  # a stale pass must not outlive a new measurement
    rows, chunks = measure(cfg)
    report = build_report(cfg, rows, chunks)
    atomic_write_text(cfg.eval_report, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(cfg.eval_report.with_suffix(".md"), render_markdown(report))
    b = report["bound"]
    print(f"[eval] {b['figure']} = {b['value']:.4g} (bound {b['max']:g}) -> {'pass' if report['passed'] else 'FAIL'}; "
          f"report: {cfg.eval_report.with_suffix('.md')}")
    if not report["passed"]:
        raise EvalError(
            f"eval failed: {b['figure']} = {b['value']:.4g} > {b['max']:g} ({b['key']}): the trained model "
            f"has lost ability on {cfg.heldout_path.name}. Report: {cfg.eval_report.with_suffix('.md')}"
        )
    atomic_write_text(cfg.eval_passed, json.dumps({"figure": b["figure"], "value": b["value"], "max": b["max"],
                                                   "eval_json_sha256": hashlib.sha256(
                                                       cfg.eval_report.read_bytes()).hexdigest()}) + "\n")
    return report
