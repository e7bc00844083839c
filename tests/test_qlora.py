"""QLoRA on CPU: gradients through the NF4 base are the true ones, even after
the bitsandbytes CPU repacking trap has been sprung."""
from __future__ import annotations

import pytest
import torch

from conftest import DEMO_DATA, small_config, write_config
from pipeline.config import load_config
from pipeline.data.sources import read_jsonl
from pipeline.data.tokenize import collate, load_examples
from pipeline.hf import guard_nf4_cpu_repack, load_causal_lm, load_tokenizer
from pipeline.train import wrap_with_lora_and_soul

pytest.importorskip("bitsandbytes")


def lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}


@pytest.fixture(scope="module")
def setup(tiny_phi3_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    cfg = load_config(write_config(root / "c.yaml", small_config(tiny_phi3_dir, root / "b")))
    tok = load_tokenizer(tiny_phi3_dir)
    batch = collate(load_examples([r for _, r in read_jsonl(DEMO_DATA)], tok, 256)[:2], tok.pad_token_id)
    return cfg, tiny_phi3_dir, batch


def nf4_and_dequantized_twin(cfg, base):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    nf4 = wrap_with_lora_and_soul(
        load_causal_lm(base, nf4=True, compute_dtype=torch.float32, device=torch.device("cpu")), cfg, alpha=0.5)
    twin = wrap_with_lora_and_soul(
        load_causal_lm(base, nf4=False, compute_dtype=torch.float32, device=torch.device("cpu")), cfg, alpha=0.5)
    nf4_modules = dict(nf4.named_modules())
    with torch.no_grad():
        for n, p in nf4.named_parameters():
            if "lora_B" in n:  # zero at init, which would make every lora_A gradient zero
                p.normal_(0, 0.05)
        for name, module in twin.named_modules():
            source = nf4_modules[name]
            if isinstance(source, bnb.nn.Linear4bit):
                w = source.weight
                module.weight.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state).float())
        for (n1, p1), (n2, p2) in zip(nf4.named_parameters(), twin.named_parameters()):
            if p1.requires_grad:
                assert n1 == n2
                p2.copy_(p1)
    return nf4, twin


def test_nf4_lora_gradients_equal_dequantized_fp32(setup):
    cfg, base, batch = setup
    nf4, twin = nf4_and_dequantized_twin(cfg, base)
    g_nf4, g_twin = lora_grads(nf4, batch), lora_grads(twin, batch)
    assert g_nf4.keys() == g_twin.keys() and len(g_nf4) == 2 * 4 * 2  # A and B, 4 modules, 2 layers
    for k in g_nf4:
        rel = (g_nf4[k] - g_twin[k]).norm() / g_twin[k].norm()
        assert rel < 1e-4, (k, float(rel))


def spring_trap(model, batch):
    """What bitsandbytes' CPU fast path does: an eval-mode, no-grad forward."""
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    model.train()


def repacked(model) -> int:
    import bitsandbytes as bnb

    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_guarded_model_survives_an_eval_forward(setup):
    cfg, base, batch = setup
    nf4, twin = nf4_and_dequantized_twin(cfg, base)  # load_causal_lm guards NF4 models
    spring_trap(nf4, batch)
    assert repacked(nf4) == 0
    g_nf4, g_twin = lora_grads(nf4, batch), lora_grads(twin, batch)
    for k in g_nf4:
        assert (g_nf4[k] - g_twin[k]).norm() / g_twin[k].norm() < 1e-4, k


def test_an_already_repacked_model_is_refused(setup):
    import bitsandbytes as bnb

    from pipeline.errors import ModelError

    cfg, base, batch = setup
    nf4, _ = nf4_and_dequantized_twin(cfg, base)
    for m in nf4.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # as bitsandbytes leaves it without the guard
    spring_trap(nf4, batch)
    if repacked(nf4) == 0:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    with pytest.raises(ModelError, match="repacked this NF4 weight"):
        guard_nf4_cpu_repack(nf4)
