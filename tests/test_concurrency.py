"""One build per run folder: a second make waits for the first; make -j4 runs each stage once."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, small_config, write_config

pytestmark = pytest.mark.reliability("concurrency")


def locked(config: Path, *command: str, no_wait: bool = False) -> list[str]:
    return [sys.executable, "-m", "pipeline", "locked", "--config", str(config),
            *(["--no-wait"] if no_wait else []), "--", *command]


@pytest.fixture
def config(tiny_phi3_dir, tmp_path) -> Path:
    return write_config(tmp_path / "config.yaml", small_config(tiny_phi3_dir, tmp_path / "build"))


def hold_lock(config: Path, seconds: float) -> subprocess.Popen:
    """A process that holds the run's lock for `seconds` (through `locked`, like make does)."""
    holder = subprocess.Popen(locked(config, sys.executable, "-c", f"import time; time.sleep({seconds})"),
                              cwd=REPO)
    lock = config.parent / "build" / "t" / ".lock"
    for _ in range(200):
        if lock.is_file() and f"pid {holder.pid}" in lock.read_text():
            return holder
        time.sleep(0.05)
    holder.kill()
    raise AssertionError("the holder never took the lock")


def test_a_second_build_refuses_with_no_wait(config):
    holder = hold_lock(config, 30)
    try:
        proc = subprocess.run(locked(config, "true", no_wait=True), cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 4, proc.stderr
        assert "build/t is being built by another process (pid" in proc.stderr and "--no-wait" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_second_build_waits_for_the_first(config, tmp_path):
    holder = hold_lock(config, 2)
    marker = tmp_path / "ran_at"
    t0 = time.time()
    proc = subprocess.run(locked(config, sys.executable, "-c",
                                 f"import time, pathlib; pathlib.Path({str(marker)!r}).write_text(str(time.time()))"),
                          cwd=REPO, capture_output=True, text=True)
    holder.wait()
    assert proc.returncode == 0, proc.stderr
    assert "==> waiting for" in proc.stderr and f"pid {holder.pid}" in proc.stderr
    assert float(marker.read_text()) - t0 > 1.5, "ran while the first build still held the lock"


def test_the_lock_dies_with_its_holder(config):
    holder = hold_lock(config, 60)
    holder.kill()  # kill -9: no cleanup runs, and none is needed
    holder.wait()
    proc = subprocess.run(locked(config, "true", no_wait=True), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_pipeline_target_of_the_makefile_takes_the_lock(config):
    env = {**os.environ, "MAKEFLAGS": ""}
    for target in ("train", "fuse", "gguf", "modelfile", "ollama", "eval"):
        proc = subprocess.run(["make", "-n", "--no-print-directory", target, f"CONFIG={config}"], cwd=REPO, capture_output=True, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if "pipeline.mk" in l), proc.stdout + proc.stderr)
        assert f"-m pipeline locked --config {config} --" in line, (target, line)


@pytest.mark.slow
def test_two_parallel_makes_build_each_stage_once(config, tmp_path):
    """Two `make -j4 gguf` at once on one run folder, two quantizations: every stage runs exactly once."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["gguf"]["quantizations"] = ["Q4_K_M", "Q8_0"]
    write_config(config, cfg)
    env = {**os.environ, "MAKEFLAGS": ""}
    cmd = locked(config, "make", "-j4", "--no-print-directory", "-f", "pipeline.mk", "gguf",
                 f"CONFIG={config}", f"PY={sys.executable}")
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.0)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    out1, err1 = first.communicate()
    assert first.returncode == 0 and second.returncode == 0, err1[-2000:] + second.stderr[-2000:]
    assert "==> waiting for" in second.stderr
    both = out1 + second.stdout
    for stage in ("train", "fuse", "convert"):
        assert both.count(f"==> [{stage}] building") == 1, (stage, both)
    assert both.count("==> [quantize] building") == 2, both  # one per type
    assert "==>" not in second.stdout, second.stdout  # the second found everything built
    run = config.parent / "build" / "t"
    assert (run / "gguf" / "t-q4_k_m.gguf").is_file() and (run / "gguf" / "t-q8_0.gguf").is_file()
