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


def test_shared_block_and_learned_alpha_train_and_fuse_exactly(tiny_phi3_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.hf import load_trained
    from pipeline.fuse import fuse
    from pipeline.soul import load_soul

    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(
        tiny_phi3_dir, tmp_path / "b", train={"steps": 8, "save_every": 4},
        soul={"warmup_steps": 1, "anneal_steps": 3, "shared_block": True, "learn_alpha": True, "lr": 0.05})))
    train(cfg)
    state = load_soul(cfg.final_checkpoint / "soul.safetensors")
    assert state.generator.shape == (1, 8, 8) and state.rotation.shape == (32, 8, 8)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    scheduled = [r["alpha"] for r in rows[:5]]
    assert scheduled[-1] == pytest.approx(cfg.soul.alpha_target)  # the schedule ran to its target
    assert rows[-1]["alpha"] != pytest.approx(cfg.soul.alpha_target, abs=1e-4)  # then alpha learned
    assert state.alpha == pytest.approx(rows[-1]["alpha"], abs=0.1)

    trained, _ = load_trained(cfg.final_checkpoint, device=torch.device("cpu"))
    fused = AutoModelForCausalLM.from_pretrained(str(fuse(cfg)), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(tiny_phi3_dir))("黄金比は美しい。", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (trained(ids).logits - fused(ids).logits).abs().max() < 1e-4


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_effective_batch(tiny_phi3_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 1 each == 1 process, batch 2.
    Tolerance 1e-5: the sums are the same numbers added in another order."""
    results = []
    for name, nproc, bs in (("one", 1, 2), ("two", 2, 1)):
        config = write_config(tmp_path / f"{name}.yaml", small_config(
            tiny_phi3_dir, tmp_path / name, train={"batch_size": bs, "steps": 4, "save_every": 2},
            soul={"warmup_steps": 1, "anneal_steps": 2}))
        cmd = [sys.executable, "-m", "pipeline", "train", "--config", str(config)]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "pipeline", "train", "--config", str(config)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(final_tensors(load_config(config)))
    assert_same(*results, tol=1e-5)
