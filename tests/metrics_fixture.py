"""A synthetic metrics.jsonl in train.py's format, and a config whose schedule it follows.

60 steps: chaos 1-10, transition 11-50, order 51-60 (soul.warmup_steps 10,
soul.anneal_steps 40). The loss falls from 12 towards 4 with a little
deterministic wobble; the orthogonality error is 0 at the first step (R = I)
and about 1e-7 after. No model is needed: the base is a hub id that nothing
here fetches.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import DEMO_DATA, write_config

STEPS, WARMUP, ANNEAL = 60, 10, 40


def fixture_config(root: Path, **overrides) -> Path:
    cfg = {
        "run": {"name": "fx", "build_dir": str(root / "build")},
        "model": {"base": "example/not-fetched"},
        "data": {"train": str(DEMO_DATA)},
        "train": {"steps": STEPS, "save_every": 20},
        "soul": {"warmup_steps": WARMUP, "anneal_steps": ANNEAL},
        **overrides,
    }
    return write_config(root / "fx.yaml", cfg)


def metric_rows(cfg, steps: int = STEPS) -> list[dict]:
    """Rows as train.py writes them (train.StepMetrics), for the first `steps` steps."""
    from pipeline.soul import alpha_at, phase_at, sigmoid

    rows = []
    for i in range(steps):
        alpha = alpha_at(i, cfg.soul)
        loss = 4 + 8 * math.exp(-i / 15) + 0.2 * math.sin(i)
        rows.append({
            "step": i + 1, "phase": phase_at(i, cfg.soul), "alpha": alpha, "gate": sigmoid(alpha),
            "loss": loss, "lm_loss": loss, "ortho_error": 0.0 if i == 0 else 1e-7 * (1 + 0.5 * math.cos(i)),
            "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 500.0 + i, "elapsed_s": 0.5 * (i + 1),
            "val_loss": loss + 0.5 if (i + 1) % 10 == 0 else None,  # train.eval_every: 10
        })
    return rows


def write_metrics(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
