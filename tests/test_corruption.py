"""Damaged artifacts are found before they are used, and Make rebuilds them.

A chain is built once; each case damages one artifact (truncation, a flipped
bit, a lost sidecar, bad magic), runs `make` again, and checks that exactly
the damaged artifact and what depends on it were rebuilt, to the same bytes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, small_config, write_config
from makeutil import changed, make, needs_llama_cpp, snapshot, top

pytestmark = [pytest.mark.slow, pytest.mark.reliability("corruption")]


@pytest.fixture(scope="module")
def built(tiny_phi3_dir, tmp_path_factory):
    needs_llama_cpp()
    root = tmp_path_factory.mktemp("corrupt")
    path = write_config(root / "config.yaml", small_config(tiny_phi3_dir, root / "build"))
    make(path)
    run = root / "build" / "t"
    return path, run, snapshot(run)


def truncate(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def flip_bit(p: Path, keep_mtime: bool = False) -> None:
    st = p.stat()
    with open(p, "r+b") as f:
        f.seek(st.st_size - 100)  # in the tensor data, past any header
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    if keep_mtime:  # bit rot: the bytes change, the mtime does not
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def bad_magic(p: Path) -> None:
    with open(p, "r+b") as f:
        f.write(b"GGUX")


FUSED_WEIGHTS = "fused/model.safetensors"
ADAPTER = "checkpoints/final/adapter_model.safetensors"
# (name, damage, file, groups that must be rebuilt)
# A new fused model comes with its model card (fused/README.md, rewritten by fuse and refreshed by
# convert and quantize) and both GGUFs.
FUSED_ON = {"fused", "fused/README.md", "gguf/t-f16.gguf", "gguf/t-q4_k_m.gguf"}
CASES = [
    ("converted-gguf-truncated", truncate, "gguf/t-f16.gguf", {"gguf/t-f16.gguf", "gguf/t-q4_k_m.gguf"}),
    ("converted-gguf-bit-flip", flip_bit, "gguf/t-f16.gguf", {"gguf/t-f16.gguf", "gguf/t-q4_k_m.gguf"}),
    ("quantized-gguf-bad-magic", bad_magic, "gguf/t-q4_k_m.gguf", {"gguf/t-q4_k_m.gguf"}),
    ("quantized-gguf-sidecar-lost", lambda p: Path(str(p) + ".sha256").unlink(), "gguf/t-q4_k_m.gguf",
     {"gguf/t-q4_k_m.gguf"}),
    ("fused-safetensors-truncated", truncate, FUSED_WEIGHTS, FUSED_ON),
    ("fused-safetensors-bit-flip", flip_bit, FUSED_WEIGHTS, FUSED_ON),
    ("fused-config-edited", lambda p: p.write_text(p.read_text().replace("\n", "\n ", 1)), "fused/config.json",
     FUSED_ON),
    ("checkpoint-adapter-bit-flip", flip_bit, ADAPTER,
     {"checkpoints/final", *FUSED_ON}),
    ("checkpoint-soul-truncated", truncate, "checkpoints/final/soul.safetensors",
     {"checkpoints/final", *FUSED_ON}),
]


@pytest.mark.parametrize("name,damage,rel,rebuilt", CASES, ids=[c[0] for c in CASES])
def test_damage_is_found_and_rebuilt_to_the_same_bytes(built, name, damage, rel, rebuilt):
    path, run, original = built
    damage(run / rel)
    before = snapshot(run)
    proc = make(path)
    assert "==> [verify]" in proc.stderr and "removed, it will be rebuilt" in proc.stderr, proc.stderr
    after = snapshot(run)
    groups = top(changed(before, after)) - {"reports", "metrics.jsonl"}  # logs, rewritten by a resumed train
    assert rebuilt <= groups, (groups, proc.stdout)
    assert not {g for g in groups if not g.startswith("stamps")} - rebuilt, groups
    # Every artifact is back to the bytes of the first build (the stages are deterministic).
    for rel_path, (_, digest) in original.items():
        if not rel_path.startswith(("reports", "stamps", "metrics", ".lock", "plan.mk")):
            assert after[rel_path][1] == digest, rel_path
    assert make(path).stdout.count("==>") == 0  # and it is trusted again


def test_bit_rot_that_keeps_the_mtime_is_caught_by_the_consumer(built):
    """A bit flip that keeps the mtime passes the quick check at plan time; quantize's full
    sha256 catches it before reading, removes the file, and the next make rebuilds it."""
    path, run, original = built
    converted = run / "gguf" / "t-f16.gguf"
    flip_bit(converted, keep_mtime=True)
    (run / "gguf" / "t-q4_k_m.gguf").unlink()  # so that quantize runs and reads the damaged file
    env = {**os.environ, "MAKEFLAGS": ""}
    proc = subprocess.run(["make", "--no-print-directory", "-f", "pipeline.mk", "modelfile", f"CONFIG={path}",
                           f"PY={sys.executable}"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert f"{converted}: sha256" in proc.stderr and "removed it, run make again to rebuild it" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not converted.exists() and not (run / "gguf" / "t-q4_k_m.gguf").exists()
    make(path)
    assert snapshot(run)["gguf/t-f16.gguf"][1] == original["gguf/t-f16.gguf"][1]
    assert snapshot(run)["gguf/t-q4_k_m.gguf"][1] == original["gguf/t-q4_k_m.gguf"][1]


def test_a_damaged_step_checkpoint_is_not_resumed_from(tiny_phi3_dir, tmp_path, capsys):
    """Resuming skips (and removes) a step checkpoint whose files do not match its marker."""
    from pipeline.config import load_config
    from pipeline.train import train

    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "b")))
    train(cfg)
    ckpts = cfg.run_dir / "checkpoints"
    reference = (ckpts / "final" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(ckpts / "final")
    flip_bit(ckpts / "step_000006" / "trainer_state.safetensors")
    capsys.readouterr()
    train(cfg)  # must resume from step 3, not from the damaged step 6
    log = capsys.readouterr().out
    assert "removing step_000006: damaged (trainer_state.safetensors: sha256" in log, log
    assert "resuming from step_000003" in log, log
    assert (ckpts / "final" / "adapter_model.safetensors").read_bytes() == reference
    from pipeline.integrity import folder_problem

    assert folder_problem(ckpts / "step_000006", "checkpoint.json", full=True) is None  # written anew
