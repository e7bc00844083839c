"""Each family's tiny model (pipeline/tiny.py: a named real model's config shape, its real
tokenizer and chat template) through the real chain, `make modelfile` of pipeline.mk: train,
fuse, convert, quantize and the Modelfile, with the fidelity gate at every step.

For each family's tied variant (the case that differs: the fused model must bring a head the base
never had, and each family's converter must write it), and one untied variant (Llama-3; the default
Phi-3 chain of test_chain is untied too):
  - the gate passes: fused <= 1e-4 and f32 GGUF <= 1e-5 KL to the trained model, f16 and
    Q4_K_M within config bounds, and llama.cpp tokenizes the chat-rendered prompts as HF does;
  - every GGUF holds the folded head as output.weight, different from token_embd (a GGUF
    without it makes llama.cpp use token_embd as the head, and the soul would be gone);
  - the chat-rendered prompts carry BOS exactly once where the family has one, none for Qwen;
  - the Modelfile names the family's template and stops.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import small_config, write_config
from makeutil import make, needs_llama_cpp, run_make
from ollama_contract import running
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

# (family, tied): Gemma-3 always ties its head. Untied, every family's head is already the
# base's output.weight, the converter's plain path (test_family_vocab converts each untied base).
VARIANTS = [("llama3", True), ("llama3", False), ("qwen2", True), ("qwen3", True), ("gemma3", True)]
# The bounds for the tiny models: fused and f32 GGUF against the trained model.
MAX_KL_FUSED, MAX_KL_F32 = 1e-4, 1e-5


@dataclass
class Chain:
    family: str
    tied: bool
    base: Path
    run: Path
    config: Path


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """chains(family, tied): that variant's tiny model through `make modelfile`, built once."""
    needs_llama_cpp()
    built: dict[tuple[str, bool], Chain] = {}

    def get(family: str, tied: bool) -> Chain:
        if (family, tied) not in built:
            root = tmp_path_factory.mktemp(f"{family}-{tied}")
            # Narrower than the families' test bases (256/1024..1536): the vocabulary rows (128k-262k)
            # set the cost of every stage, and what this checks does not need k-quant-sized rows.
            base = build_tiny(root / f"tiny-{family}", family, tie_word_embeddings=tied, hidden_size=128,
                              intermediate_size=256)
            settings = small_config(base, root / "build", train={"steps": 4, "save_every": 4},
                                    soul={"warmup_steps": 1, "anneal_steps": 2},
                                    fidelity={"max_kl_fused": MAX_KL_FUSED, "max_kl_converted_f32": MAX_KL_F32})
            path = write_config(root / "config.yaml", settings)
            make(path, "modelfile")
            built[family, tied] = Chain(family, tied, base, root / "build" / "t", path)
        return built[family, tied]

    return get


def variant_id(variant) -> str:
    return f"{variant[0]}-{'tied' if variant[1] else 'untied'}"


each_variant = pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)


@each_variant
def test_the_gate_passes_at_every_step(chains, variant):
    family, tied = variant
    run = chains(*variant).run
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


@each_variant
def test_every_gguf_holds_the_folded_head(chains, variant):
    run = chains(*variant).run
    ggufs = sorted((run / "gguf").glob("*.gguf"))
    assert {p.name for p in ggufs} == {"t-f16.gguf", "t-q4_k_m.gguf"}
    for path in ggufs:
        found = first_bytes(path, (OUTPUT_TENSOR, "token_embd.weight"))
        assert OUTPUT_TENSOR in found, f"{path.name}: llama.cpp would use token_embd as the head"
        assert found[OUTPUT_TENSOR] != found["token_embd.weight"], f"{path.name}: the head is the embeddings"


@each_variant
def test_chat_prompts_carry_bos_exactly_once(chains, variant):
    family, base = variant[0], chains(*variant).base
    tokenizer = load_tokenizer(base)
    bos = tokenizer.bos_token_id if family != "qwen2" and family != "qwen3" else None
    for text in prompt_texts(tokenizer):
        ids = encode_rendered(tokenizer, text).input_ids
        if bos is None:
            assert tokenizer.bos_token is None or tokenizer.bos_token_id not in ids
        else:
            assert ids[0] == bos and ids.count(bos) == 1, (family, ids[:4])


@each_variant
def test_the_modelfile_is_the_familys(chains, variant):
    family, run = variant[0], chains(*variant).run
    text = (run / "Modelfile").read_text()
    assert f"modelfiles/{BY_NAME[family].modelfile}.Modelfile" in text
    end_of_turn = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "gemma3": "<end_of_turn>"}
    assert f'PARAMETER stop "{end_of_turn[family]}"' in text


# Which template Ollama renders each family's test model with (its chat template is Llama-3.2's,
# Qwen2.5's, Qwen3's, Gemma-3's): the GGUF's own where that offers tools or thinking.
RENDERED_WITH = {"llama3": "own chat template, natively", "qwen2": "own chat template, natively",
                 "qwen3": "own chat template, natively", "gemma3": "TEMPLATE from modelfiles/gemma3.Modelfile"}


@pytest.mark.parametrize("family", sorted(RENDERED_WITH))
def test_registration_proves_the_prompt_the_stops_and_an_answer(chains, family, tmp_path, monkeypatch):
    """`make ollama` against the contract server, which answers with the pinned llama-server on the
    family's GGUF: Ollama renders the prompt training saw (with the template Ollama's own rule
    picks), stores every stop, and the model answers (the smoke proof of demo.yaml). Once per family:
    tied or not changes none of it."""
    chain = chains(family, True)
    with running(tmp_path, str(llamacpp.tool("llama-quantize")), str(llamacpp.tool("llama-server"))) as host:
        monkeypatch.setenv("OLLAMA_HOST", host)
        proc = run_make(chain.config, "ollama")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Ollama renders the prompt training saw" in proc.stdout and RENDERED_WITH[family] in proc.stdout
    stamp = json.loads((chain.run / "ollama.json").read_text())
    assert stamp["proof"]["mode"] == "smoke"


def test_a_gguf_without_the_head_is_refused(tmp_path):
    """A tied base converted as it is has no output.weight: llama.cpp would run the embeddings as the
    head. The check every convert and quantize runs refuses it, naming the file."""
    needs_llama_cpp()
    base = build_tiny(tmp_path / "tiny", "qwen3", tie_word_embeddings=True)
    gguf = llamacpp.convert_hf_to_gguf(base, tmp_path / "tied.gguf", "f16")
    with pytest.raises(ToolchainError, match="tied.gguf: no output.weight"):
        require_folded_head(gguf)
