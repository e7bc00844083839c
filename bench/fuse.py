"""Streaming fuse vs the straightforward path: time and peak memory, side by side.

    .venv/bin/python bench/fuse.py                     # ~0.5B-parameter random Phi-3 in bf16
    .venv/bin/python bench/fuse.py --layers 4          # quicker
    .venv/bin/python bench/fuse.py --smoke             # seconds, tiny: what the test suite runs

Straightforward: transformers loads the whole model, PEFT merge_and_unload,
fold the soul into lm_head, save_pretrained. Streaming: pipeline.fuse's
fuse_tensors, one tensor at a time. Each runs in its own process (so peak
RSS is its own), on the same base, adapter and soul; the outputs are checked
to be equal. Target: streaming peak memory at most a third of the
straightforward one, and no slower.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def prepare(root: Path, hidden: int, intermediate: int, layers: int) -> None:
    """A random bf16 Phi-3 in 200 MB shards, a LoRA adapter with non-zero B, and a soul."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config, Phi3ForCausalLM

    from pipeline.soul import SO8Soul, save_soul

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                        tie_word_embeddings=False, dtype="bfloat16")
    model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "base", max_shard_size="200MB")
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    peft.save_pretrained(root / "adapter")
    soul = SO8Soul(hidden, alpha=1.618)
    with torch.no_grad():
        soul.generator.normal_(0, 0.1)
    save_soul(root / "adapter" / "soul.safetensors", soul, step=500)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{sum(f.stat().st_size for f in (root / 'base').glob('*.safetensors')) / 2**30:.2f} GiB bf16")


def straightforward(root: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.soul import fold_soul_into_head, load_soul

    model = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, str(root / "adapter")).merge_and_unload()
    soul = load_soul(root / "adapter" / "soul.safetensors")
    with torch.no_grad():
        model.lm_head.weight.copy_(fold_soul_into_head(model.lm_head.weight, soul.rotation, soul.alpha))
    model.save_pretrained(str(out))


def streaming(root: Path, out: Path) -> None:
    import torch

    from pipeline.fuse import fuse_tensors, read_adapter
    from pipeline.soul import load_soul

    out.mkdir(parents=True)
    fuse_tensors(root / "base", out, read_adapter(root / "adapter"), load_soul(root / "adapter" / "soul.safetensors"),
                 torch.bfloat16)


def child(kind: str, root: Path) -> None:
    """Run one path and print its figures. Each imports what it needs: the
    streaming fuse needs neither transformers nor PEFT."""
    import torch  # noqa: F401

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    (streaming if kind == "streaming" else straightforward)(root, root / kind)
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "import_rss_mib": base_rss / 1024}))


def same_output(root: Path) -> float:
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
        return out

    a, b = tensors(root / "streaming"), tensors(root / "straightforward")
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--smoke", action="store_true", help="a tiny model: checks the benchmark runs")
    ap.add_argument("--child", choices=["prepare", "streaming", "straightforward"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.intermediate, args.layers = 64, 128, 1
    if args.child == "prepare":
        prepare(args.root, args.hidden, args.intermediate, args.layers)
        return
    if args.child:
        child(args.child, args.root)
        return
    # Everything heavy runs in child processes: a child forked from a parent
    # that holds a model would inherit (and report) the parent's peak memory.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, __file__, "--child", "prepare", "--root", str(root), "--hidden",
                        str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers)],
                       check=True)
        figures = {}
        for kind in ("straightforward", "streaming"):
            proc = subprocess.run([sys.executable, __file__, "--child", kind, "--root", str(root)],
                                  capture_output=True, text=True, check=True)
            figures[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        diff = same_output(root)
    s, f = figures["streaming"], figures["straightforward"]
    for kind, v in figures.items():
        print(f"  {kind:16s} {v['seconds']:7.2f} s   peak RSS {v['peak_rss_mib']:8.0f} MiB "
              f"(after importing torch {v['import_rss_mib']:.0f} MiB)")
    peak = s["peak_rss_mib"] / f["peak_rss_mib"]
    beyond = (s["peak_rss_mib"] - s["import_rss_mib"]) / (f["peak_rss_mib"] - f["import_rss_mib"])
    print(f"  peak RSS streaming/straightforward = {peak:.3f} (target <= 0.333): {'OK' if peak <= 1 / 3 else 'OVER'}"
          f"; beyond torch's own {beyond:.3f}")
    print(f"  time streaming/straightforward = {s['seconds'] / f['seconds']:.3f} (target <= 1.0): "
          f"{'OK' if s['seconds'] <= f['seconds'] else 'OVER'}")
    print(f"  outputs equal: max |difference| {diff:.3g}")


if __name__ == "__main__":
    main()
