"""The real path on a GPU, in one command (issue 24): VRAM and speed at the seeds' settings, the
same training through HF's Trainer + PEFT, fuse and its gate on the GPU, llama.cpp on CUDA.

    make gpu-proof                                 # a CUDA machine with the project's env (the Docker
                                                   # image: make docker-run TARGET=gpu-proof)
    make gpu-proof-pack                            # here: what an offline CUDA machine lacks
    .venv/bin/python bench/gpu_proof.py --smoke    # every part on the CPU, a tiny model (the tests run this)

On the project's lent GPU machine (offline; its own Python 3.12 with torch 2.11 + CUDA 13,
transformers 5.17, peft and accelerate, no bitsandbytes), after `make gpu-proof-pack` here, one
call that carries build/gpu-proof/travel (its size is printed by the pack; it must stay under
64 MiB with the working tree):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site build/gpu-proof/travel/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_proof.py --travel build/gpu-proof/travel --out $OUT

(device tool: carry ["build/gpu-proof/travel"], timeout_s 600). The travel folder holds the
wheels that machine lacks (bitsandbytes with its CUDA kernels, and what importing pipeline.train
and pipeline.fuse needs: pydantic, datasets, datasketch, detect-secrets and their own needs), at
requirements/base.txt's pins, and Phi-3.5's tokenizer files (made here from the pinned llama.cpp
source, which is not there). Measured 2026-12-07: 48.85 MiB (bitsandbytes 41.14 of it, the
tokenizer 3.99) + a 1.97 MiB working tree = 50.82 MiB of the 64. The same parts ran on the CPU
under that machine's transformers 5.17 and huggingface_hub 1.33 with these wheels installed the
same way (--smoke --travel); not on its torch 2.11, peft or Python 3.12, which were not at hand.

It builds a random base of Phi-3.5-mini's real shape (pipeline/fullshape.py: 3.8B, 32 layers,
hidden 3072, 32064 rows, LongRoPE; the real Phi-3 vocabulary and chat template) and runs each
part in a process of its own, so that each peak VRAM is its own:

  env        GPU, driver, torch, CUDA, transformers, peft, bitsandbytes, accelerate;
  loop+soul  the project's training loop (pipeline.train.Trainer, unchanged) at config.yaml's
             settings, the seeds': NF4 + double quant, LoRA r16/alpha32 on qkv_proj, o_proj,
             gate_up_proj, down_proj, the soul, batch 1, 512-token packed windows of the bundled
             Japanese chats, gradient checkpointing, bf16. Peak VRAM as
             torch.cuda.max_memory_allocated and max_memory_reserved over the whole process
             (loading included), bound <= 10 GB for a 12 GB card; tokens/s and trained tokens/s
             (the reply tokens the loss is taken on) over the steps after --warmup uncounted ones;
  loop       the same loop with the soul taken out of the head (LoRA alone): the soul's cost;
  hf         the baseline: transformers.Trainer over the same model as the loop builds it
             (load_causal_lm's NF4, wrap_with_lora_and_soul's PEFT LoRA, the soul taken out),
             the same windows in the same order, the same optimizer settings, bf16 autocast and
             gradient checkpointing from its TrainingArguments; timed the same way (a clock at
             each step's end, after a CUDA sync);
  fuse       pipeline.fuse.fuse on the loop+soul checkpoint with config.yaml's fuse and
             fidelity settings (merge_base auto, the gate): wall time, peak VRAM (the trained
             reference runs whole on the GPU; the candidates and the fused model are evaluated
             layer by layer on the CPU), the gate's KL and the merge base it chose;
  llama      (--llama-cuda, off by default; always in --smoke) the pinned llama.cpp built by
             scripts/build-llama-cpp.sh with GGML_CUDA=ON for this GPU's architecture only, the
             fused model converted to an f16 GGUF, and its logits from the CUDA build (all
             layers offloaded) against the CPU build's: KL, top-1, max |diff|. It needs the
             pinned sdist in the cache (or the network) and the llama_cpp bindings, which the
             lent machine lacks (the sdist alone is 76 MB, more than the 64 MiB that travel).

It ends with one table (also written as gpu_proof.md and gpu_proof.json in --work and --out) and
exits 1 when the VRAM bound is not met.

--smoke runs every part on the CPU on Phi-3.5's shape at a tiny width (pipeline.fullshape's
smoke shape), NF4 through bitsandbytes' CPU path, in float32 (the Trainer and HF's take bf16
only on CUDA), with llama's "CUDA" side being the CPU build again. Only the GPU run proves:
bitsandbytes' CUDA kernels and the travelling wheels on the lent machine's Python, bf16
autocast, every VRAM figure and the 10 GB bound, every speed and ratio (CPU figures of a tiny
model mean nothing), the gate's GPU reference (pipeline.fidelity.gate_on_gpu) and llama.cpp's
CUDA build. No GPU figure has been measured yet.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml
from transformers import Trainer as HFTrainer, TrainerCallback, TrainingArguments

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import demo_records  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.tokenize import collate  # noqa: E402
from pipeline.fidelity import compare, gguf_logits, load_logits, prompt_ids, report_path, save_logits  # noqa: E402
from pipeline.fullshape import REAL_MODELS, build_shaped, write_tokenizer_files  # noqa: E402
from pipeline.fuse import fuse  # noqa: E402
from pipeline.hf import load_tokenizer  # noqa: E402
from pipeline.llamacpp import convert_hf_to_gguf  # noqa: E402
from pipeline.train import Trainer  # noqa: E402

GB = 1e9
VRAM_BOUND = 10 * GB  # the seeds' card has 12 GB; the rest is the CUDA context's and the desktop's
TRAVEL = REPO / "build" / "gpu-proof" / "travel"
TRAVEL_LIMIT = 64 * 2**20  # what the lent machine's call carries: working tree + carried paths
# What the lent machine's Python lacks (shared/TOOLCHAIN.md and its package list): bitsandbytes,
# and what importing pipeline.train and pipeline.fuse pulls in, at requirements/base.txt's pins.
TRAVEL_PACKAGES = ("bitsandbytes", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
                   "datasets", "dill", "multiprocess", "datasketch", "detect-secrets")
# pip download's view of that machine: CPython 3.12 on x86-64 Linux.
DEVICE_PLATFORM = ["--python-version", "3.12", "--implementation", "cp"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
    for arg in ("--platform", tag)]
DATA_SHA256 = "gpu-proof: the bundled data/demo_ja.jsonl"  # what the checkpoints name as their data


# ---- the runs' config ------------------------------------------------------------------------

def proof_config(work: Path, base: Path, name: str, steps: int, device: str) -> Path:
    """config.yaml's settings (the seeds') on the built base, `steps` steps, no checkpoint or
    validation pass inside the timed steps, the soul's schedule squeezed into them, the bundled
    chats in place of the hub dataset."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    cfg["run"].update(name=name, build_dir=str(work / "build"))
    cfg["model"].update(base=str(base), revision="main")
    cfg["data"]["train"] = [{"path": str(REPO / "data" / "demo_ja.jsonl"), "format": "messages",
                             "license_acknowledged": True}]
    cfg["eval"]["heldout"] = str(REPO / cfg["eval"]["heldout"])
    if cfg["gguf"]["imatrix"].get("calibration"):
        cfg["gguf"]["imatrix"]["calibration"] = str(REPO / cfg["gguf"]["imatrix"]["calibration"])
    cfg["train"].update(steps=steps, save_every=steps, eval_every=0, device=device,
                        lr_warmup_steps=min(cfg["train"]["lr_warmup_steps"], steps))
    # The schedule squeezed into the run, as in bench/fullsize.py: alpha's value costs nothing.
    cfg["soul"].update(warmup_steps=1, anneal_steps=max(1, steps - 1))
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def proof_trainer(cfg: Config, soul: bool) -> Trainer:
    """The project's Trainer, set up (base, LoRA, soul, data); without the soul, the head is the
    base's own again (the loop still logs the unused rotation's orthogonality, a no-grad 8x8
    exponential per block)."""
    trainer = Trainer(cfg, {"train": demo_records(), "validation": []}, DATA_SHA256, log=print)
    trainer.setup()
    if not soul:
        inner = trainer.model.base_model.model
        inner.lm_head = inner.lm_head.head
    return trainer


def step_tokens(trainer: Trainer, steps: range) -> tuple[int, int]:
    """(all tokens, trained tokens) of these optimizer steps, as the loop feeds them."""
    items = [e for step in steps for micro in trainer.step_examples(step) for e in micro]
    return sum(len(e.input_ids) for e in items), sum(e.trained_tokens for e in items)


def vram() -> dict:
    if not torch.cuda.is_available():
        return {"vram_allocated": None, "vram_reserved": None}
    return {"vram_allocated": torch.cuda.max_memory_allocated(), "vram_reserved": torch.cuda.max_memory_reserved()}


def rates(trainer: Trainer, ends: list[float], warmup: int) -> dict:
    """Throughput over the steps after the warm-up: ends[i] is when step i finished."""
    timed = range(warmup, len(ends))
    tokens, trained = step_tokens(trainer, timed)
    seconds = ends[-1] - ends[warmup - 1]
    return {"timed_steps": len(timed), "seconds": seconds, "tokens_per_s": tokens / seconds,
            "trained_tokens_per_s": trained / seconds, "tokens_per_step": tokens / len(timed)}


# ---- the parts, each in its own process ------------------------------------------------------

def part_env(cfg: Config, args) -> dict:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "missing"

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "-",
           **{name: version(name) for name in ("transformers", "peft", "bitsandbytes", "accelerate")}}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        out.update(gpu=torch.cuda.get_device_name(), arch=f"sm_{major}{minor}", driver=nvidia_driver())
    else:
        out.update(gpu="none (CPU)", arch="-", driver="-")
    return out


def nvidia_driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def part_loop(cfg: Config, args) -> dict:
    trainer = proof_trainer(cfg, soul=args.soul)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    ends = [r["elapsed_s"] for r in rows]
    return {**rates(trainer, ends, args.warmup), **vram(), "wall_s": wall, "nf4": trainer.nf4,
            "first_loss": rows[0]["lm_loss"], "last_loss": rows[-1]["lm_loss"]}


class InOrder(torch.utils.data.IterableDataset):
    """The loop's examples in the loop's order (an iterable: HF's Trainer does not reshuffle it)."""

    def __init__(self, examples: list):
        self.examples = examples

    def __iter__(self):
        return iter(self.examples)


class StepClock(TrainerCallback):
    """When each of HF's optimizer steps ended (after a CUDA sync, as the loop's .item() syncs)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, *_, **__):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def part_hf(cfg: Config, args) -> dict:
    trainer = proof_trainer(cfg, soul=False)
    t, cuda = cfg.train, trainer.device.type == "cuda"
    examples = [e for step in range(t.steps) for micro in trainer.step_examples(step) for e in micro]
    clock = StepClock()
    hf_args = TrainingArguments(
        output_dir=str(cfg.run_dir / "hf"), max_steps=t.steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, warmup_steps=t.lr_warmup_steps, lr_scheduler_type="constant_with_warmup",
        optim="adamw_torch", bf16=cuda, use_cpu=not cuda, gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_strategy="no", save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        seed=cfg.run.seed)
    hf = HFTrainer(model=trainer.model, args=hf_args, train_dataset=InOrder(examples),
                   data_collator=lambda items: collate(items, trainer.pad_id), callbacks=[clock])
    started = time.perf_counter()
    result = hf.train()
    wall = time.perf_counter() - started
    return {**rates(trainer, clock.ends, args.warmup), **vram(), "wall_s": wall, "nf4": trainer.nf4,
            "train_loss": result.training_loss}


def part_fuse(cfg: Config, args) -> dict:
    started = time.perf_counter()
    fused = fuse(cfg)
    wall = time.perf_counter() - started
    gate = json.loads(report_path(cfg).read_text(encoding="utf-8"))["fuse"]
    fusion = json.loads((fused / "fusion.json").read_text(encoding="utf-8"))
    return {"wall_s": wall, **vram(), "kl": gate["kl"], "top1": gate["top1"], "merge_base": fusion["merge_base"],
            "merge_base_kl": fusion["merge_base_kl"], "fused": str(fused)}


def part_gguf_logits(cfg: Config, args) -> dict:
    """The GGUF's logits on the gate's prompts from the llama.cpp build GGML_CUDA selects."""
    ids = prompt_ids(load_tokenizer(cfg.fused_dir))
    started = time.perf_counter()
    logits = gguf_logits(args.gguf, ids)
    save_logits(args.logits, ids, logits)
    return {"wall_s": time.perf_counter() - started, **vram()}


PARTS = {"env": part_env, "loop": part_loop, "hf": part_hf, "fuse": part_fuse, "gguf-logits": part_gguf_logits}


def run_part(args) -> None:
    cfg = load_config(args.config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = PARTS[args.part](cfg, args)
    args.result.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def spawn(part: str, config: Path, work: Path, label: str, *extra: str, env: dict | None = None) -> dict:
    """Run one part in a process of its own; returns what it wrote. Exits on failure."""
    result = work / f"{label}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--config", str(config),
           "--result", str(result), *extra]
    print(f"[gpu-proof] {label} ...", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if proc.returncode != 0 or not result.is_file():
        sys.exit(f"[gpu-proof] {label} failed (exit {proc.returncode})")
    print(f"[gpu-proof] {label} done in {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(result.read_text(encoding="utf-8"))


# ---- llama.cpp with GGML_CUDA=ON ---------------------------------------------------------------

def llama_cuda(cfg: Config, config: Path, work: Path, arch: str, smoke: bool) -> dict:
    """Build the pinned llama.cpp for this GPU (smoke: the CPU build stands in), convert the
    fused model to f16 with the converter of the build GGML_CUDA names here, and compare the two
    builds' logits on the gate's prompts."""
    cuda = {"GGML_CUDA": "ON", "CUDA_DOCKER_ARCH": arch.removeprefix("sm_")}  # this GPU's architecture only
    envs = {"cuda": {"GGML_CUDA": "OFF"} if smoke else cuda, "cpu": {"GGML_CUDA": "OFF"}}
    built = {}
    for side, env in envs.items():  # each a no-op where that variant is built already
        started = time.perf_counter()
        build = subprocess.run(["bash", str(REPO / "scripts" / "build-llama-cpp.sh")], cwd=REPO,
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL)
        if build.returncode != 0:
            sys.exit(f"[gpu-proof] the llama.cpp build ({side}) failed")
        built[side] = time.perf_counter() - started
    gguf = convert_hf_to_gguf(cfg.fused_dir, work / "proof-f16.gguf", "f16")
    sides = {}
    for side, env in envs.items():
        logits = work / f"llama-{side}.npz"
        sides[side] = spawn("gguf-logits", config, work, f"llama-{side}", "--gguf", str(gguf), "--logits",
                            str(logits), env=env)
        sides[side]["logits"] = logits
    ids = prompt_ids(load_tokenizer(cfg.fused_dir))
    result = compare(load_logits(sides["cpu"]["logits"], ids), load_logits(sides["cuda"]["logits"], ids))
    return {"build_s": built["cuda"], "cuda_s": sides["cuda"]["wall_s"], "cpu_s": sides["cpu"]["wall_s"],
            "kl": result.kl, "top1": result.top1, "max_abs": result.max_abs}


# ---- the travel folder for an offline machine --------------------------------------------------

def pins() -> dict[str, str]:
    """requirements/base.txt's exact pins, by normalized name."""
    out = {}
    for line in (REPO / "requirements" / "base.txt").read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            out[normalized(name)] = version
    return out


def normalized(name: str) -> str:
    return name.lower().replace("_", "-")


def tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def working_tree_bytes() -> int:
    """What the lent machine's call sends besides the carried paths: tracked and untracked,
    not ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / n.decode()).stat().st_size for n in names if n and (REPO / n.decode()).is_file())


def pack(folder: Path) -> int:
    """Wheels for the lent machine's Python and the Phi-3.5 tokenizer files into folder; prints the sizes."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    versions = pins()
    wanted = [f"{name}=={versions[normalized(name)]}" for name in TRAVEL_PACKAGES]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    *DEVICE_PLATFORM, "-d", str(folder), *wanted], check=True)
    write_tokenizer_files(folder / "tokenizer", "phi3")
    travel, tree = tree_bytes(folder), working_tree_bytes()
    for wheel in sorted(folder.glob("*.whl")):
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    print(f"  {tree_bytes(folder / 'tokenizer') / 2**20:6.2f} MiB  tokenizer/")
    print(f"travel folder {travel / 2**20:.2f} MiB + working tree {tree / 2**20:.2f} MiB = "
          f"{(travel + tree) / 2**20:.2f} MiB (limit {TRAVEL_LIMIT / 2**20:.0f} MiB)")
    if travel + tree > TRAVEL_LIMIT:
        print("TOO BIG for the lent machine's call")
        return 1
    rel = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
    print(f"carry: [\"{rel}\"]; command: python3 -m pip install -q --no-index --no-deps --no-compile --target "
          f"/tmp/site {rel}/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_proof.py "
          f"--travel {rel} --out $OUT")
    return 0


# ---- the table ---------------------------------------------------------------------------------

def gigabytes(value) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def table(results: dict, shape: dict, smoke: bool) -> str:
    env, soul, lora, hf, fused = (results[k] for k in ("env", "loop+soul", "loop", "hf", "fuse"))
    lines = [f"GPU proof on {env['gpu']}" + (" (--smoke: a tiny model on the CPU, figures mean nothing)" if smoke
                                             else ""),
             "", "| part | figure | value |", "|---|---|---|",
             f"| env | GPU, arch, driver | {env['gpu']}, {env['arch']}, {env['driver']} |",
             f"| env | python, torch, CUDA | {env['python']}, {env['torch']}, {env['cuda']} |",
             f"| env | transformers, peft, bitsandbytes, accelerate | {env['transformers']}, {env['peft']}, "
             f"{env['bitsandbytes']}, {env['accelerate']} |",
             f"| model | Phi-3.5-mini shape | {', '.join(f'{k} {v}' for k, v in shape.items())}; "
             f"{'NF4' if soul['nf4'] else 'full precision'} |"]
    for label, r in (("project loop + soul", soul), ("project loop, LoRA alone", lora),
                     ("HF Trainer + PEFT", hf)):
        lines += [f"| {label} | tokens/s (trained tokens/s), {r['timed_steps']} steps of "
                  f"{r['tokens_per_step']:.0f} tokens | {r['tokens_per_s']:.1f} ({r['trained_tokens_per_s']:.1f}) |",
                  f"| {label} | peak VRAM allocated / reserved (GB) | {gigabytes(r['vram_allocated'])} / "
                  f"{gigabytes(r['vram_reserved'])} |"]
    bound = "-" if soul["vram_reserved"] is None else (
        "met" if soul["vram_reserved"] <= VRAM_BOUND else "NOT MET")
    lines += [f"| ratio | project loop + soul / HF Trainer + PEFT, tokens/s (goal >= 1.5) | "
              f"{soul['tokens_per_s'] / hf['tokens_per_s']:.2f} |",
              f"| ratio | soul's cost: loop + soul / loop alone, tokens/s | "
              f"{soul['tokens_per_s'] / lora['tokens_per_s']:.3f} |",
              f"| bound | loop + soul peak VRAM reserved <= {VRAM_BOUND / GB:.0f} GB | {bound} |",
              f"| fuse | wall (s), peak VRAM allocated / reserved (GB) | {fused['wall_s']:.0f}, "
              f"{gigabytes(fused['vram_allocated'])} / {gigabytes(fused['vram_reserved'])} |",
              f"| fuse | gate KL (top-1), merge base | {fused['kl']:.3g} ({fused['top1']:.3f}), {fused['merge_base']} "
              f"({', '.join(f'{k} {v:.3g}' for k, v in fused['merge_base_kl'].items())}) |"]
    if "llama" in results:
        ll = results["llama"]
        lines += [f"| llama.cpp | CUDA build (s); logits CUDA / CPU (s) | {ll['build_s']:.0f}; "
                  f"{ll['cuda_s']:.1f} / {ll['cpu_s']:.1f} |",
                  f"| llama.cpp | f16 GGUF, CUDA vs CPU build: KL, top-1, max abs diff | {ll['kl']:.3g}, "
                  f"{ll['top1']:.3f}, {ll['max_abs']:.3g} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every part on the CPU, a tiny model: checks the script runs")
    p.add_argument("--work", type=Path, help="working folder (default build/gpu-proof; --smoke: a temporary one)")
    p.add_argument("--out", type=Path, help="also copy the table and figures here")
    p.add_argument("--travel", type=Path, help="a folder made by --pack: the tokenizer comes from it")
    p.add_argument("--pack", type=Path, nargs="?", const=TRAVEL, help=f"write the travel folder (default {TRAVEL})")
    p.add_argument("--warmup", type=int, help="uncounted steps first (default 5; --smoke 1)")
    p.add_argument("--steps", type=int, help="timed steps (default 30; --smoke 2)")
    p.add_argument("--layers", type=int, help="decoder layers (default: the real model's 32)")
    p.add_argument("--llama-cuda", action="store_true",
                   help="also build llama.cpp with GGML_CUDA=ON and compare its logits with the CPU build's")
    # one part, in its own process (what the command runs for each)
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--soul", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    p.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--logits", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.warmup = max(1, args.warmup or (1 if args.smoke else 5))
    args.steps = args.steps or (2 if args.smoke else 30)
    if args.pack:
        return pack(args.pack.resolve())
    if args.part:
        run_part(args)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_proof: torch sees no CUDA device; --smoke runs every part on the CPU", file=sys.stderr)
        return 2
    if args.work is None and args.smoke:
        with tempfile.TemporaryDirectory(prefix="gpu-proof-") as tmp:
            return prove(args, Path(tmp))
    return prove(args, (args.work or REPO / "build" / "gpu-proof").resolve())


def prove(args, work: Path) -> int:
    real = REAL_MODELS["phi3"]
    shape = dict(real.smoke if args.smoke else real.full_size)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    device = "cpu" if args.smoke else "cuda"
    work.mkdir(parents=True, exist_ok=True)
    base = work / ("-".join(["base-phi3"] + [str(shape[k]) for k in sorted(shape)]))
    if not (base / "model.safetensors.index.json").is_file():
        started = time.perf_counter()
        build_shaped(base, "phi3", shape=shape, shards=4, tokenizer=args.travel / "tokenizer" if args.travel else None)
        print(f"[gpu-proof] random {real.hub_id}-shaped base {shape} built in {time.perf_counter() - started:.0f} s")
    shutil.rmtree(work / "build", ignore_errors=True)
    steps = args.warmup + args.steps
    configs = {name: proof_config(work, base, name, steps, device) for name in ("proof-soul", "proof-lora", "proof-hf")}
    timing = ["--warmup", str(args.warmup)]
    results = {"env": spawn("env", configs["proof-soul"], work, "env"),
               "loop+soul": spawn("loop", configs["proof-soul"], work, "loop+soul", *timing),
               "loop": spawn("loop", configs["proof-lora"], work, "loop", *timing, "--no-soul"),
               "hf": spawn("hf", configs["proof-hf"], work, "hf", *timing),
               "fuse": spawn("fuse", configs["proof-soul"], work, "fuse")}
    if args.llama_cuda or args.smoke:
        results["llama"] = llama_cuda(load_config(configs["proof-soul"]), configs["proof-soul"], work,
                                      results["env"]["arch"], args.smoke)
    text = table(results, shape, args.smoke)
    print("\n" + text)
    (work / "gpu_proof.md").write_text(text, encoding="utf-8")
    (work / "gpu_proof.json").write_text(json.dumps({"shape": shape, **results}, indent=1, default=str) + "\n",
                                         encoding="utf-8")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("gpu_proof.md", "gpu_proof.json"):
            shutil.copyfile(work / name, args.out / name)
    reserved = results["loop+soul"]["vram_reserved"]
    if reserved is not None and reserved > VRAM_BOUND:
        print(f"BOUND NOT MET: peak VRAM reserved {reserved / GB:.2f} GB > {VRAM_BOUND / GB:.0f} GB")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
