"""kill -9 at random moments of each stage, then `make` again: it finishes the stage, and every
artifact equals the one an uninterrupted run had at that point, byte for byte. (The stages after
it read only those artifacts; each of them has its own kill cases, started from the same bytes.)

Each stage starts from a copy of an uninterrupted run taken just before that stage.
The moment is drawn (seeded, printed) over the stage's own measured duration and
counted from the line make prints as it starts the stage. At that moment make and the
stage are frozen (SIGSTOP) and looked at: only a kill that finds the stage's process
alive and its artifact not yet written counts as an interruption. One that does not
(the stage had finished) is retried on a fresh copy at half the moment, and a case
that never interrupts fails: no case passes without a real interruption.
AGIASI_FAULT_KILLS (default 2) sets kills per stage.
"""
from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, small_config, write_config
from makeutil import make, needs_llama_cpp, snapshot
from pipeline.config import Config, load_config

pytestmark = [pytest.mark.slow, pytest.mark.reliability("faults")]

KILLS = int(os.environ.get("AGIASI_FAULT_KILLS", "2"))
ATTEMPTS = 4  # per case; each after a kill that did not interrupt, at half the moment
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


def artifact(cfg: Config, argv: list[str]) -> Path:
    """What the stage process `python -m pipeline <stage> ...` writes last: the file Make takes as its output."""
    stage = argv[3]
    if stage == "quantize":
        return cfg.gguf_path(argv[argv.index("--type") + 1])
    return {"data": cfg.data_report, "train": cfg.checkpoint_marker, "fuse": cfg.fused_marker,
            "convert": cfg.gguf_path(cfg.gguf.outtype), "register": cfg.ollama_stamp}[stage]


def stage_processes(group: int, stage: str) -> list[list[str]]:
    """Command lines of the live processes of process group `group` that run `python -m pipeline <stage>`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:  # ended meanwhile
            continue
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]  # after "pid (comm)": state ppid pgrp
        if int(pgrp) == group and state not in "ZX" and argv[1:4] == ["-m", "pipeline", stage]:
            found.append(argv)
    return found


class StageRun:
    """`make` started in a session of its own, read until it prints the command line of `stage`'s
    recipe (make prints it as it starts the stage); its output is drained from then on."""

    def __init__(self, argv: list[str], env: dict, stage: str):
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, start_new_session=True, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output: list[str] = []
        self.started: float | None = None  # None: make ended without starting the stage
        self.command: list[str] = []  # the stage's command line, as make printed it
        for line in self.proc.stdout:
            self.output.append(line)
            if f" -m pipeline {stage} " in line:
                self.started, self.command = time.monotonic(), shlex.split(line)
                break
        self.reader = threading.Thread(target=self.output.extend, args=(self.proc.stdout,), daemon=True)
        self.reader.start()

    def wait(self) -> int:
        self.proc.wait()
        self.reader.join()
        return self.proc.returncode

    def kill(self, stage: str, artifact_of: Callable[[list[str]], Path]) -> bool:
        """kill -9 make and everything under it; True when the kill interrupted `stage`: frozen first, the
        group still had a process of the stage whose artifact did not exist."""
        try:
            os.killpg(self.proc.pid, signal.SIGSTOP)  # nothing moves between the look and the kill
            interrupted = any(not artifact_of(argv).exists() for argv in stage_processes(self.proc.pid, stage))
            os.killpg(self.proc.pid, signal.SIGKILL)  # no chance to clean up
        except ProcessLookupError:  # the whole group had ended
            interrupted = False
        self.wait()
        return interrupted


def timed_stage(argv: list[str], env: dict, stage: str, config: Path) -> float:
    """Run make to the end; seconds from the start of `stage` to make's exit. The stage's artifact
    exists then (what `artifact` names is what an interruption is judged by)."""
    run = StageRun(argv, env, stage)
    assert run.started is not None, "".join(run.output)[-3000:]
    assert run.wait() == 0, "".join(run.output)[-3000:]
    duration = time.monotonic() - run.started
    assert artifact(load_config(config), run.command).is_file(), run.command
    return duration


def kill_within(stage: str, seed: str, duration: float, fresh: Callable[[int], tuple[list[str], dict, Config]]) -> int:
    """kill -9 at a drawn moment of `stage` until a kill interrupts it; the attempt that did.

    fresh(attempt) prepares a new copy of the run and returns make's command line, environment and config."""
    fraction = random.Random(seed).uniform(0.1, 1.0)
    for attempt in range(ATTEMPTS):
        argv, env, cfg = fresh(attempt)
        run = StageRun(argv, env, stage)
        assert run.started is not None, f"{stage} never started: " + "".join(run.output)[-3000:]
        time.sleep(fraction * duration)  # the fault's moment, drawn; not an ordering
        interrupted = run.kill(stage, lambda a: artifact(cfg, a))
        print(f"{stage}: kill at {fraction * duration:.2f} s of {duration:.2f} s "
              f"({'interrupted' if interrupted else 'the stage had finished; again at half'})")
        if interrupted:
            return attempt
        fraction /= 2
    pytest.fail(f"{stage}: none of {ATTEMPTS} kills interrupted the stage (it took {duration:.2f} s uninterrupted)")


def run_config(tiny: Path, root: Path) -> Path:
    return write_config(root / "config.yaml", small_config(tiny, root / "build"))


def make_argv(config: Path, target: str) -> list[str]:
    if target == "CONVERTED":
        target = str(config.parent / "build" / "t" / "gguf" / "t-f16.gguf")
    return ["make", "--no-print-directory", "-f", "pipeline.mk", target, f"CONFIG={config}", f"PY={sys.executable}"]


def comparable(snap: dict) -> dict:
    return {k: v[1] for k, v in snap.items() if not k.startswith(NOT_COMPARED)}


@dataclass
class Reference:
    """An uninterrupted run, made stage by stage: the run folder, each stage's duration from its
    start, what the run held after each stage's target, and what that target wrote."""
    run: Path
    durations: dict[str, float]
    after: dict[str, dict[str, str]]
    wrote: dict[str, set[str]]


@pytest.fixture(scope="module")
def reference(tiny_phi3_dir, tmp_path_factory) -> Reference:
    needs_llama_cpp()
    root = tmp_path_factory.mktemp("reference")
    config = run_config(tiny_phi3_dir, root)
    ref = Reference(root / "build" / "t", {}, {}, {})
    env, held = {**os.environ, "MAKEFLAGS": ""}, {}
    for stage, (_, target) in STAGES.items():
        ref.durations[stage] = timed_stage(make_argv(config, target), env, stage, config)
        ref.after[stage] = comparable(snapshot(ref.run))
        ref.wrote[stage] = {k for k, digest in ref.after[stage].items() if held.get(k) != digest}
        held = ref.after[stage]
    make(config)  # the Modelfile
    return ref


CASES = [(stage, k) for stage in STAGES for k in range(KILLS)]


@pytest.mark.parametrize("stage,k", CASES, ids=[f"{s}-kill{k}" for s, k in CASES])
def test_kill_minus_9_then_make_again(reference, tiny_phi3_dir, tmp_path, stage, k):
    ref_run = reference.run
    copied, target = STAGES[stage]

    def fresh(attempt: int) -> tuple[list[str], dict, Config]:
        config = run_config(tiny_phi3_dir, tmp_path / f"try{attempt}")
        run = config.parent / "build" / "t"
        run.mkdir(parents=True)
        for rel in copied:
            src, dst = ref_run / rel, run / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        shutil.copytree(ref_run / "stamps", run / "stamps")  # same config, same stamps (and mtimes)
        return make_argv(config, target), {**os.environ, "MAKEFLAGS": ""}, load_config(config)

    attempt = kill_within(stage, f"{stage}-{k}", reference.durations[stage], fresh)
    config = tmp_path / f"try{attempt}" / "config.yaml"
    run = config.parent / "build" / "t"
    again = subprocess.run(make_argv(config, target), cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "MAKEFLAGS": ""})  # finishes the stage
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    got, want = comparable(snapshot(run)), reference.after[stage]
    assert reference.wrote[stage] <= set(got), f"not rebuilt: {sorted(reference.wrote[stage] - set(got))}"
    differ = sorted(k for k in got if got[k] != want.get(k))
    assert not differ, f"not what the uninterrupted run had after `{target}`: {differ}"
    assert not list(run.rglob(".tmp-*")), "a killed stage's temporary files were left behind"


@pytest.fixture(scope="module")
def ollama_server(tmp_path_factory):
    """The contract server of test_ollama (our REST client's view of Ollama), for register."""
    from ollama_contract import running
    from pipeline import llamacpp

    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "ollama").exists())
    with running(tmp_path_factory.mktemp("blobs"), str(llamacpp.tool("llama-quantize"))) as host:
        yield {**os.environ, "MAKEFLAGS": "", "OLLAMA_HOST": host, "PATH": path}


def copy_run(ref_run: Path, run: Path) -> None:
    shutil.copytree(ref_run, run, ignore=shutil.ignore_patterns(".lock", "plan.mk"))


@pytest.fixture(scope="module")
def registered(reference, tiny_phi3_dir, tmp_path_factory, ollama_server):
    """The uninterrupted registration: its ollama.json and how long the register stage took."""
    ref_run = reference.run
    root = tmp_path_factory.mktemp("registered")
    config = run_config(tiny_phi3_dir, root)
    copy_run(ref_run, root / "build" / "t")
    duration = timed_stage(make_argv(config, "ollama"), ollama_server, "register", config)
    return (root / "build" / "t" / "ollama.json").read_bytes(), duration


@pytest.mark.parametrize("k", range(KILLS), ids=[f"register-kill{k}" for k in range(KILLS)])
def test_kill_minus_9_during_registration(reference, registered, ollama_server, tiny_phi3_dir, tmp_path, k):
    ref_run = reference.run
    want, duration = registered

    def fresh(attempt: int) -> tuple[list[str], dict, Config]:
        config = run_config(tiny_phi3_dir, tmp_path / f"try{attempt}")
        copy_run(ref_run, config.parent / "build" / "t")
        return make_argv(config, "ollama"), ollama_server, load_config(config)

    attempt = kill_within("register", f"register-{k}", duration, fresh)
    config = tmp_path / f"try{attempt}" / "config.yaml"
    run = config.parent / "build" / "t"
    assert not (run / "ollama.json").exists()  # killed before it was written: nothing half-written in its place
    done = subprocess.run(make_argv(config, "ollama"), cwd=REPO, capture_output=True, text=True, env=ollama_server)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "ollama.json").read_bytes() == want
    assert not list(run.rglob(".tmp-*"))
