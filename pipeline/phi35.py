"""A random base laid out exactly like Phi-3.5-mini-instruct on the hub, at any depth.

The real run's base is Borea-Phi-3.5-mini (3.8B, 32 layers, hidden 3072,
32064 vocabulary rows, LongRoPE). pipeline/fullshape.py builds a model of a
named real model's shape for every family that has one; these are its
Phi-3.5-mini names, which the LongRoPE tests and the layered evaluator's
tests build on: the hub's config.json keys and values (LongRoPE factors,
131072/4096 positions, sliding window, auto_map, bf16), sharded safetensors
with an index, and Phi-3.5's real tokenizer and chat template (32011 ids in
32064 rows, as Phi-3 pads them).
"""
from __future__ import annotations

from pathlib import Path

from .fullshape import REAL_MODELS, build_shaped

FULL_SIZE = REAL_MODELS["phi3"].full_size


def build_phi35_shaped(out_dir: Path, *, num_hidden_layers: int = 2, hidden_size: int = 384,
                       intermediate_size: int = 512, num_attention_heads: int = 4,
                       tie_word_embeddings: bool = False, shards: int = 2, seed: int = 0) -> Path:
    """Write a Phi-3.5-mini-shaped model folder (the hub's layout, random bf16 weights).

    Inputs: out_dir (replaced once the new folder is complete); the shape (FULL_SIZE is the
    real one; hidden_size must be num_attention_heads * 96); shards, how many safetensors
    files (with model.safetensors.index.json); seed. Output: out_dir. The same arguments
    give byte-identical files. Errors: ValueError for a shape the config cannot have.
    """
    shape = {"num_hidden_layers": num_hidden_layers, "hidden_size": hidden_size,
             "intermediate_size": intermediate_size, "num_attention_heads": num_attention_heads}
    return build_shaped(out_dir, "phi3", shape=shape, tie_word_embeddings=tie_word_embeddings, shards=shards,
                        seed=seed)
