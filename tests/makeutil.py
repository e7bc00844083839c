"""Running pipeline.mk from tests, and telling which artifacts a run rewrote."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def needs_llama_cpp():
    from pipeline import llamacpp

    try:
        llamacpp.require_install()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"pinned llama.cpp not built ({e}); `make test` builds it")


def make(config: Path, target: str = "modelfile") -> subprocess.CompletedProcess:
    env = {**os.environ, "MAKEFLAGS": ""}
    proc = subprocess.run(
        ["make", "--no-print-directory", "-f", "pipeline.mk", target, f"CONFIG={config}", f"PY={sys.executable}"],
        cwd=REPO, capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def snapshot(run_dir: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (mtime_ns, sha256) of every file of the run."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(run_dir))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def changed(before: dict, after: dict) -> set[str]:
    """Files rewritten, added or removed; plan.mk (paths for Make) is not an artifact."""
    diff = {k for k in after if before.get(k) != after[k]} | (set(before) - set(after))
    return diff - {"plan.mk"}


def top(paths: set[str]) -> set[str]:
    """Group changed files by artifact: checkpoints/final, fused, gguf/x.gguf, Modelfile, stamps/x."""
    groups = set()
    for p in paths:
        parts = p.split("/")
        group = "/".join(parts[:2]) if parts[0] in ("checkpoints", "gguf", "stamps") else parts[0]
        groups.add(group.removesuffix(".sha256"))  # a sidecar belongs to its artifact
    return groups
