"""What reaches llama.cpp is the fused model: same tokens, same logits.

Converts the float32 fused model of the session's training run with the
pinned llama.cpp and reads logits back through the llama_cpp bindings with
an F32 KV cache (the default F16 cache alone adds ~1e-3 of error).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

CHAT = [
    {"role": "system", "content": "あなたは親切なアシスタントです。"},
    {"role": "user", "content": "黄金比について教えてください。"},
    {"role": "assistant", "content": "黄金比は約1.618です。"},
    {"role": "user", "content": "ありがとう！"},
]


@pytest.fixture(scope="module")
def llama_cpp():
    from pipeline import llamacpp

    try:
        return llamacpp.load_bindings()
    except llamacpp.ToolchainError as e:
        pytest.skip(f"pinned llama.cpp or its bindings missing ({e}); `make test` builds them")


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
