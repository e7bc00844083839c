"""The demo's config for another family: demo.yaml, on that family's tiny model.

`make demo` runs the Phi-3 chain on demo.yaml. `make demo FAMILY=qwen3` (or
llama3, qwen2, gemma3) runs the same chain, with the same settings, on the
family's tiny model (pipeline/tiny.py), in a run of its own: demo.yaml with
the run's name, the base and the Ollama model name changed, written beside
the run folder. Paths keep pointing where demo.yaml's point (they are
rewritten relative to the new file's folder), so nothing of this machine is
written into it.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from .artifacts import atomic_write_text
from .errors import BadInputError
from .families import BY_NAME

# demo.yaml's keys that hold paths relative to its own folder.
_PATH_KEYS = (("run", "build_dir"), ("model", "base"), ("gguf", "imatrix", "calibration"), ("eval", "heldout"))


def demo_config(demo_yaml: Path, family: str, tiny_dir: Path, out: Path) -> Path:
    """Write `out`: demo.yaml for `family`'s tiny model at `tiny_dir`.

    Errors: BadInputError for a family the registry does not support.
    """
    entry = BY_NAME.get(family)
    if entry is None or entry.refused:
        known = ", ".join(f.name for f in BY_NAME.values() if not f.refused)
        raise BadInputError(f"FAMILY={family}: not a supported family (supported: {known})")
    demo_yaml, out = Path(demo_yaml).resolve(), Path(out).resolve()
    here, there = demo_yaml.parent, out.parent

    def moved(path: str) -> str:
        return path if os.path.isabs(path) else os.path.relpath(here / path, there)

    cfg = yaml.safe_load(demo_yaml.read_text(encoding="utf-8"))
    for keys in _PATH_KEYS:
        section = cfg
        for k in keys[:-1]:
            section = section.get(k) or {}
        if isinstance(section.get(keys[-1]), str):
            section[keys[-1]] = moved(section[keys[-1]])
    for source in cfg["data"]["train"]:
        source["path"] = moved(source["path"])
    cfg["run"]["name"] = f"demo-{family}"
    cfg["model"]["base"] = os.path.relpath(Path(tiny_dir).resolve(), there)
    cfg["ollama"]["model"] = f"{cfg['ollama']['model']}-{family}"
    header = (f"# Written by `python -m pipeline demo-config --family {family}` from {demo_yaml.name}: "
              f"the demo on the tiny {entry.display} model.\n# Edit demo.yaml, not this file.\n")
    atomic_write_text(out, header + yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    return out
