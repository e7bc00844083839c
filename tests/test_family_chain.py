"""Each family's tiny model (pipeline/tiny.py: a named real model's config shape, its real
tokenizer and chat template) through the real chain, `make modelfile` of pipeline.mk: train,
fuse, convert, quantize and the Modelfile, with the fidelity gate at every step.

For each family, tied and untied where the family has both:
  - the gate passes: fused <= 1e-4 and f32 GGUF <= 1e-5 KL to the trained model, f16 and
    Q4_K_M within config bounds, and llama.cpp tokenizes the chat-rendered prompts as HF does;
  - every GGUF holds the folded head as output.weight, different from token_embd (a GGUF
    without it makes llama.cpp use token_embd as the head, and the soul would be gone);
  - the chat-rendered prompts carry BOS exactly once where the family has one, none for Qwen;
  - the Modelfile names the family's template and stops.
"""
from __future__ import annotations

import json

import pytest

from conftest import small_config, write_config
from makeutil import make, needs_llama_cpp
from pipeline import llamacpp
from pipeline.chattext import encode_rendered
from pipeline.errors import ToolchainError
from pipeline.families import BY_NAME
from pipeline.fidelity import prompt_texts
from pipeline.formats import validate_gguf
from pipeline.gguf import OUTPUT_TENSOR, require_folded_head
from pipeline.hf import load_tokenizer
from pipeline.tiny import build_tiny

pytestmark = pytest.mark.slow

# (family, tied): every variant a family has; Gemma-3 always ties its head.
VARIANTS = [("llama3", True), ("llama3", False), ("qwen2", True), ("qwen2", False), ("qwen3", True),
            ("qwen3", False), ("gemma3", True)]
# The bounds for the tiny models: fused and f32 GGUF against the trained model.
MAX_KL_FUSED, MAX_KL_F32 = 1e-4, 1e-5


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{'tied' if v[1] else 'untied'}")
def family_run(request, tmp_path_factory):
    needs_llama_cpp()
    family, tied = request.param
    root = tmp_path_factory.mktemp(f"{family}-{tied}")
    # Narrower than the families' test bases (256/1024..1536): the vocabulary rows (128k-262k) set the
    # cost of every stage, and what this checks does not need k-quant-sized rows.
    base = build_tiny(root / f"tiny-{family}", family, tie_word_embeddings=tied, hidden_size=128,
                      intermediate_size=256)
    settings = small_config(base, root / "build", train={"steps": 4, "save_every": 4},
                            soul={"warmup_steps": 1, "anneal_steps": 2},
                            fidelity={"max_kl_fused": MAX_KL_FUSED, "max_kl_converted_f32": MAX_KL_F32})
    path = write_config(root / "config.yaml", settings)
    proc = make(path, "modelfile")
    return family, tied, base, root / "build" / "t", proc


def test_the_gate_passes_at_every_step(family_run):
    family, tied, _, run, proc = family_run
    report = json.loads((run / "reports" / "fidelity.json").read_text())
    assert set(report) == {"fuse", "convert:f32", "convert", "quantize:Q4_K_M"}, report
    assert all(e["passed"] for e in report.values()), report
    assert report["fuse"]["kl"] <= MAX_KL_FUSED and report["convert:f32"]["kl"] <= MAX_KL_F32
    assert report["convert"]["tokenization_mismatches"] == []
    fusion = json.loads((run / "fused" / "fusion.json").read_text())
    assert fusion["tied_input"] is tied
    fused_config = json.loads((run / "fused" / "config.json").read_text())
    assert fused_config["architectures"] == [BY_NAME[family].architectures[0]]
    assert fused_config["tie_word_embeddings"] is False


def first_bytes(path, names: tuple[str, ...], n: int = 1 << 16) -> dict[str, bytes]:
    """The first n bytes of the named tensors' data, as stored (the header read by validate_gguf)."""
    offsets = validate_gguf(path).tensor_offsets
    with open(path, "rb") as f:
        return {name: (f.seek(offsets[name]), f.read(n))[1] for name in names if name in offsets}


def test_every_gguf_holds_the_folded_head(family_run):
    _, _, _, run, _ = family_run
    ggufs = sorted((run / "gguf").glob("*.gguf"))
    assert {p.name for p in ggufs} == {"t-f16.gguf", "t-q4_k_m.gguf"}
    for path in ggufs:
        found = first_bytes(path, (OUTPUT_TENSOR, "token_embd.weight"))
        assert OUTPUT_TENSOR in found, f"{path.name}: llama.cpp would use token_embd as the head"
        assert found[OUTPUT_TENSOR] != found["token_embd.weight"], f"{path.name}: the head is the embeddings"


def test_chat_prompts_carry_bos_exactly_once(family_run):
    family, _, base, _, _ = family_run
    tokenizer = load_tokenizer(base)
    bos = tokenizer.bos_token_id if family != "qwen2" and family != "qwen3" else None
    for text in prompt_texts(tokenizer):
        ids = encode_rendered(tokenizer, text).input_ids
        if bos is None:
            assert tokenizer.bos_token is None or tokenizer.bos_token_id not in ids
        else:
            assert ids[0] == bos and ids.count(bos) == 1, (family, ids[:4])


def test_the_modelfile_is_the_familys(family_run):
    family, _, _, run, _ = family_run
    text = (run / "Modelfile").read_text()
    assert f"modelfiles/{BY_NAME[family].modelfile}.Modelfile" in text
    end_of_turn = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "gemma3": "<end_of_turn>"}
    assert f'PARAMETER stop "{end_of_turn[family]}"' in text


def test_a_gguf_without_the_head_is_refused(tmp_path):
    """A tied base converted as it is has no output.weight: llama.cpp would run the embeddings as the
    head. The check every convert and quantize runs refuses it, naming the file."""
    needs_llama_cpp()
    base = build_tiny(tmp_path / "tiny", "qwen3", tie_word_embeddings=True)
    gguf = llamacpp.convert_hf_to_gguf(base, tmp_path / "tied.gguf", "f16")
    with pytest.raises(ToolchainError, match="tied.gguf: no output.weight"):
        require_folded_head(gguf)
