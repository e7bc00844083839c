"""Fusion: the fused model computes what the trained model (LoRA + soul) computes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import rerecord, small_config, write_config
from pipeline.config import load_config
from pipeline.errors import FuseError
from pipeline.soul import SO8Soul, SoulHead, fold_soul_into_head, load_soul

PROMPTS = ["こんにちは、今日はいい天気ですね。", "<|user|>\n富士山について教えて<|end|>\n<|assistant|>\n", "Hello 123"]


def load_lm(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def trained_model(base_dir, ckpt):
    """Base + adapter (PeftModel.from_pretrained) + soul, as trained."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_lm(base_dir), str(ckpt)).eval()
    soul = SO8Soul.from_state(load_soul(ckpt / "soul.safetensors"))
    inner = model.base_model.model
    inner.lm_head = SoulHead(inner.lm_head, soul)
    return model


def logits(model, tokenizer, text):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.fixture(scope="module")
def tokenizer(tiny_phi3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_phi3_dir))


def test_checkpoints_have_the_specified_layout(trained_run):
    ckpts = trained_run.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["final", "step_000003", "step_000006"]
    for d in ckpts.iterdir():
        assert {"adapter_config.json", "adapter_model.safetensors", "soul.safetensors", "checkpoint.json"} <= {
            p.name for p in d.iterdir()}
    state = load_soul(ckpts / "final" / "soul.safetensors")
    assert state.alpha == pytest.approx(trained_run.soul.alpha_target)
    assert state.rotation.shape == (32, 8, 8)
    assert not torch.allclose(state.rotation, torch.eye(8).expand(32, 8, 8))  # the soul trained
    rows = [json.loads(x) for x in (trained_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["phase"] for r in rows] == ["chaos"] + ["transition"] * 4 + ["order"]
    assert all(r["ortho_error"] < 1e-5 for r in rows)


def test_fused_logits_equal_trained_and_differ_from_base(fused_run, tiny_phi3_dir, tokenizer):
    trained = trained_model(tiny_phi3_dir, fused_run.final_checkpoint)
    fused, base = load_lm(fused_run.fused_dir), load_lm(tiny_phi3_dir)
    for text in PROMPTS:
        t, f, b = (logits(m, tokenizer, text) for m in (trained, fused, base))
        assert (t - f).abs().max() < 1e-4
        assert (t - b).abs().max() > 1e-2


def test_fused_equals_peft_merge_then_fold(fused_run, tiny_phi3_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    merged = PeftModel.from_pretrained(load_lm(tiny_phi3_dir), str(fused_run.final_checkpoint)).merge_and_unload()
    state = load_soul(fused_run.final_checkpoint / "soul.safetensors")
    expected = {k: v for k, v in merged.state_dict().items()}
    expected["lm_head.weight"] = fold_soul_into_head(expected["lm_head.weight"], state.rotation, state.alpha)
    got = load_file(str(fused_run.fused_dir / "model.safetensors"))
    assert set(got) == set(expected)
    for k in got:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k


def test_fused_folder_is_a_standard_phi3(fused_run):
    fused = fused_run.fused_dir
    hf = json.loads((fused / "config.json").read_text())
    assert hf["architectures"] == ["Phi3ForCausalLM"] and hf["tie_word_embeddings"] is False
    assert "auto_map" not in hf
    # Every tokenizer file of the base (Phi-3.5's real set) is carried over unchanged.
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.jinja", "generation_config.json"):
        assert (fused / name).read_bytes() == (Path(fused_run.model.base) / name).read_bytes(), name
    assert (fused / "fusion.json").is_file()
    prov = json.loads((fused / "fusion.json").read_text())
    assert prov["step"] == 6 and prov["gate"] == pytest.approx(0.8345, abs=1e-4)
    assert set(prov["outputs"]) == {"model.safetensors"}


def test_fuse_in_16_bit(trained_run, tmp_path):
    from safetensors import safe_open

    from pipeline.fuse import fuse

    cfg = trained_run.model_copy(update={"fuse": trained_run.fuse.model_copy(update={"dtype": "bfloat16"})})
    out = fuse(cfg, out_dir=tmp_path / "bf16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_base_is_untied_with_embeddings_unchanged(tiny_phi3_tied_dir, tmp_path, tokenizer):
    from safetensors.torch import load_file

    from pipeline.fuse import fuse
    from pipeline.train import train

    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(tiny_phi3_tied_dir, tmp_path / "b")))
    train(cfg)
    out = fuse(cfg)
    base_w = load_file(str(tiny_phi3_tied_dir / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in base_w
    assert torch.equal(got["model.embed_tokens.weight"], base_w["model.embed_tokens.weight"])
    assert not torch.allclose(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    trained = trained_model(tiny_phi3_tied_dir, cfg.final_checkpoint)
    fused = load_lm(out)
    for text in PROMPTS:
        assert (logits(trained, tokenizer, text) - logits(fused, tokenizer, text)).abs().max() < 1e-4


def test_soul_of_the_wrong_size_is_refused(fused_run, tmp_path):
    import shutil

    from pipeline.fuse import fuse
    from pipeline.soul import save_soul

    ckpt = tmp_path / "ckpt"
    shutil.copytree(fused_run.final_checkpoint, ckpt)
    save_soul(ckpt / "soul.safetensors", SO8Soul(128), step=1)
    rerecord(ckpt, "soul.safetensors")
    with pytest.raises(FuseError, match="hidden_size is 256"):
        fuse(fused_run, checkpoint=ckpt, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint_is_not_fused(fused_run, tmp_path):
    import shutil

    from pipeline.fuse import fuse

    ckpt = tmp_path / "half"
    shutil.copytree(fused_run.final_checkpoint, ckpt)
    (ckpt / "checkpoint.json").unlink()
    with pytest.raises(FuseError, match="not a complete checkpoint"):
        fuse(fused_run, checkpoint=ckpt, out_dir=tmp_path / "out")


@pytest.fixture(scope="module")
def nf4_run(tiny_phi3_dir, tmp_path_factory):
    """QLoRA on CPU: an NF4 base (float32 compute), trained a few steps."""
    from pipeline.train import train

    root = tmp_path_factory.mktemp("nf4")
    cfg = load_config(write_config(root / "c.yaml", small_config(
        tiny_phi3_dir, root / "b", train={"quantization": "nf4", "compute_dtype": "float32"})))
    train(cfg)
    return cfg


def with_merge_base(cfg, merge_base):
    return cfg.model_copy(update={"fuse": cfg.fuse.model_copy(update={"merge_base": merge_base})})


def test_merge_into_dequantized_weights_reproduces_the_nf4_trained_model(nf4_run, tmp_path, tokenizer):
    from pipeline.hf import load_trained
    from pipeline.fuse import fuse

    trained, _ = load_trained(nf4_run.final_checkpoint, device=torch.device("cpu"))
    deq = load_lm(fuse(with_merge_base(nf4_run, "dequantized"), out_dir=tmp_path / "deq"))
    orig = load_lm(fuse(with_merge_base(nf4_run, "original"), out_dir=tmp_path / "orig"))
    for text in PROMPTS:
        t = logits(trained, tokenizer, text)
        assert (t - logits(deq, tokenizer, text)).abs().max() < 1e-4
        assert (t - logits(orig, tokenizer, text)).abs().max() > 1e-3  # NF4 error: the original differs


def test_auto_merge_base_keeps_the_closer_one_and_says_why(nf4_run, tmp_path):
    from pipeline.fuse import fuse

    out = fuse(with_merge_base(nf4_run, "auto"), out_dir=tmp_path / "auto")
    prov = json.loads((out / "fusion.json").read_text())
    assert prov["merge_base"] == "dequantized" and prov["merge_base_setting"] == "auto"
    assert prov["merge_base_kl"]["dequantized"] < prov["merge_base_kl"]["original"]
    assert "closer to the trained model" in prov["merge_base_reason"]
    assert not list(out.glob(".candidate-*"))
    assert json.loads((nf4_run.final_checkpoint / "checkpoint.json").read_text())["nf4"]["blocksize"] == 64


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_equals_trained_at_another_hidden_size(tmp_path, tied):
    from pipeline.fuse import fuse
    from pipeline.tiny import build_tiny_phi3
    from pipeline.train import train
    from transformers import AutoTokenizer

    base = build_tiny_phi3(tmp_path / "base", hidden_size=128, intermediate_size=256, num_heads=2,
                           tie_word_embeddings=tied)
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(base, tmp_path / "b")))
    train(cfg)
    trained, fused = trained_model(base, cfg.final_checkpoint), load_lm(fuse(cfg))
    tok = AutoTokenizer.from_pretrained(str(base))
    for text in PROMPTS:
        t, f = logits(trained, tok, text), logits(fused, tok, text)
        assert (t - f).abs().max() < 1e-4
