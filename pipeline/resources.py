"""What a stage needs in memory and disk, said before it starts.

A 3.8B model on a 16 GB machine used to swap or be killed half way, after
minutes of work. Each heavy stage now first estimates its peak anonymous
memory and its extra disk from the model's shape (config.json: layers,
hidden, intermediate and vocabulary sizes, query and KV heads, head_dim, a
tied head; the family's extra weights and LoRA targets) and the config, with the same
figures bench/fullsize.py prints beside what it measures, and stops with
a ResourceError naming the stage, the need, what the machine has and the
config keys that lower it when the machine clearly lacks them. Nothing is
written before that check.

Available memory is MemAvailable (/proc/meminfo), lowered by a cgroup v2
limit when one is set (containers); AGIASI_MEMORY_LIMIT / AGIASI_DISK_LIMIT
(bytes) cap them further, for a machine shared with other work. Disk is the
free space of the run folder's file system.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from .config import Config
from .constants import LONG_CONTEXT_PROBE
from .errors import PipelineError
from .families import BY_NAME, family_of
from .modeldir import config_context_lengths

GB = 1e9
# The interpreter with torch, transformers, PEFT and bitsandbytes imported: measured
# RssAnon of a stage process before its first tensor (bench/fullsize.py --smoke).
RUNTIME = 0.9 * GB
# Bytes per parameter of each stored or computed form.
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.0625}
NF4_BYTES = 0.5 + 4 / 64  # 4-bit codes + one float32 absmax per 64 (double quant stores less)
# train's process beside its tensors. Measured (bench/fullsize.py's sampler, Qwen3-4B's width, NF4,
# 512-token packed windows, CPU) at 2, 6 and 36 layers: peak = 0.37 GB + the float32 embeddings + per
# layer exactly its NF4 weights and LoRA's four float32 copies + per token the logits' 16 bytes per
# vocabulary row; less than RUNTIME, which the other stages' interpreters (llama.cpp's bindings) take.
# At full size: Qwen3-4B 5.84 GB, Phi-3.5-mini 4.04 GB, against estimates of 5.97 and 4.08 with 0.45.
TRAIN_RUNTIME = 0.45 * GB
# fuse's peak per head parameter while it folds the soul into the head (bench/fullsize.py --family qwen3:
# 2.73 GB, RUNTIME + 4.7 bytes per parameter of the 389M-parameter head)
FUSE_HEAD_BYTES = 6
# fuse's gate holds float32 logits over the whole vocabulary at each of the gate prompts' positions
# (133 with Qwen3's tokenizer, 173 with Phi-3's: 256 bounds them) for the trained model, both merge
# candidates and the fused model: what a small model's fuse peaks at (bench/fullsize.py --smoke,
# Qwen3-4B's 151936 rows at a tiny width: 1.17 GB, above RUNTIME + its layers and head).
GATE_POSITIONS = 256
GATE_LOGIT_SETS = 4
# quantize's gate holds more beside llama.cpp's KV cache, scores and logits than convert's
# (measured at Phi-3.5-mini's full size: 3.50 GB where RUNTIME + served_gate_memory gives 3.18)
QUANTIZE_GATE_FACTOR = 1.25
# llama-cpp-python's n_batch and n_ubatch, which the fidelity gate leaves at their defaults: the
# rows of attention scores and of logits llama.cpp computes at once.
LLAMA_BATCH = 512
# The converter's bytes per parameter of the tensor it holds: a float32 copy and its f16
# conversion, with the converter's own interpreter (measured 3.2 GB with the stage's process for
# Qwen3-4B's 389M-parameter embeddings, 2.5 GB of it the converter's).
CONVERTER_BYTES = 7
QUANT_BPW = 6.0  # bits per weight, an upper bound for the k-quants up to Q5 (Q6_K 6.56, Q8_0 8.5)

LOWER_MEMORY = {
    "train": "train.quantization (nf4), data.max_length, train.batch_size, train.gradient_checkpointing",
    "fuse": "fuse.merge_base (original or dequantized: one candidate, not two), fidelity.enabled",
    "convert": "fidelity.compare_f32, fidelity.f32_slice_layers, fidelity.enabled",
    "imatrix": "gguf.imatrix.ctx",
    "quantize": "gguf.quantizations",
}
LOWER_DISK = {
    "train": "train.save_every (fewer step checkpoints)",
    "fuse": "fuse.dtype (bfloat16 or float16, not float32)",
    "convert": "gguf.outtype (f16 or q8_0, not f32), fidelity.compare_f32",
    "imatrix": "gguf.imatrix.calibration (null: no importance matrix)",
    "quantize": "gguf.quantizations",
}


class ResourceError(PipelineError):
    """The machine clearly lacks the memory or disk a stage needs."""


# What a family's decoder layer holds beyond what config.json says (transformers'
# modeling_<family>.py): biases on q/k/v whatever attention_bias says (Qwen2), an RMSNorm over
# each head's q and k (Qwen3, Gemma-3), RMSNorms per layer (Gemma-3's four: before and after
# attention and the MLP), a vocabulary size when config.json has none (Gemma-3's text models).
# Family facts: their place is the family's entry in pipeline/families.py once it has such fields.
@dataclass(frozen=True)
class Architecture:
    qkv_bias: bool | None = None  # None: config.json's attention_bias, on q/k/v and o (Llama, Qwen3, Gemma-3)
    qk_norm: bool = False
    norms_per_layer: int = 2
    default_vocab: int | None = None


ARCHITECTURES = {
    "phi3": Architecture(qkv_bias=False),
    "llama3": Architecture(),
    "qwen2": Architecture(qkv_bias=True),
    "qwen3": Architecture(qk_norm=True),
    "gemma3": Architecture(qk_norm=True, norms_per_layer=4, default_vocab=262208),
}


@dataclass(frozen=True)
class Shape:
    """A base's size, from its config.json: a decoder of `layers` layers, each attention with
    `heads` query heads and `kv_heads` key/value heads of `head_dim` (grouped-query attention
    where fewer), and a gated MLP (gate, up, down); the embeddings and a head, tied or not."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    tied: bool
    heads: int
    kv_heads: int
    head_dim: int
    family: str  # pipeline.families' name: its default LoRA targets and ARCHITECTURES entry
    attention_bias: bool = False  # config.json's (Llama, Qwen3, Gemma-3: q, k, v and o)
    mlp_bias: bool = False  # config.json's (Llama)
    context: int = 4096  # the original context (original_max_position_embeddings, else max positions)

    @classmethod
    def of(cls, config: dict) -> Shape:
        """Errors: UnsupportedBaseError (a ValueError) for a family the pipeline refuses or does not know;
        KeyError or ValueError for a config.json without the sizes."""
        family = family_of(config)
        arch = ARCHITECTURES[family.name]
        heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
        lengths = config_context_lengths(config)
        return cls(layers=int(config["num_hidden_layers"]), hidden=hidden,
                   intermediate=int(config["intermediate_size"]),
                   vocab=int(config.get("vocab_size") or arch.default_vocab),
                   tied=bool(config.get("tie_word_embeddings", False)),
                   heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads), family=family.name,
                   attention_bias=bool(config.get("attention_bias", False)),
                   mlp_bias=bool(config.get("mlp_bias", False)),
                   context=lengths[0] if lengths else 4096)

    @property
    def kv_dim(self) -> int:
        """Width of a layer's K (and of its V): what the KV cache holds per token and layer."""
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer, by PEFT's module names: the
        split projections, and Phi-3's fused qkv_proj and gate_up_proj."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "qkv_proj": (h, q + 2 * kv),
                "o_proj": (q, h), "gate_proj": (h, i), "up_proj": (h, i), "gate_up_proj": (h, 2 * i),
                "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        arch = ARCHITECTURES[self.family]
        dims = self.linears()
        weights = sum(a * b for a, b in (dims[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj")))
        q, kv = self.heads * self.head_dim, self.kv_dim
        biases = 0
        if arch.qkv_bias:  # Qwen2: q, k and v, never o
            biases += q + 2 * kv
        elif arch.qkv_bias is None and self.attention_bias:
            biases += q + 2 * kv + self.hidden
        if self.mlp_bias:
            biases += 2 * self.intermediate + self.hidden
        norms = arch.norms_per_layer * self.hidden + (2 * self.head_dim if arch.qk_norm else 0)
        return weights + biases + norms

    @property
    def table_params(self) -> int:
        return self.vocab * self.hidden  # the embeddings, and the head

    @property
    def params(self) -> int:
        """Every parameter, as transformers counts them (a tied head once)."""
        return self.layers * self.layer_params + self.hidden + self.table_params * (1 if self.tied else 2)

    def lora_params(self, targets: list[str] | tuple[str, ...], r: int) -> int:
        """LoRA's A and B of rank r on each target linear of every layer (PEFT matches a target by
        the module's last name; names that are no linear of a layer add nothing here)."""
        dims = self.linears()
        return self.layers * r * sum(sum(dims[t]) for t in targets if t in dims)


@dataclass(frozen=True)
class Need:
    memory: float  # peak anonymous memory, bytes
    disk: float  # peak extra disk, bytes


def model_shape(cfg: Config, stage: str) -> Shape | None:
    """The shape of the model the stage works on (None when its config.json is not at hand yet)."""
    if stage in ("convert", "imatrix", "quantize") and (cfg.fused_dir / "config.json").is_file():
        folder = cfg.fused_dir
    elif cfg.base_is_local():
        folder = cfg.resolve(cfg.model.base)
    else:
        cached = try_to_load_from_cache(cfg.model.base, "config.json", revision=cfg.model.revision)
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    try:
        return Shape.of(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # check-config names what is wrong with the base


def served_gate_memory(cfg: Config, shape: Shape) -> float:
    """What the convert and quantize gates allocate in llama.cpp at the served context
    (fidelity.gate_contexts): the F16 KV cache (K and V of every layer, kv_dim wide), a batch's
    float32 attention scores over the context and their softmax, and a batch's float32 logits in
    llama.cpp's output buffer and the bindings' copy. The GGUF itself is mapped, and the bindings'
    context-long logits array is written only where the gate's prompts are: neither is counted."""
    if not cfg.fidelity.enabled:
        return 0.0
    ctx = min(cfg.served_context, shape.context + LONG_CONTEXT_PROBE)
    kv_cache = ctx * shape.layers * shape.kv_dim * 2 * 2
    scores = LLAMA_BATCH * ctx * shape.heads * 4 * 2
    logits = LLAMA_BATCH * shape.vocab * 4 * 2
    return kv_cache + scores + logits


def stage_needs(cfg: Config, stage: str, shape: Shape | None = None) -> Need:
    """Estimated peak anonymous memory and extra disk of `stage` (train, fuse, convert, imatrix, quantize)."""
    shape = shape or model_shape(cfg, stage)
    if shape is None:
        return Need(0, 0)
    layer, table = shape.layer_params, shape.table_params
    if stage == "train":
        nf4 = cfg.train.quantization != "none"
        layers = shape.layers * layer * (NF4_BYTES if nf4 else 4)
        tables = table * 4 * (1 if shape.tied else 2)  # float32, never quantized
        targets = cfg.train.lora.target_modules or BY_NAME[shape.family].lora_targets
        lora = shape.lora_params(targets, cfg.train.lora.r) * 4
        tokens = cfg.data.max_length * cfg.train.batch_size
        depth = 1 if cfg.train.gradient_checkpointing else shape.layers
        activations = tokens * (shape.vocab * 16 + depth * (12 * shape.hidden + 4 * shape.intermediate) * 4)
        checkpoints = lora * 3 * (cfg.train.steps // cfg.train.save_every + 1)
        # (the NF4 layers held 1.45 times their size, and 512 tokens cost twice 256's, until
        # tensors.return_freed_memory_eagerly fixed glibc's mmap threshold)
        return Need(TRAIN_RUNTIME + layers + tables + lora * 4 + activations, checkpoints)
    if stage == "fuse":
        out = shape.params * BYTES[cfg.fuse.dtype]
        if not cfg.fidelity.enabled and cfg.fuse.merge_base != "auto":
            return Need(RUNTIME + table * 6, out)
        # layer by layer: a stored layer (bf16), one variant in float32 and the NF4 round
        # trip's temporaries (measured 2.30 GB at Phi-3.5-mini's size); or the head, stored and
        # folded a block of rows at a time (measured 2.73 GB at Qwen3-4B's tied 151936 x 2560); or
        # the gate's logits
        gate = GATE_LOGIT_SETS * GATE_POSITIONS * shape.vocab * 4
        return Need(RUNTIME + max(layer * 13, table * FUSE_HEAD_BYTES, gate), out)
    if stage == "convert":
        out = shape.params * BYTES[cfg.gguf.outtype]
        layers = min(shape.layers, cfg.fidelity.f32_slice_layers)
        sliced = (layers * layer + table * (1 if shape.tied else 2)) * (2 + 4)  # slice folder + its f32 GGUF
        # the converter holds a tensor in float32 and its conversion; then the gate's llama.cpp
        return Need(RUNTIME + max(max(layer, table) * CONVERTER_BYTES, served_gate_memory(cfg, shape)),
                    max(out, sliced if cfg.fidelity.compare_f32 else 0))
    if stage == "imatrix":
        ctx = cfg.gguf.imatrix.ctx
        return Need(RUNTIME + ctx * shape.layers * shape.kv_dim * 2 * 2 + ctx * shape.vocab * 4 * 2, 64 * 2**20)
    if stage == "quantize":
        gate = served_gate_memory(cfg, shape) * QUANTIZE_GATE_FACTOR
        return Need(RUNTIME + max(max(layer, table) * 4 * 3, gate), shape.params * QUANT_BPW / 8)
    raise ValueError(f"no estimate for stage {stage!r}")


def available_memory() -> float:
    """What the machine can give a new process: MemAvailable, a cgroup limit, AGIASI_MEMORY_LIMIT."""
    have = float("inf")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            have = min(have, int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(have, _env_limit("AGIASI_MEMORY_LIMIT"))


def available_disk(folder: Path) -> float:
    existing = Path(folder)
    while not existing.exists():
        existing = existing.parent
    return min(shutil.disk_usage(existing).free, _env_limit("AGIASI_DISK_LIMIT"))


def _env_limit(name: str) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return float("inf")
    try:
        return float(value)
    except ValueError:
        raise ResourceError(f"{name}={value!r}: expected a number of bytes") from None


def require(cfg: Config, stage: str) -> Need:
    """Raise ResourceError when the machine clearly lacks what `stage` needs; return the need."""
    need = stage_needs(cfg, stage)
    memory, disk = available_memory(), available_disk(cfg.run_dir)
    problems = []
    if need.memory > memory:
        problems.append(f"about {need.memory / GB:.1f} GB of memory, but {memory / GB:.1f} GB is available "
                        f"(lower it with {LOWER_MEMORY[stage]})")
    if need.disk > disk:
        problems.append(f"about {need.disk / GB:.1f} GB of disk in {cfg.run_dir}, but {disk / GB:.1f} GB is free "
                        f"(lower it with {LOWER_DISK[stage]})")
    if problems:
        raise ResourceError(f"{stage}: this machine lacks what the stage needs: " + "; ".join(problems)
                            + ". Nothing was written.")
    return need
