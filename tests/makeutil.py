"""Running pipeline.mk from tests, and telling which artifacts a run rewrote."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path


from conftest import REPO, needs_llama_cpp_built
from pipeline import llamacpp
from pipeline.plan import write_plan


def needs_llama_cpp(bindings: bool = False):
    """The pinned llama.cpp build (its install dir), or with bindings=True its Python bindings.

    Not built at all: a skip that says how to build it (a failure in CI: conftest.SKIP_ALLOWED_IN_CI).
    Built but broken (a missing tool, bindings that do not import or load another library): the
    error itself, a failure everywhere. An install step that went wrong is never a skip."""
    path = needs_llama_cpp_built()
    llamacpp.require_install()
    return llamacpp.load_bindings() if bindings else path


# Folders of build outputs and environments (.gitignore's), for a checkout that is not a git one.
NOT_SOURCE = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".hypothesis", "node_modules"}


def source_files() -> list[str]:
    """This checkout's source files, relative to it: what git tracks and the new files it does not
    ignore; outside a git checkout (a copy of one, the Docker image's source) every file outside
    the folders of build outputs and environments."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True)
    if listed.returncode == 0:
        return [rel for rel in listed.stdout.decode().split("\0") if rel]
    return [str(p.relative_to(REPO)) for p in REPO.rglob("*")
            if p.is_file() and not NOT_SOURCE & set(p.relative_to(REPO).parts)]


def copy_source_tree(dest: Path) -> Path:
    """A copy of this checkout's source (with their mtimes, so Make sees the same order) at dest,
    with `.venv` linked to this interpreter's env: a clone as a user has it, whose `make` installs
    nothing again and builds into its own build/."""
    for rel in source_files():
        src = REPO / rel
        if src.is_file():  # a deleted file is still listed until it is committed
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


def run_make(config: Path, target: str = "modelfile", *flags: str) -> subprocess.CompletedProcess:
    """pipeline.mk `target` for `config`, whatever its outcome."""
    return subprocess.run(
        ["make", "--no-print-directory", "-f", "pipeline.mk", *flags, target, f"CONFIG={config}",
         f"PY={sys.executable}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""},
    )


def make(config: Path, target: str = "modelfile") -> subprocess.CompletedProcess:
    proc = run_make(config, target)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def adopt_trained_run(source, cfg) -> None:
    """Give the run of `cfg` the prepared data, final checkpoint and fused model of the run of
    `source` (both Configs of the same base), as Make would have left them: copies keep their
    mtimes, and the new run's stamps are made older than every copy, so Make builds only what
    comes after fuse."""
    shutil.copytree(source.prepared_dir, cfg.prepared_dir)
    shutil.copytree(source.final_checkpoint, cfg.final_checkpoint)
    shutil.copytree(source.fused_dir, cfg.fused_dir)
    cfg.reports_dir.mkdir(parents=True)
    for report in ("data.json", "data.md", "fidelity.json"):
        if (source.reports_dir / report).is_file():
            shutil.copy2(source.reports_dir / report, cfg.reports_dir / report)
    write_plan(cfg)
    for stamp in cfg.stamp_dir.iterdir():
        os.utime(stamp, (0, 0))


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
    """Group changed files by artifact: checkpoints/final, fused, fused/README.md (the model card),
    gguf/x.gguf, Modelfile, stamps/x."""
    groups = set()
    for p in paths:
        parts = p.split("/")
        group = "/".join(parts[:2]) if parts[0] in ("checkpoints", "gguf", "stamps") else parts[0]
        group = p if p == "fused/README.md" else group  # the model card, refreshed after fuse: not the model
        groups.add(group.removesuffix(".sha256"))  # a sidecar belongs to its artifact
    return groups
