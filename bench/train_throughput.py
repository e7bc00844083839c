"""Training throughput with packing vs without, side by side in one run.

    .venv/bin/python bench/train_throughput.py                    # hidden 512, 4 layers, CPU
    python bench/train_throughput.py --device cuda --nf4            # QLoRA on a GPU
    .venv/bin/python bench/train_throughput.py --smoke            # seconds, tiny: what the test suite runs

The same LoRA + soul model trains on the bundled Japanese chat examples
(data/demo_ja.jsonl, repeated to fill the steps), `--batch` sequences a step:
unpacked, each sequence is one example padded to the longest of its batch;
packed (data.packing), each is a window of `--max-length` tokens holding
several examples, with restarting position ids and a block-diagonal mask.
Steps alternate A B B A after a warm-up of each. Reported: trained tokens
(the assistant replies the loss is taken on) per second and all real tokens
per second, for each, and packed / unpacked.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import demo_config, demo_records, train_step  # noqa: E402
from pipeline.data.tokenize import collate, load_examples, pack  # noqa: E402
from pipeline.hf import load_causal_lm, load_tokenizer  # noqa: E402
from pipeline.tiny import build_tiny_phi3  # noqa: E402
from pipeline.train import wrap_with_lora_and_soul  # noqa: E402


def batches_of(examples, batch: int, n: int) -> list[list]:
    """n batches of `batch` sequences, cycling through the examples in order."""
    return [[examples[(i * batch + j) % len(examples)] for j in range(batch)] for i in range(n)]


def timed_step(model, opt, items, pad_id, device) -> tuple[float, int, int]:
    """One optimizer step; returns (seconds, trained tokens, real tokens)."""
    t0 = time.perf_counter()
    train_step(model, opt, collate(items, pad_id), device)
    return time.perf_counter() - t0, sum(e.trained_tokens for e in items), sum(len(e.input_ids) for e in items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512, help="data.max_length: the packed window")
    ap.add_argument("--batch", type=int, default=2, help="sequences per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before timing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nf4", action="store_true", help="4-bit NF4 base (QLoRA)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and 2 steps: checks the benchmark runs")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.max_length, args.steps, args.warmup = 64, 1, 256, 2, 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_phi3(Path(tmp) / "base", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                               num_layers=args.layers, num_heads=max(4, args.hidden // 64))
        cfg = demo_config(Path(tmp), base, data={"max_length": args.max_length})
        tok = load_tokenizer(base)
        examples = load_examples(demo_records(), tok, args.max_length)
        variants = {"unpacked": examples, "packed": pack(examples, args.max_length)}
        n = args.warmup + args.steps
        runs = {}
        for name in variants:
            model = wrap_with_lora_and_soul(
                load_causal_lm(base, nf4=args.nf4, compute_dtype=dtype, device=device, dtype=dtype), cfg, alpha=0.5)
            model.train()
            runs[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4),
                          batches_of(variants[name], args.batch, n))
        for i in range(args.warmup):
            for model, opt, batches in runs.values():
                timed_step(model, opt, batches[i], tok.pad_token_id, device)
        figures: dict[str, list[tuple[float, int, int]]] = {k: [] for k in runs}
        for i in range(args.warmup, n):
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                model, opt, batches = runs[name]
                figures[name].append(timed_step(model, opt, batches[i], tok.pad_token_id, device))

    print(f"device={device} nf4={args.nf4} hidden={args.hidden} layers={args.layers} max_length={args.max_length} "
          f"batch={args.batch} steps={args.steps} examples={len(examples)} windows={len(variants['packed'])}")
    rate = {}
    for name, rows in figures.items():
        seconds = sum(r[0] for r in rows)
        rate[name] = sum(r[1] for r in rows) / seconds
        print(f"  {name:9s} trained tokens/s {rate[name]:10.1f}   all tokens/s {sum(r[2] for r in rows) / seconds:10.1f}"
              f"   median step {statistics.median(r[0] for r in rows) * 1e3:8.1f} ms")
    print(f"  packed/unpacked trained tokens/s = {rate['packed'] / rate['unpacked']:.2f}")


if __name__ == "__main__":
    main()
