"""What the benchmarks share: demo.yaml as a Config for a model of their own, wherever they run.

demo.yaml's relative paths (the data, the calibration text, the held-out text)
resolve against its own folder; a copy written elsewhere gets them made absolute.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from pipeline.config import Config, load_config
from pipeline.data.sources import read_jsonl

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "demo_ja.jsonl"


def demo_config(tmp: Path, base: Path, **sections) -> Config:
    """demo.yaml with model.base = `base` and `sections` merged over its sections, loaded as a Config."""
    raw = yaml.safe_load((REPO / "demo.yaml").read_text(encoding="utf-8"))
    raw["model"]["base"] = str(base)
    raw["data"]["train"] = [{"path": str(DEMO_DATA), "format": "messages"}]
    raw["gguf"]["imatrix"]["calibration"] = str(REPO / raw["gguf"]["imatrix"]["calibration"])
    raw["eval"]["heldout"] = str(REPO / raw["eval"]["heldout"])
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return load_config(path)


def demo_records() -> list[dict]:
    """The bundled Japanese chat lines as records (what the data stage reads from them)."""
    return [rec for _, rec in read_jsonl(DEMO_DATA)]


def train_step(model, opt, batch: dict, device: torch.device) -> None:
    """One optimizer step on a collated batch, as training takes it (bf16 autocast on CUDA)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
