"""What a base model folder must hold, checked from its files without loading it.

`folder_problems(path)` reads only file headers (a few bytes each, plus the
safetensors JSON headers), so the config check can run it on every `make`:
weights as safetensors whose headers parse and whose tensor data is all
there (a clone made without git-lfs holds small pointer files in their
place, and an interrupted download a truncated file), every shard a sharded
model's index names, and a tokenizer. Standard library only.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

# What git-lfs leaves in a clone in place of a file it did not fetch.
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def is_lfs_pointer(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


def lfs_pointer_problem(path: Path, key: str = "model.base") -> str:
    return (f"{key}: {path} is a git-lfs pointer file, not the file itself "
            f"(run `git lfs pull` in {path.parent}, or download the model again)")


def safetensors_problem(path: Path, key: str = "model.base") -> str | None:
    """Why `path` is not a complete safetensors file, or None when it is; the message starts
    with `key` (the config key or artifact the file belongs to). Standard library only."""
    if is_lfs_pointer(path):
        return lfs_pointer_problem(path, key)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{key}: {path} is not a safetensors file ({size} bytes, no header)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{key}: {path} is truncated or not a safetensors file (its header claims {n} bytes)"
        try:
            header = json.loads(f.read(n))
            end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            return f"{key}: {path} is not a safetensors file (unreadable header: {e})"
    if 8 + n + end > size:
        return f"{key}: {path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}"
    return None


def folder_problems(path: Path) -> list[str]:
    """Problems with a model folder's weight and tokenizer files (config.json is read elsewhere)."""
    problems = []
    for name in ("config.json", *TOKENIZER_FILES, "tokenizer_config.json"):
        if is_lfs_pointer(path / name):
            problems.append(lfs_pointer_problem(path / name))
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"model.base: {path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    weights = sorted(path.glob("*.safetensors"))
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as e:
            problems.append(f"model.base: {index} is not a readable shard index ({e})")
            shards = set()
        problems += [f"model.base: {index} names the shard {s}, which is missing"
                     for s in sorted(shards) if not (path / s).is_file()]
    if not weights:
        problems.append(f"model.base: {path} has no .safetensors weights (pickled .bin weights are not loaded)")
    problems += [p for p in map(safetensors_problem, weights) if p]
    return problems


def tensor_names(files: list[Path]) -> set[str] | None:
    """The tensor names a model's weights hold, from its shard index or its safetensors headers.

    Input: the model's `model.safetensors.index.json` (its weight_map keys are read) or its
    `.safetensors` files (only their JSON headers are read). Output: the names, or None when
    none of the files can be read (absent, pointer, damaged: folder_problems names those).
    """
    names: set[str] = set()
    for path in files:
        try:
            if path.name == SAFETENSORS_INDEX:
                names |= set(json.loads(path.read_text(encoding="utf-8"))["weight_map"])
                continue
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                names |= {k for k in json.loads(f.read(n)) if k != "__metadata__"}
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            continue
    return names or None


def context_lengths(folder: Path) -> tuple[int, int] | None:
    """(original context, max positions) from a model folder's config.json, or None when it
    has none or it does not say (config_context_lengths)."""
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # folder_problems names an unreadable config.json
    return config_context_lengths(hf)


def config_context_lengths(hf: dict) -> tuple[int, int] | None:
    """(original context, max positions) of a parsed config.json, or None when it does not say.
    The original context is `original_max_position_embeddings` (LongRoPE models such as
    Phi-3.5: 4096 of 131072), else `max_position_embeddings`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    longest = hf.get("max_position_embeddings")
    original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or longest
    if not isinstance(original, int) or not isinstance(longest, int):
        return None
    return original, longest
