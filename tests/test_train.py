"""Training: resumable after kill -9 with the same result, exact accumulation,
no pickles, finished training not redone."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, small_config, write_config
from pipeline.config import load_config
from pipeline.train import train

OVERRIDES = {"train": {"lora": {"dropout": 0.1}, "steps": 6, "save_every": 3}}


def final_tensors(cfg) -> dict[str, torch.Tensor]:
    folder = cfg.final_checkpoint
    out = {f"adapter.{k}": v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    out.update({f"soul.{k}": v for k, v in load_file(str(folder / "soul.safetensors")).items()})
    return out


def assert_same(a: dict, b: dict, tol: float = 1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def reference(tiny_phi3_dir, tmp_path_factory):
    """An uninterrupted run with dropout on (so RNG state matters on resume)."""
    root = tmp_path_factory.mktemp("ref")
    cfg = load_config(write_config(root / "c.yaml", small_config(tiny_phi3_dir, root / "b", **OVERRIDES)))
    train(cfg)
    return cfg


def run_train(config, kill_at=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AGIASI_TEST_KILL_AT"}
    if kill_at:
        env["AGIASI_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,resumes_from", [
    ("step:2", None),          # before any checkpoint: starts over
    ("step:4", "step_000003"),  # between checkpoints
    ("save:6", "step_000003"),  # in the middle of writing step_000006
    ("save:3", None),          # in the middle of writing the first checkpoint
])
def test_kill_9_then_resume_gives_the_uninterrupted_result(reference, tiny_phi3_dir, tmp_path, kill_at, resumes_from):
    config = write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "b", **OVERRIDES))
    killed = run_train(config, kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cfg = load_config(config)
    assert not cfg.final_checkpoint.exists()
    resumed = run_train(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if resumes_from:
        assert f"resuming from {resumes_from}" in resumed.stdout
    else:
        assert "resuming" not in resumed.stdout
    assert_same(final_tensors(cfg), final_tensors(reference))
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))
    steps = [json.loads(x)["step"] for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_finished_training_is_not_redone(reference, capsys):
    before = {p: p.stat().st_mtime_ns for p in reference.final_checkpoint.iterdir()}
    assert train(reference) == reference.final_checkpoint
    assert "already trained" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in reference.final_checkpoint.iterdir()}


def test_checkpoints_hold_no_pickles(reference):
    for folder in (reference.run_dir / "checkpoints").iterdir():
        for f in folder.iterdir():
            assert f.suffix in (".json", ".safetensors", ".md"), f
    state = json.loads((reference.final_checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 6


def test_gradient_accumulation_equals_a_bigger_batch(tiny_phi3_dir, tmp_path):
    """Micro-batches of 1 accumulated twice == one batch of 2 (token-weighted loss)."""
    results = []
    for name, bs, acc in (("big", 2, 1), ("acc", 1, 2)):
        cfg = load_config(write_config(tmp_path / f"{name}.yaml", small_config(
            tiny_phi3_dir, tmp_path / name, train={"batch_size": bs, "grad_accum": acc, "steps": 3, "save_every": 3},
            soul={"warmup_steps": 1, "anneal_steps": 1})))
        train(cfg)
        results.append(final_tensors(cfg))
    assert_same(*results, tol=1e-5)


def test_stale_checkpoints_of_another_config_are_not_resumed(reference, tmp_path, tiny_phi3_dir):
    import shutil

    config = write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "b", **OVERRIDES))
    cfg = load_config(config)
    shutil.copytree(reference.run_dir / "checkpoints" / "step_000003", cfg.run_dir / "checkpoints" / "step_000003")
    marker = cfg.run_dir / "checkpoints" / "step_000003" / "checkpoint.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "train_config_sha256": "other"}))
    proc = run_train(config)
    assert proc.returncode == 0 and "trained with another config" in proc.stdout
    assert "resuming" not in proc.stdout
    assert_same(final_tensors(cfg), final_tensors(reference))
