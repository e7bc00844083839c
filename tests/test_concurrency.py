"""One build per run folder: a second make waits for the first; make -j4 runs each stage once."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


def lock_path(config: Path) -> Path:
    return config.parent / "build" / "t" / ".lock"


def hold_lock(config: Path, released: Path | None = None) -> subprocess.Popen:
    """A process that holds the run's lock (through `locked`, like make does) until a line arrives on its
    stdin; it then writes `released`, if given, and ends. Returns once the holder holds the lock: the
    command `locked` runs has printed that it started, which it can only do with the lock taken."""
    script = "import pathlib, sys; print('holding', flush=True); sys.stdin.readline()"
    if released:
        script += f"; pathlib.Path({str(released)!r}).write_text('released')"
    holder = subprocess.Popen(locked(config, sys.executable, "-c", script), cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = holder.stdout.readline()
    if line != "holding\n":
        holder.kill()
        holder.wait()
        raise AssertionError(f"the holder never took the lock (exit {holder.returncode}, said {line!r})")
    assert f"pid {holder.pid} " in lock_path(config).read_text()  # the lock's holder record names it
    return holder


def waits_for_lock(pid: int, lock: Path) -> bool:
    """True while process `pid` is blocked waiting for the flock on `lock`: the kernel lists each
    waiter in /proc/locks as a `->` line with its pid and the file's device:inode."""
    inode = lock.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1:3] == ["->", "FLOCK"] and fields[5] == str(pid) and int(fields[6].rsplit(":", 1)[1]) == inode:
            return True
    return False


def release(holder: subprocess.Popen) -> None:
    holder.stdin.write("\n")
    holder.stdin.close()
    holder.wait()


def test_a_second_build_refuses_with_no_wait(config):
    holder = hold_lock(config)
    try:
        proc = subprocess.run(locked(config, "true", no_wait=True), cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 4, proc.stderr
        assert "build/t is being built by another process (pid" in proc.stderr and "--no-wait" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_second_build_waits_for_the_first(config, tmp_path):
    """The second command is held in the kernel's lock queue while the first holds the lock, and runs
    after the first let go: the holder's own mark, `released`, exists when the second command runs."""
    released, marker = tmp_path / "released", tmp_path / "second_ran"
    holder = hold_lock(config, released)
    try:
        script = f"import pathlib; pathlib.Path({str(marker)!r}).write_text(str(pathlib.Path({str(released)!r}).exists()))"
        second = subprocess.Popen(locked(config, sys.executable, "-c", script), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        waiting = second.stderr.readline()  # printed before it blocks on the lock
        assert waiting.startswith("==> waiting for") and f"pid {holder.pid}" in waiting, waiting
        while not waits_for_lock(second.pid, lock_path(config)):  # until the kernel has it waiting
            assert second.poll() is None, "the second build ran without waiting for the lock"
            time.sleep(0.01)
        assert not marker.exists()
        release(holder)
        out, err = second.communicate()
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 0, waiting + err
    assert marker.read_text() == "True", "ran while the first build still held the lock"


def test_the_lock_dies_with_its_holder(config):
    holder = hold_lock(config)
    holder.kill()  # kill -9: no cleanup runs, and none is needed
    holder.wait()
    proc = subprocess.run(locked(config, "true", no_wait=True), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_pipeline_target_of_the_makefile_takes_the_lock(config):
    env = {**os.environ, "MAKEFLAGS": ""}
    for target in ("train", "fuse", "gguf", "modelfile", "ollama", "eval"):
        proc = subprocess.run(["make", "-n", "--no-print-directory", target, f"CONFIG={config}"], cwd=REPO, capture_output=True, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if "pipeline.mk" in l), proc.stdout + proc.stderr)
        assert f'-m pipeline locked --config "{config}" --' in line, (target, line)


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
    # make prints its first line only once `locked` has taken the lock and become make.
    line = first.stdout.readline()
    assert line.startswith("==> [") and f"pid {first.pid} " in lock_path(config).read_text(), line
    with ThreadPoolExecutor(1) as pool:
        rest = pool.submit(first.communicate)  # drained while the second runs: a full pipe would stall it
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        out1, err1 = rest.result()
    assert first.returncode == 0 and second.returncode == 0, err1[-2000:] + second.stderr[-2000:]
    assert f"==> waiting for {lock_path(config)}" in second.stderr and f"(pid {first.pid} " in second.stderr
    both = line + out1 + second.stdout
    for stage in ("train", "fuse", "convert"):
        assert both.count(f"==> [{stage}] building") == 1, (stage, both)
    assert both.count("==> [quantize] building") == 2, both  # one per type
    assert "==>" not in second.stdout, second.stdout  # the second found everything built
    run = config.parent / "build" / "t"
    assert (run / "gguf" / "t-q4_k_m.gguf").is_file() and (run / "gguf" / "t-q8_0.gguf").is_file()
