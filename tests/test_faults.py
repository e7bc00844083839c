"""kill -9 at random moments of each stage, then `make` again: it finishes, and every
artifact equals the one an uninterrupted run wrote, byte for byte.

Each stage starts from a copy of an uninterrupted run taken just before that stage,
so a kill lands in that stage. The moments are drawn (seeded, printed) over the
stage's own measured duration. AGIASI_FAULT_KILLS (default 3) sets kills per stage.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, small_config, write_config
from makeutil import make, needs_llama_cpp, snapshot

pytestmark = [pytest.mark.slow, pytest.mark.reliability("faults")]

KILLS = int(os.environ.get("AGIASI_FAULT_KILLS", "3"))
# stage -> (what of the uninterrupted run is copied first, the make target that runs the stage)
STAGES = {
    "data": ((), "data"),
    "train": ((), "train"),
    "fuse": (("checkpoints", "metrics.jsonl"), "fuse"),
    "convert": (("checkpoints", "metrics.jsonl", "fused"), "CONVERTED"),
    "quantize": (("checkpoints", "metrics.jsonl", "fused", "gguf/t-f16.gguf", "gguf/t-f16.gguf.sha256"), "gguf"),
}
# Logs and reports carry timings; the rest must be identical.
NOT_COMPARED = ("metrics.jsonl", "reports/", "stamps/", "plan.mk", ".lock")


def run_config(tiny: Path, root: Path) -> Path:
    return write_config(root / "config.yaml", small_config(tiny, root / "build"))


def make_argv(config: Path, target: str) -> list[str]:
    if target == "CONVERTED":
        target = str(config.parent / "build" / "t" / "gguf" / "t-f16.gguf")
    return ["make", "--no-print-directory", "-f", "pipeline.mk", target, f"CONFIG={config}", f"PY={sys.executable}"]


@pytest.fixture(scope="module")
def reference(tiny_phi3_dir, tmp_path_factory):
    """An uninterrupted run, stage by stage, timing each stage."""
    needs_llama_cpp()
    root = tmp_path_factory.mktemp("reference")
    config = run_config(tiny_phi3_dir, root)
    env = {**os.environ, "MAKEFLAGS": ""}
    durations = {}
    for stage, (_, target) in STAGES.items():
        t0 = time.monotonic()
        proc = subprocess.run(make_argv(config, target), cwd=REPO, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        durations[stage] = time.monotonic() - t0
    make(config)  # the Modelfile
    return root / "build" / "t", durations


def comparable(snap: dict) -> dict:
    return {k: v[1] for k, v in snap.items() if not k.startswith(NOT_COMPARED)}


CASES = [(stage, k) for stage in STAGES for k in range(KILLS)]


@pytest.mark.parametrize("stage,k", CASES, ids=[f"{s}-kill{k}" for s, k in CASES])
def test_kill_minus_9_then_make_again(reference, tiny_phi3_dir, tmp_path, stage, k):
    ref_run, durations = reference
    copied, target = STAGES[stage]
    config = run_config(tiny_phi3_dir, tmp_path)
    run = tmp_path / "build" / "t"
    run.mkdir(parents=True)
    for rel in copied:
        src, dst = ref_run / rel, run / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    shutil.copytree(ref_run / "stamps", run / "stamps")  # same config, same stamps (and mtimes)

    delay = random.Random(f"{stage}-{k}").uniform(0.1, 1.0) * durations[stage]
    env = {**os.environ, "MAKEFLAGS": ""}
    proc = subprocess.Popen(make_argv(config, target), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)  # make and the stage under it, with no chance to clean up
    proc.wait()
    print(f"{stage}: kill at {delay:.2f} s of {durations[stage]:.2f} s ({'killed' if killed else 'had finished'})")

    make(config)  # finishes the run
    assert comparable(snapshot(run)) == comparable(snapshot(ref_run))
    assert not list(run.rglob(".tmp-*")), "a killed stage's temporary files were left behind"


@pytest.fixture(scope="module")
def ollama_server():
    """The contract server of test_ollama (our REST client's view of Ollama), for register."""
    import http.server
    import threading

    from test_ollama import FakeOllama

    FakeOllama.blobs, FakeOllama.models, FakeOllama.calls = {}, {}, []
    FakeOllama.done_reason, FakeOllama.answer = "stop", "こんにちは。私はアシスタントです。"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "ollama").exists())
    yield {**os.environ, "MAKEFLAGS": "", "OLLAMA_HOST": f"127.0.0.1:{server.server_port}", "PATH": path}
    server.shutdown()


def copy_run(ref_run: Path, run: Path) -> None:
    shutil.copytree(ref_run, run, ignore=shutil.ignore_patterns(".lock", "plan.mk"))


@pytest.fixture(scope="module")
def registered(reference, tiny_phi3_dir, tmp_path_factory, ollama_server):
    """The uninterrupted registration: its ollama.json and how long it took."""
    ref_run, _ = reference
    root = tmp_path_factory.mktemp("registered")
    config = run_config(tiny_phi3_dir, root)
    copy_run(ref_run, root / "build" / "t")
    t0 = time.monotonic()
    proc = subprocess.run(make_argv(config, "ollama"), cwd=REPO, capture_output=True, text=True, env=ollama_server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (root / "build" / "t" / "ollama.json").read_bytes(), time.monotonic() - t0


@pytest.mark.parametrize("k", range(KILLS), ids=[f"register-kill{k}" for k in range(KILLS)])
def test_kill_minus_9_during_registration(reference, registered, ollama_server, tiny_phi3_dir, tmp_path, k):
    ref_run, _ = reference
    want, duration = registered
    config = run_config(tiny_phi3_dir, tmp_path)
    run = tmp_path / "build" / "t"
    copy_run(ref_run, run)
    delay = random.Random(f"register-{k}").uniform(0.1, 1.0) * duration
    proc = subprocess.Popen(make_argv(config, "ollama"), cwd=REPO, env=ollama_server, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(f"register: kill at {delay:.2f} s of {duration:.2f} s ({'killed' if killed else 'had finished'})")
    if killed:
        assert not (run / "ollama.json").exists() or (run / "ollama.json").read_bytes() == want
    done = subprocess.run(make_argv(config, "ollama"), cwd=REPO, capture_output=True, text=True, env=ollama_server)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "ollama.json").read_bytes() == want
    assert not list(run.rglob(".tmp-*"))
