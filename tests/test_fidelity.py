"""The fidelity gate fails a conversion that does not keep the trained model."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import rerecord, small_config, write_config
from pipeline import adapter as adapter_module
from pipeline import fuse as fuse_module
from pipeline.config import load_config
from pipeline.fidelity import FidelityError, check_converted, compare
from pipeline.soul import SO8Soul, save_soul
from pipeline.train import train


@pytest.fixture(scope="module")
def rotated_run(tiny_phi3_dir, tmp_path_factory):
    """A trained run whose soul is replaced by a clearly rotating one (alpha 1.618),
    so that a wrong fold shows in the logits."""
    root = tmp_path_factory.mktemp("gate")
    cfg = load_config(write_config(root / "c.yaml", small_config(tiny_phi3_dir, root / "b")))
    train(cfg)
    soul = SO8Soul(256, alpha=1.618)
    with torch.no_grad():
        soul.generator.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_soul(cfg.final_checkpoint / "soul.safetensors", soul, step=cfg.train.steps)
    rerecord(cfg.final_checkpoint, "soul.safetensors")
    return cfg


def test_gate_passes_a_correct_fold(rotated_run):
    fuse_module.fuse(rotated_run)
    report = json.loads((rotated_run.run_dir / "reports" / "fidelity.json").read_text())
    assert report["fuse"]["passed"] and report["fuse"]["kl"] < 1e-6


@pytest.mark.parametrize("wrong", ["transposed", "no_sigmoid"])
def test_gate_fails_a_wrong_fold_and_keeps_nothing(rotated_run, monkeypatch, wrong):
    right = adapter_module.fold_soul_rows

    def wrong_fold(weight, rotation, alpha, out_dtype=None):
        if wrong == "transposed":
            return right(weight, rotation.transpose(-1, -2), alpha, out_dtype=out_dtype)
        w = weight.float()  # alpha used as the gate, without its sigmoid
        return iter([(w + alpha * (w @ torch.block_diag(*rotation))).to(out_dtype or weight.dtype)])

    fuse_module.fuse(rotated_run)  # a good fused model exists before the bad attempt
    monkeypatch.setattr(adapter_module, "fold_soul_rows", wrong_fold)
    with pytest.raises(FidelityError, match=r"fidelity gate failed at fuse: KL\(trained \|\| fused \(merge base original\)\)"):
        fuse_module.fuse(rotated_run)
    assert not rotated_run.fused_dir.exists()
    assert not list(rotated_run.run_dir.glob("**/.tmp-*"))
    report = json.loads((rotated_run.run_dir / "reports" / "fidelity.json").read_text())
    assert report["fuse"]["passed"] is False and report["fuse"]["bound_key"] == "fidelity.max_kl_fused"


@pytest.mark.slow
def test_convert_gate_refuses_a_gguf_of_another_model(rotated_run, tiny_phi3_dir, tmp_path):
    from pipeline import llamacpp

    try:
        llamacpp.load_bindings()
    except llamacpp.ToolchainError as e:
        pytest.skip(f"pinned llama.cpp not built ({e})")
    fuse_module.fuse(rotated_run)
    out = tmp_path / "t-f16.gguf"
    with pytest.raises(FidelityError, match="fidelity gate failed at convert"):
        llamacpp.convert_hf_to_gguf(tiny_phi3_dir, out, "f16", model_name="base-phi3",
                                    check=lambda tmp: check_converted(rotated_run, rotated_run.fused_dir, tmp))
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_compare_measures_what_it_says():
    import numpy as np

    a = np.random.default_rng(0).normal(size=(5, 10))
    same = compare([a], [a.copy()])
    assert same.kl == pytest.approx(0, abs=1e-12) and same.top1 == 1.0 and same.max_abs == 0
    shifted = compare([a], [a + 3.0])  # a constant shift leaves the distribution alone
    assert shifted.kl == pytest.approx(0, abs=1e-12) and shifted.max_abs == pytest.approx(3.0)
    other = compare([a], [-a])
    assert other.kl > 0.1 and other.top1 < 0.5
