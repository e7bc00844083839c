"""The whole chain through Make, and Make's idea of what is stale.

Runs pipeline.mk (the DAG the Makefile hands its stage targets to) on the
tiny model with a test config, then changes one thing at a time and checks
which artifacts were rewritten.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, small_config, write_config
from makeutil import changed, make, needs_llama_cpp, snapshot, top

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tiny_phi3_dir, tmp_path_factory):
    needs_llama_cpp()
    root = tmp_path_factory.mktemp("chain")
    cfg = small_config(tiny_phi3_dir, root / "build",
                       gguf={"imatrix": {"calibration": str(REPO / "data" / "calibration_ja.txt"), "ctx": 64}})
    path = write_config(root / "config.yaml", cfg)
    first = make(path)
    return path, cfg, root / "build" / "t", first


def test_first_run_builds_every_artifact(chain):
    _, _, run, first = chain
    for rel in ("checkpoints/final/checkpoint.json", "checkpoints/step_000003/soul.safetensors",
                "checkpoints/final/adapter_model.safetensors", "fused/fusion.json", "fused/model.safetensors",
                "gguf/t-f16.gguf", "imatrix.gguf", "gguf/t-q4_k_m.gguf", "Modelfile"):
        assert (run / rel).is_file(), rel
    for stage in ("train", "fuse", "convert", "imatrix", "quantize", "modelfile"):
        assert f"==> [{stage}] building" in first.stdout
    assert "does not exist" in first.stdout
    report = json.loads((run / "reports" / "fidelity.json").read_text())
    assert set(report) == {"fuse", "convert:f32", "convert", "quantize:Q4_K_M"}
    assert all(e["passed"] for e in report.values())
    assert report["convert:f32"]["kl"] < 1e-7 and report["convert:f32"]["bound_key"] == "fidelity.max_kl_converted_f32"
    assert "| fuse | trained | fused (merge base original) |" in (run / "reports" / "fidelity.md").read_text()
    assert not list(run.rglob(".tmp-*")), "temporary files left behind"


# Modules that take seconds to import: a no-op make has no reason to load any of them (its plan step
# checks the artifacts, reading GGUF headers with gguf and numpy, which are light).
HEAVY_MODULES = {"torch", "transformers", "peft", "accelerate", "bitsandbytes", "llama_cpp"}


def test_second_run_does_nothing(chain, tmp_path):
    """Make's Python is a shim that records each command line and the modules it imports: a no-op make
    runs `plan` alone, which loads no heavy module, and rewrites no file."""
    path, _, run, _ = chain
    calls, imports = tmp_path / "calls", tmp_path / "imports"
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexec "{sys.executable}" -X importtime "$@" 2>> "{imports}"\n')
    shim.chmod(0o755)
    before = snapshot(run)
    proc = subprocess.run(["make", "--no-print-directory", "-f", "pipeline.mk", "modelfile", f"CONFIG={path}",
                           f"PY={shim}"], cwd=REPO, capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + imports.read_text()[-3000:]
    assert "==>" not in proc.stdout, proc.stdout
    assert snapshot(run) == before
    assert calls.read_text().splitlines() == [f"-m pipeline plan --config {path}"]
    loaded = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in imports.read_text().splitlines()
              if line.startswith("import time:") and "|" in line}
    assert "pipeline" in loaded and not loaded & HEAVY_MODULES, sorted(loaded & HEAVY_MODULES)


def test_touching_the_config_rebuilds_nothing(chain):
    path, _, run, _ = chain
    before = snapshot(run)
    os.utime(path)
    proc = make(path)
    assert "==>" not in proc.stdout and snapshot(run) == before


def test_new_system_prompt_rebuilds_only_the_modelfile(chain):
    path, cfg, run, _ = chain
    before = snapshot(run)
    cfg = {**cfg, "ollama": {**cfg["ollama"], "system": "あなたは俳句の先生です。"}}
    write_config(path, cfg)
    proc = make(path)
    assert top(changed(before, snapshot(run))) == {"Modelfile", "stamps/modelfile.stamp"}
    assert "==> [modelfile] building Modelfile because stamps/modelfile.stamp changed" in proc.stdout
    assert "あなたは俳句の先生です。" in (run / "Modelfile").read_text(encoding="utf-8")


def test_new_calibration_setting_rebuilds_the_imatrix_and_quantizations_only(chain):
    path, _, run, _ = chain
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    before = snapshot(run)
    write_config(path, {**cfg, "gguf": {**cfg["gguf"], "imatrix": {**cfg["gguf"]["imatrix"], "chunks": 2}}})
    proc = make(path)
    groups = top(changed(before, snapshot(run)))
    assert {"imatrix.gguf", "gguf/t-q4_k_m.gguf", "stamps/imatrix.stamp", "stamps/quantize.stamp"} <= groups
    assert not groups & {"fused", "gguf/t-f16.gguf", "checkpoints/final"}
    assert "==> [imatrix] building imatrix.gguf because stamps/imatrix.stamp changed" in proc.stdout


def test_new_quantization_rebuilds_from_quantize_on(chain):
    path, cfg, run, _ = chain
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    before = snapshot(run)
    write_config(path, {**cfg, "gguf": {**cfg["gguf"], "quantizations": ["Q8_0"]}})
    make(path)
    groups = top(changed(before, snapshot(run)))
    # the model card states the new quantization's figures (pipeline/modelcard.py)
    assert groups == {"gguf/t-q8_0.gguf", "Modelfile", "stamps/modelfile.stamp", "reports", "fused/README.md"}
    assert "FROM ./gguf/t-q8_0.gguf" in (run / "Modelfile").read_text(encoding="utf-8")


def test_new_fuse_dtype_rebuilds_fuse_onward_but_not_training(chain):
    path, cfg, run, _ = chain
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    before = snapshot(run)
    write_config(path, {**cfg, "fuse": {"dtype": "float16"}})
    make(path)
    groups = top(changed(before, snapshot(run)))
    assert {"fused", "gguf/t-f16.gguf", "gguf/t-q8_0.gguf", "stamps/fuse.stamp"} <= groups
    assert not any(g.startswith("checkpoints") for g in groups)
    assert "Modelfile" not in groups  # same text: registration, not rendering, follows a new GGUF


def test_bad_config_stops_make_before_anything(tiny_phi3_dir, tmp_path):
    path = write_config(tmp_path / "bad.yaml", small_config(tiny_phi3_dir, tmp_path / "b", soul={"warmup_steps": 99}))
    proc = subprocess.run(["make", "--no-print-directory", "-f", "pipeline.mk", "modelfile", f"CONFIG={path}",
                           f"PY={sys.executable}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "soul.warmup_steps + soul.anneal_steps" in proc.stderr
    assert not (tmp_path / "b").exists()
