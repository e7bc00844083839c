"""Shared fixtures: tiny offline Phi-3 models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.tiny import build_tiny_phi3


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Phi-3 (hidden 256, 2 layers, untied head). Treat it as read-only."""
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "tiny-phi3")


@pytest.fixture(scope="session")
def tiny_phi3_tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Phi-3 with tie_word_embeddings=True. Treat it as read-only."""
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "tiny-phi3-tied", tie_word_embeddings=True)


REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "demo_ja.jsonl"


def deep_merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for k, v in overrides.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def small_config(base_dir: Path, build_dir: Path, **overrides) -> dict:
    """demo.yaml shrunk for tests (few steps, float32 fuse), as a dict."""
    import yaml

    cfg = yaml.safe_load((REPO / "demo.yaml").read_text(encoding="utf-8"))
    cfg = deep_merge(cfg, {
        "run": {"name": "t", "build_dir": str(build_dir)},
        "model": {"base": str(base_dir)},
        "data": {"train": str(DEMO_DATA), "max_length": 128},
        # CPU even where CUDA exists: the exactness checks assume float32 without NF4.
        "train": {"steps": 6, "save_every": 3, "batch_size": 2, "device": "cpu", "lr_warmup_steps": 1},
        "soul": {"warmup_steps": 1, "anneal_steps": 4},
        "fuse": {"dtype": "float32"},
    })
    return deep_merge(cfg, overrides)


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tiny_phi3_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A short full-precision training run on the tiny model; returns its Config."""
    from pipeline.config import load_config
    from pipeline.train import train

    root = tmp_path_factory.mktemp("run")
    cfg = load_config(write_config(root / "config.yaml", small_config(tiny_phi3_dir, root / "build")))
    train(cfg)
    return cfg


@pytest.fixture(scope="session")
def fused_run(trained_run):
    """trained_run fused (float32); returns the same Config."""
    from pipeline.fuse import fuse

    fuse(trained_run)
    return trained_run
