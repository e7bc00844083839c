"""The LlamaForCausalLM bases on SentencePiece Unigram vocabularies, llm-jp-3 (tokenizer.json only)
and sarashina2 (tokenizer.model), which check-config refuses (pipeline/basetokenizer.py;
tests/test_bad_input.py checks the refusals): here, what the pinned llama.cpp really does with
their tiny test bases (pipeline.tiny.REFUSED_BASES), the reason for the refusal. A test here that
starts failing means a new pin (or transformers) changed the facts: lift or reword the refusal.

And the other side: every supported family's tiny base passes the new checks with its own
Modelfile, and fails the stop check with another family's.
"""
from __future__ import annotations

import hashlib

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from makeutil import needs_llama_cpp
from pipeline import basetokenizer, llamacpp, tiny
from pipeline.llamacpp import ToolRunError
from pipeline.families import supported
from pipeline.modelfiles import family_spec

# Japanese and English, with and without a system message, several turns.
CONVERSATIONS = [
    [{"role": "user", "content": "日本の首都はどこですか？"}],
    [{"role": "system", "content": "あなたは親切なアシスタントです。丁寧語で答えてください。"},
     {"role": "user", "content": "今日はどのようなご用件でしょうか。"}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "What is the golden ratio?"},
     {"role": "assistant", "content": "About 1.618."}, {"role": "user", "content": "And its square?"}],
]


@pytest.fixture(scope="module")
def refused_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("unigram")
    return {name: tiny.build_tiny(root / name, name, hidden_size=64, intermediate_size=128)
            for name in tiny.REFUSED_BASES}


def tokenizer_files(folder):
    return [folder / n for n in basetokenizer.TOKENIZER_FILES if (folder / n).is_file()]


def test_the_refused_bases_ship_what_the_real_ones_ship(refused_bases):
    llmjp, sarashina = refused_bases["llmjp3"], refused_bases["sarashina2"]
    assert not (llmjp / "tokenizer.model").exists()
    llmjp_json = Tokenizer.from_file(str(llmjp / "tokenizer.json"))
    assert [llmjp_json.id_to_token(i) for i in range(8)] == ["<unk>", "<s>", "</s>", *tiny.LLMJP_SPECIALS]
    assert llmjp_json.id_to_token(8) == "<0x00>" and llmjp_json.id_to_token(263) == "<0xFF>"  # byte fallback
    sp = spm.SentencePieceProcessor(model_file=str(sarashina / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(6)] == ["<unk>", "<s>", "</s>", *tiny.SARASHINA_ROLES]
    for folder in (llmjp, sarashina):
        assert basetokenizer.tokenizer_problems(tokenizer_files(folder)), folder.name


def test_the_refused_bases_rebuild_byte_identical(refused_bases, tmp_path):
    for name, folder in refused_bases.items():
        again = tiny.build_tiny(tmp_path / name, name, hidden_size=64, intermediate_size=128)
        digests = [{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(f.iterdir())}
                   for f in (folder, again)]
        assert digests[0] == digests[1], name


@pytest.mark.slow
def test_llama_cpp_cannot_convert_a_unigram_tokenizer_json(refused_bases, tmp_path):
    """llm-jp-3's layout: no tokenizer.model, so LlamaHfVocab (BPE only) and then the GPT-2 path,
    which stops on the pre-tokenizer hash, after the whole run before it."""
    needs_llama_cpp()
    with pytest.raises(ToolRunError) as refused:
        llamacpp.convert_hf_to_gguf(refused_bases["llmjp3"], tmp_path / "llmjp3.gguf", "f32")
    assert "Cannot find Llama BPE tokenizer" in str(refused.value)
    assert "BPE pre-tokenizer was not recognized" in str(refused.value)
    assert not (tmp_path / "llmjp3.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_tokenizes_unigram_chat_prompts_unlike_sentencepiece(refused_bases, tmp_path):
    """sarashina2's layout converts, as a "llama" (SPM) vocabulary, and llama.cpp then tokenizes the
    chat-rendered prompts differently from the Unigram model itself: tokenizers' Unigram (which
    gives SentencePiece's own pieces on the plain text) and llama.cpp disagree on some prompts."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from pipeline import fidelity

    needs_llama_cpp(bindings=True)
    folder = refused_bases["sarashina2"]
    gguf = llamacpp.convert_hf_to_gguf(folder, tmp_path / "sarashina2.gguf", "f32")
    llm = fidelity.gguf_model(gguf, n_ctx=64, vocab_only=True)
    assert llm.metadata["tokenizer.ggml.model"] == "llama"  # SPM merging, not llama.cpp's Unigram ("t5")
    unigram = Tokenizer.from_file(str(folder / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    differ = []
    for conversation in CONVERSATIONS:
        for message in conversation:
            assert unigram.encode(message["content"], add_special_tokens=False).ids == sp.encode(message["content"])
        text = render_jinja_template([conversation], chat_template=tiny.SARASHINA22_CHAT_TEMPLATE,
                                     add_generation_prompt=True, bos_token="<s>", eos_token="</s>")[0][0]
        ours = unigram.encode(text).ids
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert ours[0] == theirs[0] == 1  # <s> once, from each side
        if ours != theirs:
            differ.append((text, [unigram.id_to_token(i) for i in theirs]))
    assert differ, "llama.cpp now tokenizes Unigram prompts as SentencePiece does: the refusal may be lifted"


@pytest.mark.slow
def test_transformers_reads_a_unigram_llamatokenizer_without_its_pieces(refused_bases):
    """transformers 5's LlamaTokenizer, which sarashina2's tokenizer_config.json names, builds a BPE
    from the Unigram tokenizer.model: with no merges it splits text into characters, not the
    model's pieces (a second reason the base is refused: training would not see its tokens)."""
    from transformers import AutoTokenizer

    folder = refused_bases["sarashina2"]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    text = "今日はどのようなご用件でしょうか。"
    hf = AutoTokenizer.from_pretrained(folder)
    assert type(hf).__name__ == "LlamaTokenizer"
    assert hf.tokenize(text) != sp.encode(text, out_type=str)
    assert all(len(piece.lstrip("\u2581")) <= 1 for piece in hf.tokenize(text))


@pytest.mark.slow
@pytest.mark.parametrize("family", [f.name for f in supported()])
def test_every_family_passes_with_its_own_chat_format_and_fails_with_anothers(family, tmp_path):
    """Each family's tiny base: its tokenizer is one llama.cpp serves, its Modelfile's end-of-turn stop
    is one of its tokens; another family's Modelfile whose end of turn it lacks is refused."""
    needs_llama_cpp()
    files = tokenizer_files(tiny.build_tiny(tmp_path / family, family, hidden_size=64, intermediate_size=128))
    modelfile = supported()[[f.name for f in supported()].index(family)].modelfile
    assert basetokenizer.tokenizer_problems(files) == []
    assert basetokenizer.stop_problems(files, family_spec(modelfile)[1], "m") == []
    other = {"phi3": "qwen2", "llama3": "gemma3", "qwen2": "llama3", "qwen3": "phi3", "gemma3": "phi3"}[family]
    assert basetokenizer.stop_problems(files, family_spec(other)[1], "m")
