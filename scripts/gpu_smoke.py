"""GPU smoke check: the CUDA paths of the pipeline on the tiny model.

    python scripts/gpu_smoke.py [--out build/gpu-smoke]

Checks, printing one line each and exiting non-zero on the first failure:
torch sees CUDA; bitsandbytes NF4 runs forward and backward on the GPU;
training with NF4 + bf16 autocast + gradient checkpointing keeps the soul
orthogonal and lowers the loss; the fused model (merge base chosen by KL
among the original and the dequantized NF4 weights, re-quantized on the CPU
as fuse does) follows the model trained on the GPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402


def check(ok: bool, what: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        raise SystemExit(1)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "gpu-smoke")
    args = ap.parse_args()
    import bitsandbytes as bnb
    import peft
    import transformers

    check(torch.cuda.is_available(), f"torch {torch.__version__} sees CUDA: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(f"      transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bnb.__version__}")

    lin = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lin(x).float().square().mean().backward()
    check(lin.weight.__class__.__name__ == "Params4bit" and x.grad is not None and x.grad.abs().sum() > 0,
          "bitsandbytes NF4 Linear4bit forward+backward on the GPU")

    from pipeline.fuse import fuse
    from pipeline.tiny import build_tiny_phi3
    from pipeline.train import train

    shutil.rmtree(args.out, ignore_errors=True)
    base = build_tiny_phi3(args.out / "base")
    raw = yaml.safe_load((REPO / "demo.yaml").read_text(encoding="utf-8"))
    raw["run"].update(name="gpu", build_dir=str(args.out / "build"))
    raw["model"]["base"] = str(base)
    raw["data"]["train"] = str(REPO / "data" / "demo_ja.jsonl")
    raw["train"].update(quantization="nf4", device="cuda", compute_dtype="bfloat16",
                        gradient_checkpointing=True, steps=40, save_every=20)
    raw["soul"].update(warmup_steps=5, anneal_steps=30)
    raw["fuse"]["dtype"] = "float32"
    path = args.out / "gpu.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    cfg = load_config(path)

    t0 = time.perf_counter()
    train(cfg)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"      trained 40 NF4 steps in {time.perf_counter() - t0:.1f}s; "
          f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}; median {sorted(r['tokens_per_s'] for r in rows)[20]:.0f} tok/s")
    check(max(r["ortho_error"] for r in rows) < 1e-5, f"soul stays in SO(8) under bf16 autocast "
          f"(max ortho error {max(r['ortho_error'] for r in rows):.2e})")
    first, last = sum(r["lm_loss"] for r in rows[:5]) / 5, sum(r["lm_loss"] for r in rows[-5:]) / 5
    check(last < first, f"loss falls on the GPU ({first:.3f} -> {last:.3f}, mean of 5 steps)")

    # Trained model as trained (NF4 base + LoRA + soul, bf16 compute) vs the fused model.
    from transformers import AutoTokenizer

    from pipeline.hf import load_trained

    trained, tok = load_trained(cfg.final_checkpoint, device=torch.device("cuda"), nf4=True)
    fused_dir = fuse(cfg)
    from transformers import AutoModelForCausalLM

    fused = AutoModelForCausalLM.from_pretrained(str(fused_dir), dtype=torch.float32).cuda().eval()
    text = tok.apply_chat_template([{"role": "user", "content": "黄金比について教えてください。"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(fused_dir))(text).input_ids], device="cuda")
    with torch.no_grad():
        k = kl(trained(ids).logits[0], fused(ids).logits[0])
    prov = json.loads((fused_dir / "fusion.json").read_text())
    print(f"      merge base {prov['merge_base']} ({prov['merge_base_reason']}); KL per candidate "
          f"{prov['merge_base_kl']}; KL(trained NF4 || fused) here = {k:.2e}")
    check(k < cfg.fidelity.max_kl_fused, "fused model follows the NF4-trained model")


if __name__ == "__main__":
    main()
