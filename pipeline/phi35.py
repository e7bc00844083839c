"""A random base laid out exactly like Phi-3.5-mini-instruct on the hub, at any depth.

The real run's base is Borea-Phi-3.5-mini (3.8B, 32 layers, hidden 3072,
32064 vocabulary rows, LongRoPE). Nothing can be downloaded here, so the
full-size rehearsal (bench/fullsize.py) and the LongRoPE tests build a model
with the hub's config.json keys and values (LongRoPE factors, 131072/4096
positions, sliding window, auto_map, bf16), sharded safetensors with an
index, and Phi-3.5's real tokenizer and chat template (pipeline/tiny.py takes
them from the pinned llama.cpp's source: 32011 ids in 32064 rows, as Phi-3
pads them). Weights are random but seeded per
tensor, written one tensor at a time (memory for a tensor, not a model), and
the embeddings and head are scaled so that logits have a std of about 4, as
a trained model's do.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from .artifacts import atomic_dir
from .tensors import write_safetensors
from .tiny import ENDOFTEXT, LOGIT_STD, _write_tokenizer

# microsoft/Phi-3.5-mini-instruct config.json: the LongRoPE factors (one per pair of a
# 96-dim head's rotary dims, so head_dim must stay 96).
LONG_FACTOR = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]
SHORT_FACTOR = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]
HEAD_DIM = 96
FULL_SIZE = {"num_hidden_layers": 32, "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32}


def phi35_config(*, num_hidden_layers: int, hidden_size: int, intermediate_size: int, num_attention_heads: int,
                 vocab_size: int = 32064, tie_word_embeddings: bool = False, token_ids: dict[str, int]) -> dict:
    """Phi-3.5-mini-instruct's config.json with the given shape (and this tokenizer's special ids)."""
    if hidden_size != num_attention_heads * HEAD_DIM:
        raise ValueError(f"hidden_size {hidden_size} must be {num_attention_heads} heads of {HEAD_DIM} "
                         "(the LongRoPE factors are per rotary pair of a 96-dim head)")
    return {
        "_name_or_path": "Phi-3.5-mini-instruct",
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                     "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
        "bos_token_id": token_ids["bos"],
        "embd_pdrop": 0.0,
        "eos_token_id": token_ids["eos"],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 131072,
        "model_type": "phi3",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_attention_heads,
        "original_max_position_embeddings": 4096,
        "pad_token_id": token_ids["eos"],
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": LONG_FACTOR, "short_factor": SHORT_FACTOR, "type": "longrope"},
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.3",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of a Phi-3 model of this config, in the hub's order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, i)),
                   (p + "mlp.gate_up_proj.weight", (2 * i, h)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.o_proj.weight", (h, h)), (p + "self_attn.qkv_proj.weight", (3 * h, h))]
    shapes.append(("model.norm.weight", (h,)))
    if not config["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (v, h)))
    return shapes


def random_weight(name: str, shape: tuple[int, ...], hidden: int, seed: int) -> torch.Tensor:
    """One weight, the same for the same name and seed whatever else is built (bf16)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    std = LOGIT_STD / math.sqrt(hidden) if name in ("model.embed_tokens.weight", "lm_head.weight") else 0.02
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def build_phi35_shaped(out_dir: Path, *, num_hidden_layers: int = 2, hidden_size: int = 384,
                       intermediate_size: int = 512, num_attention_heads: int = 4, vocab_size: int = 32064,
                       tie_word_embeddings: bool = False, shards: int = 2, seed: int = 0) -> Path:
    """Write a Phi-3.5-mini-shaped model folder (the hub's layout, random bf16 weights).

    Inputs: out_dir (replaced once the new folder is complete); the shape (FULL_SIZE is the
    real one; hidden_size must be num_attention_heads * 96); shards, how many safetensors
    files (with model.safetensors.index.json); seed. Output: out_dir. The same arguments
    give byte-identical files. Errors: ValueError for a shape the config cannot have.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        ids = _write_tokenizer(staging)
        config = phi35_config(num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
                              intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                              vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                              token_ids={"bos": ids["<s>"], "eos": ids[ENDOFTEXT]})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staging / "generation_config.json").write_text(json.dumps({
            # As Borea's generation_config.json: <|end|>, <|assistant|>, <|endoftext|> (32007, 32001, 32000).
            "bos_token_id": ids["<s>"], "eos_token_id": [ids["<|end|>"], ids["<|assistant|>"], ids[ENDOFTEXT]],
            "pad_token_id": ids[ENDOFTEXT]}, indent=2) + "\n", encoding="utf-8")
        write_shards(staging, tensor_shapes(config), hidden_size, seed, shards)
    return out_dir


def write_shards(folder: Path, shapes: list[tuple[str, tuple[int, ...]]], hidden: int, seed: int, shards: int) -> None:
    """Split the tensors into `shards` files of about equal size, and write the index."""
    sizes = [math.prod(s) for _, s in shapes]
    per_shard, groups, current = sum(sizes) / shards, [[]], 0.0
    for (name, shape), size in zip(shapes, sizes):
        if current >= per_shard and len(groups) < shards:
            groups.append([])
            current = 0.0
        groups[-1].append((name, shape))
        current += size
    weight_map, total = {}, 0
    for n, group in enumerate(groups, 1):
        file = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / file, [(name, torch.bfloat16, shape) for name, shape in group],
                          lambda name, shapes=dict(group): random_weight(name, shapes[name], hidden, seed),
                          metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in group})
        total += sum(math.prod(s) * 2 for _, s in group)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8")
