"""The bounded gate: models evaluated layer by layer from their files give the figures the
whole-model path gives, for an untied, a tied and a Phi-3.5-shaped (LongRoPE, sharded
bf16, auto_map, padded vocabulary) base; so the gate's memory can shrink without its
verdicts moving."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import small_config, write_config
from pipeline.config import load_config
from pipeline.fidelity import (FUSED_LOGITS, compare, fused_logits, hf_logits, load_logits, prompt_ids,
                               score_merge)
from pipeline.fuse import fuse
from pipeline.hf import load_tokenizer, load_trained
from pipeline.layered import Variant, layered_logits, write_layer_slice
from pipeline.phi35 import build_phi35_shaped
from pipeline.train import train


def whole_model_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return hf_logits(model, ids)


@pytest.fixture(scope="session")
def phi35_dir(tmp_path_factory):
    """Phi-3.5-mini's config and layout at a tiny width: 2 layers, hidden 384 (4 heads of 96)."""
    return build_phi35_shaped(tmp_path_factory.mktemp("phi35") / "phi35", num_hidden_layers=3)


@pytest.fixture(scope="session", params=["untied", "tied", "phi35"])
def base(request, tiny_phi3_dir, tiny_phi3_tied_dir, phi35_dir):
    return {"untied": tiny_phi3_dir, "tied": tiny_phi3_tied_dir, "phi35": phi35_dir}[request.param]


def test_phi35_shaped_base_has_the_hub_layout(phi35_dir):
    config = json.loads((phi35_dir / "config.json").read_text())
    assert config["rope_scaling"]["type"] == "longrope" and len(config["rope_scaling"]["long_factor"]) == 48
    assert config["original_max_position_embeddings"] == 4096 and config["max_position_embeddings"] == 131072
    assert config["auto_map"] and config["vocab_size"] == 32064 and config["torch_dtype"] == "bfloat16"
    index = json.loads((phi35_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    again = build_phi35_shaped(phi35_dir.parent / "again", num_hidden_layers=3)
    for shard in set(index["weight_map"].values()):
        assert (again / shard).read_bytes() == (phi35_dir / shard).read_bytes()


def test_layered_logits_equal_the_whole_model(base):
    ids = prompt_ids(load_tokenizer(base))
    layered = layered_logits(base, ids, {"m": Variant()})["m"]
    whole = whole_model_logits(base, ids)
    assert all(np.array_equal(a, b) for a, b in zip(layered, whole))
    assert compare(whole, layered).kl == 0.0


@pytest.fixture(scope="session")
def trained_on(tmp_path_factory):
    """One short training per base (and quantization), shared by the tests that need it."""
    runs = {}

    def run(base_dir, quantization="none"):
        key = (str(base_dir), quantization)
        if key not in runs:
            root = tmp_path_factory.mktemp("lay")
            overrides = {"train": {"quantization": quantization, "compute_dtype": "float32", "steps": 4,
                                   "save_every": 4}, "soul": {"warmup_steps": 1, "anneal_steps": 2},
                         # bf16 rounding gives the gate a figure well above float noise
                         "fuse": {"dtype": "bfloat16"}}
            cfg = load_config(write_config(root / "c.yaml", small_config(base_dir, root / "b", **overrides)))
            train(cfg)
            runs[key] = cfg
        return runs[key]

    return run


def test_bounded_fuse_gate_gives_the_whole_model_figures(base, trained_on):
    """KL(trained || fused) from the layer-by-layer gate vs from loading both models whole."""
    cfg = trained_on(base)
    fuse(cfg)
    ids = prompt_ids(load_tokenizer(base))
    trained, _ = load_trained(cfg.final_checkpoint, device=torch.device("cpu"))
    whole = compare(hf_logits(trained, ids), whole_model_logits(cfg.fused_dir, ids))
    reference, _ = score_merge(cfg, base, cfg.final_checkpoint, {})
    bounded = compare(reference.logits, fused_logits(cfg.fused_dir, ids))
    assert whole.max_abs > 1e-3  # bf16 rounding: figures that can move
    assert bounded.kl == pytest.approx(whole.kl, rel=1e-6, abs=1e-15)
    assert bounded.max_abs == pytest.approx(whole.max_abs, rel=1e-6) and bounded.top1 == whole.top1
    report = json.loads((cfg.run_dir / "reports" / "fidelity.json").read_text())
    assert report["fuse"]["kl"] == pytest.approx(whole.kl, rel=1e-6, abs=1e-15)
    kept = load_logits(cfg.fused_dir / FUSED_LOGITS, ids)
    assert all(np.array_equal(a, b) for a, b in zip(kept, whole_model_logits(cfg.fused_dir, ids)))


def test_nf4_trained_reference_matches_the_nf4_model(tiny_phi3_dir, trained_on):
    """On CPU the trained NF4 model is the dequantized weights + LoRA + soul; the layered
    reference computes exactly that, and the whole bitsandbytes model agrees with it."""
    cfg = trained_on(tiny_phi3_dir, "nf4")
    ids = prompt_ids(load_tokenizer(tiny_phi3_dir))
    trained, _ = load_trained(cfg.final_checkpoint, device=torch.device("cpu"))
    whole = hf_logits(trained, ids)
    reference, scores = score_merge(cfg, tiny_phi3_dir, cfg.final_checkpoint, {})
    assert compare(whole, reference.logits).kl < 1e-9
    assert max(float(np.abs(a - b).max()) for a, b in zip(whole, reference.logits)) < 1e-4


def test_a_slice_is_a_model_of_its_first_layers(phi35_dir, tmp_path):
    sliced = write_layer_slice(phi35_dir, tmp_path / "slice", 1)
    config = json.loads((sliced / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["rope_scaling"]["type"] == "longrope"
    ids = prompt_ids(load_tokenizer(sliced))
    assert compare(whole_model_logits(sliced, ids), whole_model_logits(phi35_dir, ids)).kl > 0
    layered = layered_logits(sliced, ids, {"m": Variant()})["m"]
    assert all(np.array_equal(a, b) for a, b in zip(layered, whole_model_logits(sliced, ids)))
