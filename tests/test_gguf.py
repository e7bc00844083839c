"""What reaches llama.cpp is the fused model: same tokens, same logits.

Converts the float32 fused model of the session's training run with the
pinned llama.cpp and reads logits back through the llama_cpp bindings with
an F32 KV cache (the default F16 cache alone adds ~1e-3 of error).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from makeutil import needs_llama_cpp

pytestmark = pytest.mark.slow

CHAT = [
    {"role": "system", "content": "あなたは親切なアシスタントです。"},
    {"role": "user", "content": "黄金比について教えてください。"},
    {"role": "assistant", "content": "黄金比は約1.618です。"},
    {"role": "user", "content": "ありがとう！"},
]


@pytest.fixture(scope="module")
def llama_cpp():
    return needs_llama_cpp(bindings=True)


@pytest.fixture(scope="module")
def ggufs(fused_run, llama_cpp):
    from pipeline.gguf import convert, quantize

    out = {}
    for outtype in ("f32", "f16"):
        cfg = fused_run.model_copy(update={"gguf": fused_run.gguf.model_copy(update={"outtype": outtype})})
        out[outtype] = convert(cfg)
    out["Q4_K_M"] = quantize(cfg, "Q4_K_M")
    return out


@pytest.fixture(scope="module")
def hf(fused_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(fused_run.fused_dir))
    model = AutoModelForCausalLM.from_pretrained(str(fused_run.fused_dir), dtype=torch.float32).eval()
    return tok, model


def texts(tok):
    return [
        tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        "こんにちは、今日はいい天気ですね。散歩に行きましょう。",
        "The golden ratio is 1.6180339887...",
    ]


def gguf_logits(llama_cpp, path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, type_k=0, type_v=0,
                          n_threads=2, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def kl(p_logits, q_logits):
    p = torch.log_softmax(torch.tensor(p_logits), -1)
    q = torch.log_softmax(torch.tensor(q_logits), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_gguf_tokenizes_like_hf(llama_cpp, ggufs, hf):
    tok, _ = hf
    vocab = llama_cpp.Llama(model_path=str(ggufs["f16"]), vocab_only=True, verbose=False)
    for text in texts(tok):
        assert vocab.tokenize(text.encode(), add_bos=True, special=True) == tok(text).input_ids, text


def test_gguf_logits_follow_the_fused_model(llama_cpp, ggufs, hf):
    tok, model = hf
    for text in texts(tok):
        ids = tok(text).input_ids
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].double().numpy()
        f32 = gguf_logits(llama_cpp, ggufs["f32"], ids)
        f16 = gguf_logits(llama_cpp, ggufs["f16"], ids)
        q4 = gguf_logits(llama_cpp, ggufs["Q4_K_M"], ids)
        assert np.abs(f32 - want).max() < 1e-3
        assert kl(want, f16) < 1e-4
        assert (f16.argmax(-1) == want.argmax(-1)).mean() > 0.95
        assert kl(want, q4) < 0.2  # k-quants are lossy; issue-level gates come later



def with_imatrix(cfg, ctx: int):
    from conftest import REPO
    from pipeline.config import ImatrixSection

    imatrix = ImatrixSection(calibration=str(REPO / "data" / "calibration_ja.txt"), ctx=ctx)
    return cfg.model_copy(update={"gguf": cfg.gguf.model_copy(
        update={"outtype": "f16", "quantizations": ["Q4_K_S"], "imatrix": imatrix})})


def test_importance_matrix_steers_quantization(fused_run, ggufs, llama_cpp, hf):
    """An imatrix from the calibration text is computed for the decoder's weights (not the
    folded head) and changes the Q4_K_S file, which still passes the gate.

    Whether it lowers the error is a property of real models and real calibration text: on
    this tiny model it hardly does (KL to f16 on the calibration text 0.0508 with, 0.0512 without),
    so that is printed, not asserted."""
    from gguf import GGUFReader

    from pipeline.gguf import imatrix, quantize

    plain_cfg = fused_run.model_copy(update={"gguf": fused_run.gguf.model_copy(
        update={"outtype": "f16", "quantizations": ["Q4_K_S"]})})
    plain = quantize(plain_cfg, "Q4_K_S").read_bytes()
    cfg = with_imatrix(fused_run, ctx=64)
    matrix = imatrix(cfg)
    assert matrix == fused_run.run_dir / "imatrix.gguf"
    names = {t.name for t in GGUFReader(str(matrix)).tensors}
    assert any(n.startswith("blk.0.attn_qkv.weight") for n in names), sorted(names)[:8]
    assert not any(n.startswith("output.weight") for n in names)  # the folded head is quantized plainly
    weighted_path = quantize(cfg, "Q4_K_S")
    assert weighted_path.read_bytes() != plain

    tok, _ = hf
    ids = tok(cfg.imatrix_calibration.read_text(encoding="utf-8")[:300]).input_ids
    f16 = gguf_logits(llama_cpp, ggufs["f16"], ids)
    weighted = gguf_logits(llama_cpp, weighted_path, ids)
    weighted_path.write_bytes(plain)
    unweighted = gguf_logits(llama_cpp, weighted_path, ids)
    print(f"KL to f16 on calibration text: with imatrix {kl(f16, weighted):.4g}, without {kl(f16, unweighted):.4g}")
    assert 0 < kl(f16, weighted) < 0.25


def test_importance_matrix_needs_enough_calibration_text(fused_run, ggufs):
    from pipeline.errors import BadInputError
    from pipeline.gguf import imatrix

    cfg = with_imatrix(fused_run, ctx=1_000_000)
    with pytest.raises(BadInputError, match=r"calibration_ja\.txt: \d+ tokens, but gguf\.imatrix\.ctx = 1000000"):
        imatrix(cfg)


def test_output_tensor_type_protects_the_folded_head(fused_run, ggufs, llama_cpp):
    from gguf import GGUFReader

    from pipeline.gguf import quantize

    plain = {t.name: t.tensor_type.name for t in GGUFReader(str(ggufs["Q4_K_M"])).tensors}
    assert plain["output.weight"] != "Q8_0"
    cfg = fused_run.model_copy(update={"gguf": fused_run.gguf.model_copy(
        update={"outtype": "f16", "output_tensor_type": "q8_0", "quantizations": ["Q4_K_M"]})})
    out = quantize(cfg, "Q4_K_M")  # replaces the fixture's file: this test runs last in the module
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types["output.weight"] == "Q8_0"
