"""Checkpoint folders: finding complete ones, and the trainer state for resuming.

A checkpoint folder (`checkpoints/step_NNNNNN/`, `checkpoints/final/`) is
complete when it holds `checkpoint.json`, which is written last into a
temporary folder that is then renamed into place; anything else (a
`.tmp-*` folder left by a kill) is never taken for a checkpoint.

The trainer state lives beside the adapter: `trainer_state.json` (step,
optimizer hyper-parameters, Python RNG) and `trainer_state.safetensors`
(optimizer moments, torch RNG states). Nothing here is a pickle.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .artifacts import atomic_write_bytes, atomic_write_text
from .config import CHECKPOINT_MARKER

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def read_marker(folder: Path) -> dict | None:
    """checkpoint.json of a complete checkpoint folder, else None."""
    try:
        return json.loads((folder / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def complete_steps(ckpt_dir: Path) -> list[tuple[int, Path, dict]]:
    """(step, folder, marker) of every complete step_NNNNNN checkpoint, oldest first."""
    found = []
    for folder in ckpt_dir.glob("step_*"):
        marker = read_marker(folder)
        if marker is not None and folder.name == checkpoint_name(marker.get("step", -1)):
            found.append((marker["step"], folder, marker))
    return sorted(found, key=lambda x: x[0])


def remove_leftovers(ckpt_dir: Path) -> None:
    """Delete temporary folders a killed run left behind."""
    for tmp in ckpt_dir.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_trainer_state(folder: Path, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write everything needed to continue exactly after `step`."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"optimizer.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    atomic_write_bytes(folder / STATE_TENSORS, save(tensors))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    version, internal, gauss = random.getstate()
    atomic_write_text(folder / STATE_JSON, json.dumps({
        "step": step,
        "param_groups": groups,
        "python_rng": [version, list(internal), gauss],
    }) + "\n")


def load_trainer_state(folder: Path, optimizer: torch.optim.Optimizer) -> int:
    """Restore optimizer and RNG states saved by save_trainer_state; returns the step."""
    meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    tensors = load_file(str(folder / STATE_TENSORS))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            per_param.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return int(meta["step"])
