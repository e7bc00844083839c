"""The fidelity gate fails a conversion that does not keep the trained model."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import rerecord, small_config, write_config
from makeutil import needs_llama_cpp
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

    needs_llama_cpp(bindings=True)
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


# -- the convert gate at the context Ollama will allocate (ollama.parameters.num_ctx) ------------------
@pytest.fixture(scope="module")
def phi35_base(tmp_path_factory):
    """Phi-3.5-mini's real config (LongRoPE: original context 4096 of 131072) at a small width."""
    from pipeline.phi35 import build_phi35_shaped

    return build_phi35_shaped(tmp_path_factory.mktemp("phi35") / "phi35", num_hidden_layers=2)


def phi35_config(phi35_base, tmp_path, **ollama):
    raw = small_config(phi35_base, tmp_path / "b", ollama={"parameters": {"num_ctx": 4096}, **ollama})
    raw["train"]["lora"]["target_modules"] = ["qkv_proj", "o_proj"]
    return raw


def convert_gated(cfg, phi35_base, tmp_path):
    """The converter run as make runs it: the GGUF is kept only if check_converted passes."""
    from pipeline import llamacpp

    needs_llama_cpp(bindings=True)
    out = tmp_path / "p-f16.gguf"
    llamacpp.convert_hf_to_gguf(phi35_base, out, "f16", model_name="phi35-shaped",
                                check=lambda tmp: check_converted(cfg, phi35_base, tmp))
    report = json.loads((cfg.run_dir / "reports" / "fidelity.json").read_text())
    return out, report, (cfg.run_dir / "reports" / "fidelity.md").read_text()


@pytest.mark.slow
def test_the_convert_gate_runs_llama_cpp_at_the_served_context(phi35_base, tmp_path):
    """num_ctx 4096, Phi-3.5's original context: the GGUF runs in a 4096-token context (short
    RoPE factors, as Ollama runs it) and passes; no long-context row."""
    cfg = load_config(write_config(tmp_path / "c.yaml", phi35_config(phi35_base, tmp_path)))
    assert cfg.served_context == 4096
    out, report, _ = convert_gated(cfg, phi35_base, tmp_path)
    assert out.exists()
    assert report["convert"]["passed"] and report["convert"]["n_ctx"] == 4096
    assert report["convert"]["kl"] < cfg.fidelity.max_kl_converted
    assert "(n_ctx 4096)" in report["convert"]["candidate"] and "convert:long-context" not in report


def test_a_num_ctx_above_the_original_context_is_refused(phi35_base, tmp_path):
    from pipeline.config import ConfigError

    raw = phi35_config(phi35_base, tmp_path, parameters={"num_ctx": 8192})
    with pytest.raises(ConfigError, match=r"ollama.parameters.num_ctx: 8192 is above the model's original "
                                          r"context 4096 .*Allowed: 1 to 4096.*allow_long_context: true"):
        load_config(write_config(tmp_path / "c.yaml", raw))


@pytest.mark.slow
def test_allow_long_context_reports_the_long_factor_model(phi35_base, tmp_path):
    """num_ctx 8192 with allow_long_context: the gate still checks the conversion at 4096, and the
    model Ollama will run (llama.cpp switches to the long factors above 4096) is reported in
    fidelity.md with its KL against the trained model; it is far off, and says so, without failing."""
    raw = phi35_config(phi35_base, tmp_path, parameters={"num_ctx": 8192}, allow_long_context=True)
    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    assert cfg.served_context == 8192
    out, report, md = convert_gated(cfg, phi35_base, tmp_path)
    assert out.exists() and report["convert"]["passed"] and report["convert"]["n_ctx"] == 4096
    long = report["convert:long-context"]
    assert long["enforced"] is False and long["n_ctx"] > 4096 and long["served_context"] == 8192
    # the long factors make another model: orders of magnitude from the conversion's own rounding
    assert long["kl"] > 100 * max(report["convert"]["kl"], 1e-9)
    row = next(line for line in md.splitlines() if line.startswith("| convert:long-context"))
    assert "reported only (ollama.allow_long_context)" in row
