"""A random base laid out exactly like a named real model on the hub, at any depth.

The full-size rehearsal (bench/fullsize.py) measures every stage on a model
of a real base's shape, and the LongRoPE tests need Phi-3.5's real config.
Nothing can be downloaded here, so this module writes such a model: the
hub's config.json keys and values for the chosen shape, bf16 sharded
safetensors with an index, the family's real tokenizer and chat template
(pipeline/tiny.py takes them from the pinned llama.cpp's source) and the
hub's generation_config.json. Each entry of REAL_MODELS names the real model
it copies and cites where its values come from:

  - phi3:  microsoft/Phi-3.5-mini-instruct (Borea-Phi-3.5-mini's base): 3.8B,
           LongRoPE, 32064 rows for 32011 ids, untied;
  - qwen3: Qwen/Qwen3-4B: 4.0B, GQA (32 query heads, 8 KV heads of 128), an
           RMSNorm on each head's q and k, 151936 rows, tied.

The tensor names and shapes are transformers' own for the config (its model
built on the meta device), so what is written is what from_pretrained and
llama.cpp's converter expect. Weights are random but seeded per tensor name,
written one tensor at a time (memory for a tensor, not a model), and the
embeddings and head are scaled so that logits have a std of about 4, as a
trained model's do. The same arguments give byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import atomic_dir
from .tensors import write_safetensors
from .tiny import ENDOFTEXT, IM_END, LOGIT_STD, QWEN_ENDOFTEXT, _write_tokenizer

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass(frozen=True)
class RealModel:
    """A real base whose shape the rehearsal copies, with any depth and width."""

    hub_id: str  # the model whose config.json and generation_config.json are copied
    family: str  # pipeline.families' name; its tokenizer is pipeline.tiny's for the family
    full_size: dict[str, int]  # the real shape: config.json's num_hidden_layers, hidden_size, ...
    smoke: dict[str, int]  # a tiny width that keeps every rule of the shape (bench --smoke, tests)
    tied: bool  # the real model's tie_word_embeddings
    # config.json for a shape (full_size's keys), tie_word_embeddings and the tokenizer's ids;
    # ValueError for a shape the real config cannot have
    config: Callable[[dict[str, int], bool, dict[str, int]], dict]
    generation: Callable[[dict[str, int]], dict]  # generation_config.json from the tokenizer's ids


# ---- microsoft/Phi-3.5-mini-instruct ---------------------------------------------------------

# Its config.json's LongRoPE factors: one per rotary pair of a 96-dim head, so head_dim stays 96.
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
PHI35_HEAD_DIM = 96


def phi35_config(shape: dict[str, int], tied: bool, ids: dict[str, int], vocab_size: int = 32064) -> dict:
    """microsoft/Phi-3.5-mini-instruct's config.json with the given shape (and this tokenizer's ids)."""
    hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
    if hidden != heads * PHI35_HEAD_DIM:
        raise ValueError(f"hidden_size {hidden} must be {heads} heads of {PHI35_HEAD_DIM} "
                         "(the LongRoPE factors are per rotary pair of a 96-dim head)")
    return {
        "_name_or_path": "Phi-3.5-mini-instruct",
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                     "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
        "bos_token_id": ids["<s>"],
        "embd_pdrop": 0.0,
        "eos_token_id": ids[ENDOFTEXT],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape["intermediate_size"],
        "max_position_embeddings": 131072,
        "model_type": "phi3",
        "num_attention_heads": heads,
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_key_value_heads": heads,
        "original_max_position_embeddings": 4096,
        "pad_token_id": ids[ENDOFTEXT],
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": LONG_FACTOR, "short_factor": SHORT_FACTOR, "type": "longrope"},
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.3",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def phi35_generation(ids: dict[str, int]) -> dict:
    # As Borea's generation_config.json: <|end|>, <|assistant|>, <|endoftext|> (32007, 32001, 32000).
    return {"bos_token_id": ids["<s>"], "eos_token_id": [ids["<|end|>"], ids["<|assistant|>"], ids[ENDOFTEXT]],
            "pad_token_id": ids[ENDOFTEXT]}


# ---- Qwen/Qwen3-4B ---------------------------------------------------------------------------

QWEN3_HEAD_DIM = 128  # fixed in every Qwen3: 32 x 128 query dims over a hidden size of 2560


def qwen3_4b_config(shape: dict[str, int], tied: bool, ids: dict[str, int]) -> dict:
    """Qwen/Qwen3-4B's config.json with the given shape: head_dim 128 whatever the hidden size, the
    KV heads shared by num_attention_heads / num_key_value_heads query heads each, no biases,
    rope_theta 1e6, 40960 positions, 151936 rows (151669 ids), tied."""
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not share {kv_heads} KV heads evenly")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids[QWEN_ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "head_dim": QWEN3_HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": shape["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": shape["intermediate_size"],
        "max_position_embeddings": 40960,
        "max_window_layers": shape["num_hidden_layers"],  # 36 of 36 (no sliding window anyway)
        "model_type": "qwen3",
        "num_attention_heads": heads,
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }


def qwen3_generation(ids: dict[str, int]) -> dict:
    # Qwen3-4B's generation_config.json: stop at <|im_end|> or <|endoftext|> (151645, 151643), and
    # its sampling defaults (thinking mode).
    return {"bos_token_id": ids[QWEN_ENDOFTEXT], "do_sample": True,
            "eos_token_id": [ids[IM_END], ids[QWEN_ENDOFTEXT]], "pad_token_id": ids[QWEN_ENDOFTEXT],
            "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}


REAL_MODELS: dict[str, RealModel] = {
    "phi3": RealModel(
        "microsoft/Phi-3.5-mini-instruct", "phi3",
        full_size={"num_hidden_layers": 32, "hidden_size": 3072, "intermediate_size": 8192,
                   "num_attention_heads": 32},
        smoke={"num_hidden_layers": 2, "hidden_size": 384, "intermediate_size": 512, "num_attention_heads": 4},
        tied=False, config=phi35_config, generation=phi35_generation),
    "qwen3": RealModel(
        "Qwen/Qwen3-4B", "qwen3",
        full_size={"num_hidden_layers": 36, "hidden_size": 2560, "intermediate_size": 9728,
                   "num_attention_heads": 32, "num_key_value_heads": 8},
        # hidden 256, the row length llama.cpp's k-quants need; 4 query heads per KV head, as 32 over 8
        smoke={"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
               "num_key_value_heads": 1},
        tied=True, config=qwen3_4b_config, generation=qwen3_generation),
}


# ---- the folder -------------------------------------------------------------------------------


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of a model of this config.json, as transformers names and shapes it (its model
    built on the meta device; a tied head is no tensor of its own), in the hub's order: the
    embeddings, each decoder layer's tensors by name, the final norm, the head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)

    def order(item: tuple[str, tuple[int, ...]]) -> tuple:
        name = item[0]
        if name == EMBED:
            return (0,)
        if name.startswith("model.layers."):
            return (1, int(name.split(".")[2]), name)
        return (3,) if name == HEAD else (2, name)

    return sorted(((n, tuple(p.shape)) for n, p in model.named_parameters()), key=order)


def random_weight(name: str, shape: tuple[int, ...], hidden: int, seed: int) -> torch.Tensor:
    """One weight, the same for the same name and seed whatever else is built (bf16): norms are
    ones, the embeddings and head have rows of std LOGIT_STD / sqrt(hidden) (the final norm gives
    unit-RMS hidden states, so logits of std ~LOGIT_STD), every other matrix std 0.02."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    std = LOGIT_STD / math.sqrt(hidden) if name in (EMBED, HEAD) else 0.02
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


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


def real_model(family: str) -> RealModel:
    """REAL_MODELS[family]. Errors: KeyError naming the families that have one."""
    if family not in REAL_MODELS:
        raise KeyError(f"no full-size model for family {family!r}; families: {', '.join(REAL_MODELS)}")
    return REAL_MODELS[family]


# Beside tokenizer files made to travel (write_tokenizer_files): the ids of the family's special
# tokens, which config.json and generation_config.json are written from.
TOKENIZER_IDS = "tokenizer_ids.json"


def write_tokenizer_files(folder: Path, family: str) -> Path:
    """The family's tokenizer files, as build_shaped writes them, and TOKENIZER_IDS, into folder.

    For a machine without the pinned llama.cpp source (an offline GPU machine): build_shaped(...,
    tokenizer=folder) there copies them instead of making them. Output: folder. Errors: as
    build_shaped's (KeyError, ToolchainError).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(folder, real_model(family).family)
    (folder / TOKENIZER_IDS).write_text(json.dumps(ids, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def copy_tokenizer(source: Path, folder: Path) -> dict[str, int]:
    """Copy write_tokenizer_files' files from source into folder; returns the special tokens' ids."""
    for file in sorted(Path(source).iterdir()):
        if file.is_file() and file.name != TOKENIZER_IDS:
            shutil.copyfile(file, folder / file.name)
    return json.loads((Path(source) / TOKENIZER_IDS).read_text(encoding="utf-8"))


def build_shaped(out_dir: Path, family: str, *, shape: dict[str, int] | None = None,
                 tie_word_embeddings: bool | None = None, shards: int = 2, seed: int = 0,
                 tokenizer: Path | None = None) -> Path:
    """Write a model folder of the family's real model (REAL_MODELS) in the hub's layout, random bf16 weights.

    Inputs: out_dir (replaced once the new folder is complete); family, a key of REAL_MODELS;
    shape, the real model's shape keys (full_size is the real one; default its smoke shape);
    tie_word_embeddings (default: as the real model); shards, how many safetensors files (with
    model.safetensors.index.json); seed; tokenizer, a folder of write_tokenizer_files (default: the
    tokenizer is made from the pinned llama.cpp source). Output: out_dir, with config.json,
    generation_config.json, the shards and the family's tokenizer files. The same arguments give
    byte-identical files. Errors: KeyError for a family without a real model or a shape key
    missing; ValueError for a shape the real config cannot have; ToolchainError when the pinned
    llama.cpp source (the vocabularies) is not at hand.
    """
    real = real_model(family)
    shape = dict(real.smoke if shape is None else shape)
    tied = real.tied if tie_word_embeddings is None else tie_word_embeddings
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        ids = copy_tokenizer(tokenizer, staging) if tokenizer else _write_tokenizer(staging, real.family)
        config = real.config(shape, tied, ids)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staging / "generation_config.json").write_text(json.dumps(real.generation(ids), indent=2) + "\n",
                                                        encoding="utf-8")
        write_shards(staging, tensor_shapes(config), config["hidden_size"], seed, shards)
    return out_dir
