"""Training step time with the soul vs LoRA alone, side by side in one run.

    .venv/bin/python bench/soul_overhead.py                 # hidden 1024, 4 layers, CPU
    python bench/soul_overhead.py --device cuda --nf4         # QLoRA on a GPU
    .venv/bin/python bench/soul_overhead.py --smoke         # seconds, tiny: what the test suite runs

Both variants are the same LoRA-wrapped model on the same batches; "LoRA
alone" has the soul taken out of the head. Both are warmed up first (on a
GPU the first few dozen steps of a process are several times slower while
kernels load and cuBLAS picks algorithms: whichever variant ran first
looked 5x slower before this warm-up existed), then steps alternate in
A B B A order so drift and ordering hit both alike; the median step time of
each is reported with their difference and ratio. Target: ratio <= 1.03.
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
from pipeline.data.tokenize import collate, example_order, load_examples  # noqa: E402
from pipeline.hf import load_causal_lm, load_tokenizer  # noqa: E402
from pipeline.soul import SoulHead  # noqa: E402
from pipeline.tiny import build_tiny_phi3  # noqa: E402
from pipeline.train import wrap_with_lora_and_soul  # noqa: E402


def variant(base: Path, cfg, device, nf4: bool, with_soul: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_causal_lm(base, nf4=nf4, compute_dtype=dtype, device=device, dtype=dtype)
    model = wrap_with_lora_and_soul(model, cfg, alpha=0.5)
    inner = model.base_model.model
    if not with_soul:
        inner.lm_head = inner.lm_head.head
    assert isinstance(inner.lm_head, SoulHead) == with_soul
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Default: big enough that the step is the model's work, as in real training;
    # --hidden 256 --layers 2 (the demo model) shows the fixed cost magnified.
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps per variant before timing")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nf4", action="store_true", help="4-bit NF4 base (QLoRA)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and 2 steps: checks the benchmark runs")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.steps, args.warmup = 64, 1, 2, 1
    device = torch.device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_phi3(Path(tmp) / "base", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                               num_layers=args.layers, num_heads=max(4, args.hidden // 64))
        cfg = demo_config(Path(tmp), base)
        tok = load_tokenizer(base)
        examples = load_examples(demo_records(), tok, 256)
        batches = [collate([examples[i] for i in example_order(len(examples), s, args.batch, 0)], tok.pad_token_id)
                   for s in range(args.warmup + args.steps)]
        runs = {"lora+soul": variant(base, cfg, device, args.nf4, True),
                "lora": variant(base, cfg, device, args.nf4, False)}
        for batch in batches[: args.warmup]:
            for model, opt in runs.values():
                train_step(model, opt, batch, device)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i, batch in enumerate(batches[args.warmup:]):
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                train_step(*runs[name], batch, device)
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["lora+soul"] / med["lora"]
    print(f"device={device} nf4={args.nf4} hidden={args.hidden} layers={args.layers} "
          f"batch={args.batch} steps={args.steps}")
    for k in runs:
        print(f"  {k:10s} median step {med[k] * 1e3:8.2f} ms")
    print(f"  soul cost per step {(med['lora+soul'] - med['lora']) * 1e3:+.2f} ms")
    print(f"  ratio soul/lora = {ratio:.4f} (target <= 1.03): {'OK' if ratio <= 1.03 else 'OVER'}")


if __name__ == "__main__":
    main()
