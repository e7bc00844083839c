"""Paths with spaces, through make itself.

Make splits file names at spaces (and reads # $ % : ; | * ? as syntax), with no escape that
survives its own functions. So plan.mk names the files inside the project relative to it, and a
clone in a folder with a space (a Windows or macOS home folder) builds as any other; a run folder
or an input whose own path has one is refused by check-config, naming the key and the path,
before make could say "No rule to make target" and before anything is written.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DEMO_DATA, REPO, small_config, write_config
from makeutil import copy_source_tree, run_make, snapshot
from pipeline.config import PROJECT_DIR, make_name_problem, make_path


def user_make(tree: Path, *args: str) -> subprocess.CompletedProcess:
    """The top-level Makefile of `tree`, as a user runs it."""
    return subprocess.run(["make", "--no-print-directory", *args], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "MAKEFLAGS": "", "HF_HUB_OFFLINE": "1"}, timeout=300)


# -- a clone in a folder with a space: it works -----------------------------------------

@pytest.fixture(scope="module")
def spaced_clone(tiny_phi3_dir, tmp_path_factory) -> Path:
    """A copy of this checkout at <tmp>/with space/agiasi, with demo.yaml's tiny base in its build/."""
    tree = copy_source_tree(tmp_path_factory.mktemp("clone") / "with space" / "agiasi")
    shutil.copytree(tiny_phi3_dir, tree / "build" / "tiny-phi3")
    return tree


def test_a_clone_in_a_folder_with_a_space_builds_and_then_finds_its_work_done(spaced_clone):
    tree = spaced_clone
    first = user_make(tree, "data", "CONFIG=demo.yaml")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "==> [data] building reports/data.json" in first.stdout
    assert (tree / "build" / "demo" / "reports" / "data.json").is_file()
    plan = (tree / "build" / "demo" / "plan.mk").read_text(encoding="utf-8")
    assert "with space" not in plan and "DATA := data/demo_ja.jsonl\n" in plan, plan
    # The same config named by its absolute path, which has the space: the same run, up to date.
    again = user_make(tree, "data", f"CONFIG={tree / 'demo.yaml'}")
    assert again.returncode == 0 and "==> [" not in again.stdout, again.stdout + again.stderr


def test_a_run_folder_with_a_space_inside_the_clone_is_refused(spaced_clone):
    """Inside the project only the part below it counts, and there a space is refused too."""
    tree = spaced_clone
    config = tree / "spaced.yaml"
    demo = (tree / "demo.yaml").read_text(encoding="utf-8")
    config.write_text(demo.replace("build_dir: build", 'build_dir: "my build"'), encoding="utf-8")
    proc = user_make(tree, "data", "CONFIG=spaced.yaml")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"run.build_dir: the run folder {tree / 'my build' / 'demo'} has a space in its path" in proc.stderr
    assert "Traceback" not in proc.stderr and "No rule to make target" not in proc.stderr, proc.stderr
    assert not (tree / "my build").exists()


# -- a run folder or an input whose own path has a space: refused -------------------------

def place(source: Path, dest: Path) -> str:
    """A copy of `source` (a file or a folder) at `dest`, as a config value."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if source.is_dir() else shutil.copy)(source, dest)
    return str(dest)


@dataclass(frozen=True)
class Case:
    name: str
    overrides: Callable[[Path, Path], dict]  # (the case's folder, the tiny base) -> the config's changes
    key: str  # the message's start
    named: str  # the path it names, under the case's folder
    what: str  # what make cannot take in it


CASES = [
    Case("build-dir-space", lambda tmp, base: {"run": {"build_dir": str(tmp / "my build")}},
         "run.build_dir: the run folder", "my build/t", "a space"),
    Case("build-dir-hash", lambda tmp, base: {"run": {"build_dir": str(tmp / "C#")}},
         "run.build_dir: the run folder", "C#/t", "'#'"),
    Case("data-space", lambda tmp, base: {"data": {"train": place(DEMO_DATA, tmp / "my data" / "demo.jsonl")}},
         "data.train:", "my data/demo.jsonl", "a space"),
    Case("base-space", lambda tmp, base: {"model": {"base": place(base, tmp / "my base")}},
         "model.base:", "my base", "a space"),
    Case("heldout-percent", lambda tmp, base: {"eval": {"heldout": place(REPO / "data" / "heldout_ja.txt",
                                                                         tmp / "100%" / "heldout.txt")}},
         "eval.heldout:", "100%/heldout.txt", "'%'"),
]


@pytest.mark.reliability("bad-input")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_path_make_cannot_name_is_refused_before_make_and_leaves_nothing(case, tiny_phi3_dir, tmp_path):
    tmp = tmp_path.resolve()
    config = write_config(tmp / "cfg.yaml", small_config(tiny_phi3_dir, tmp / "build",
                                                         **case.overrides(tmp, tiny_phi3_dir)))
    before = snapshot(tmp)
    expected = f"{case.key} {tmp / case.named} has {case.what} in its path"

    made = run_make(config, "data")
    assert made.returncode == 2, made.stdout + made.stderr
    assert expected in made.stderr and "is not usable" in made.stderr, made.stderr
    assert "Traceback" not in made.stderr and "No rule to make target" not in made.stderr, made.stderr
    # Nothing written: no run folder, stamps or plan.mk that a later make would take as a start.
    assert snapshot(tmp) == before

    checked = subprocess.run([sys.executable, "-m", "pipeline", "check-config", "--config", str(config)],
                             cwd=REPO, capture_output=True, text=True)
    assert checked.returncode == 2 and expected in checked.stderr, checked.stderr
    assert "Traceback" not in checked.stderr


def test_the_same_config_without_the_space_passes(tiny_phi3_dir, tmp_path):
    """The control: the refusal is about the space, not the config."""
    config = write_config(tmp_path / "cfg.yaml", small_config(tiny_phi3_dir, tmp_path / "my_build"))
    checked = subprocess.run([sys.executable, "-m", "pipeline", "check-config", "--config", str(config)],
                             cwd=REPO, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_make_path_is_relative_inside_the_project_and_absolute_outside(tmp_path):
    assert make_path(PROJECT_DIR / "build" / "demo" / ".." / "demo") == "build/demo"
    assert make_path(tmp_path / "x") == str(tmp_path.resolve() / "x")
    assert make_name_problem("build/demo") is None
    assert make_name_problem("a b") == make_name_problem("a\tb") == "a space"
    assert make_name_problem("50%:x") == "'%' and ':'"
