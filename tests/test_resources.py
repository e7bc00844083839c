"""Say so before it fails: a stage the machine clearly cannot hold is refused before it writes
anything, naming the stage, the need, what is available and the keys that lower it; the
estimates count each family's parameters as transformers does; and they are the figures
bench/fullsize.py prints (its smoke run, tests/test_bench.py, checks they stay close)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from bench.fullsize import bound_for
from conftest import REPO, small_config, write_config
from pipeline.config import load_config
from pipeline.families import BY_NAME
from pipeline.fullshape import REAL_MODELS
from pipeline.resources import Shape, stage_needs


def cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, timeout=600)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_training_refused_when_memory_is_clearly_short(tiny_phi3_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "b"))
    cfg = load_config(config)
    assert cli("data", "--config", str(config)).returncode == 0  # what make runs before train
    before = files_under(cfg.run_dir)
    proc = cli("train", "--config", str(config), env={"AGIASI_MEMORY_LIMIT": str(10**6)})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "train: this machine lacks" in proc.stderr and "GB of memory" in proc.stderr
    assert "0.0 GB is available" in proc.stderr and "train.quantization" in proc.stderr
    assert files_under(cfg.run_dir) == before  # no checkpoint, no metrics, nothing


def test_fuse_and_convert_refused_before_anything_is_written(fused_run, tmp_path):
    run = small_config(fused_run.resolve(fused_run.model.base), tmp_path / "b")
    config = write_config(tmp_path / "c.yaml", run)
    cfg = load_config(config)
    proc = cli("fuse", "--config", str(config), "--checkpoint", str(fused_run.final_checkpoint),
               env={"AGIASI_MEMORY_LIMIT": str(10**6)})
    assert proc.returncode == 1 and "fuse: this machine lacks" in proc.stderr and "fuse.merge_base" in proc.stderr
    assert not cfg.fused_dir.exists() and not list(tmp_path.rglob(".tmp-*"))

    shutil.copytree(fused_run.fused_dir, cfg.fused_dir)
    proc = cli("convert", "--config", str(config), env={"AGIASI_DISK_LIMIT": "1000"})
    assert proc.returncode == 1, proc.stderr
    assert "convert: this machine lacks" in proc.stderr and "GB of disk" in proc.stderr
    assert "gguf.outtype" in proc.stderr and "Nothing was written" in proc.stderr
    assert not cfg.gguf_path(cfg.gguf.outtype).parent.exists()


def test_a_bad_limit_is_named(fused_run, tmp_path):
    config = write_config(tmp_path / "c.yaml", small_config(fused_run.resolve(fused_run.model.base), tmp_path / "b"))
    proc = cli("train", "--config", str(config), env={"AGIASI_MEMORY_LIMIT": "lots"})
    assert proc.returncode == 1 and "AGIASI_MEMORY_LIMIT='lots': expected a number of bytes" in proc.stderr


# Each family's real shape, as config.json has it: the rehearsal's bases (pipeline.fullshape, with
# the tokenizer's ids), and transformers' config classes at the sizes of Llama-3.2-1B, Qwen2.5-0.5B
# (q/k/v biases) and gemma-3-1b (four norms a layer, no vocab_size in config.json).
IDS = {"<s>": 1, "<|endoftext|>": 32000, "<|end|>": 32007, "<|assistant|>": 32001, "<|im_end|>": 151645}


def real_config(family, tied):
    real = REAL_MODELS[family]
    return real.config(real.full_size, tied, {**IDS, "<|endoftext|>": 151643} if family == "qwen3" else IDS)


def class_config(family):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    if family == "llama3":
        hf = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
        return {**hf.to_dict(), "architectures": ["LlamaForCausalLM"]}
    if family == "qwen2":
        hf = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
        return {**hf.to_dict(), "architectures": ["Qwen2ForCausalLM"]}
    hf = Gemma3TextConfig(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=256)
    config = {**hf.to_dict(), "architectures": ["Gemma3ForCausalLM"]}
    del config["vocab_size"]  # as gemma-3's config.json: transformers' default, 262208 rows
    return config


SHAPES = {**{f"{f}-{'tied' if t else 'untied'}": (lambda f=f, t=t: real_config(f, t))
             for f in ("phi3", "qwen3") for t in (False, True)},
          **{f: (lambda f=f: class_config(f)) for f in ("llama3", "qwen2", "gemma3")}}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_the_estimates_count_what_transformers_and_peft_build(name):
    """Shape.params is the parameter count of transformers' model of that config.json, and
    lora_params is what PEFT adds on the family's default targets: GQA, head_dim, q/k norms,
    biases and a tied head counted as the model holds them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = SHAPES[name]()
    shape = Shape.of(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        assert shape.params == sum(p.numel() for p in model.parameters())
        targets = BY_NAME[shape.family].lora_targets
        peft = get_peft_model(model, LoraConfig(r=16, target_modules=list(targets)))
    assert shape.lora_params(targets, 16) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_qwen3_4b_shape_is_the_real_one():
    """Qwen3-4B: 4.02B parameters tied (3.6B outside the embeddings, as its model card says), GQA
    with 8 KV heads of 128, so the KV cache is 1024 wide, not hidden_size's 2560."""
    shape = Shape.of(real_config("qwen3", True))
    assert shape.params == 4_022_468_096 and 3.6e9 < shape.params - shape.table_params < 3.65e9
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.kv_dim) == (32, 8, 128, 1024)
    assert shape.context == 40960 and shape.family == "qwen3"


STAGES = ("train", "fuse", "convert", "imatrix", "quantize")


@pytest.mark.parametrize("family,stage", [(f, s) for f in ("phi3", "qwen3") for s in STAGES])
def test_full_size_needs_fit_the_bounds_the_bench_checks(family, stage):
    """At the real model's shape with config.yaml's settings the estimate sits inside the bound
    bench/fullsize.py checks (fuse 3 GB for Phi-3.5-mini, 3.5 GB for Qwen3-4B; convert 4 GB;
    others 6 GB), and convert's disk is the f16 GGUF's."""
    cfg = load_config(REPO / "config.yaml")
    shape = Shape.of(real_config(family, REAL_MODELS[family].tied))
    assert {"phi3": 3.7e9 < shape.params < 3.9e9, "qwen3": 4.0e9 < shape.params < 4.1e9}[family]
    need = stage_needs(cfg, stage, shape)
    if stage == "convert":
        assert need.disk == pytest.approx(shape.params * 2)
    assert need.memory <= bound_for(family, stage), need


ALLOCATOR_PROBE = """
import ctypes, ctypes.util, torch
from pipeline.tensors import return_freed_memory_eagerly
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
torch.empty(16 << 20, dtype=torch.uint8)  # freed at once: glibc's dynamic threshold rises past 16 MiB: heap from here on
return_freed_memory_eagerly()
before = libc.mallinfo2().hblks
kept = torch.empty(2 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblks - before)
"""


def test_tensors_of_a_mebibyte_and_more_get_their_own_mapping():
    """Training's activations (a few MB to 32 MB) must not come from glibc's heap, which fragments:
    at Qwen3-4B's size and 512 tokens the heap grew 130 MB per layer and the stage peaked at 10.0 GB
    instead of 5.84 (README, Model families). After return_freed_memory_eagerly a 2 MiB tensor is its
    own mapping even once a larger free has raised glibc's dynamic threshold."""
    out = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1"], out.stdout + out.stderr
