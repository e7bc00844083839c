"""The tiny offline Phi-3: layout, determinism, Phi-3.5's real tokenizer and chat template, and parity
with llama.cpp's tokenizer (its own test strings, chat-rendered prompts, the general.name rule)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from makeutil import needs_llama_cpp
from pipeline import tiny, vocab
from pipeline.tiny import build_tiny_phi3

MESSAGES = [
    {"role": "system", "content": "あなたは親切なアシスタントです。"},
    {"role": "user", "content": "黄金比とは何ですか？"},
    {"role": "assistant", "content": "約1.618の比です。"},
    {"role": "user", "content": "Thank you! 😀"},
]
# Phi-3.5-mini-instruct's rendering of MESSAGES with add_generation_prompt=True.
RENDERED = (
    "<|system|>\nあなたは親切なアシスタントです。<|end|>\n"
    "<|user|>\n黄金比とは何ですか？<|end|>\n"
    "<|assistant|>\n約1.618の比です。<|end|>\n"
    "<|user|>\nThank you! 😀<|end|>\n"
    "<|assistant|>\n"
)
EXPECTED_FILES = {
    "added_tokens.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
}
# Strings whose tokenization HF and llama.cpp must agree on.
TEXTS = [
    "今日は東京へ行きます。",
    "こんにちは、田中さん。お元気ですか？",
    "カタカナとひらがなと漢字、そして龘という珍しい字。",
    "Hello world! How are you today?",
    " leading space",
    "   three leading spaces and trailing  ",
    "digits 1234567890 and the golden ratio 1.6180339887",
    "絵文字😀🎉とテスト👍🏽",
    "改行\nあり\n\n二つ",
    "tab\tseparated\tvalues",
    "Mixed 日本語 and English, 2025年11月22日.",
    "",
    " ",
    "<|user|>直後に文字<|end|>",
    "text<|end|>\n\n<|assistant|>  spaces after a special token",
    "<s>bos in text</s> and <unk>",
    RENDERED,
]
# Chat conversations rendered with the model's template for the parity tests: Japanese and English,
# a system message, several turns, and both endings (a generation prompt, or a closing assistant turn).
CONVERSATIONS = [
    MESSAGES,
    [
        {"role": "system", "content": "You are a careful assistant. Answer in one sentence."},
        {"role": "user", "content": "What is the golden ratio?"},
        {"role": "assistant", "content": "About 1.618, the ratio (1 + sqrt 5) / 2."},
        {"role": "user", "content": "And its square?"},
        {"role": "assistant", "content": "  About 2.618: one more than itself.\n"},
    ],
    [
        {"role": "system", "content": "丁寧語で、簡潔に答えてください。\n箇条書きは使わないこと。"},
        {"role": "user", "content": "富士山の高さは？"},
        {"role": "assistant", "content": "3776メートルです。"},
        {"role": "user", "content": "龘や𠮷のような珍しい字も書けますか？ 😀"},
        {"role": "assistant", "content": "はい、書けます：龘、𠮷。\n\n　全角スペースも。"},
        {"role": "user", "content": "ありがとう。"},
    ],
]


def _sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tokenizer(tiny_phi3_dir):
    return AutoTokenizer.from_pretrained(tiny_phi3_dir)


def test_folder_has_phi3_layout(tiny_phi3_dir, tokenizer):
    assert {p.name for p in tiny_phi3_dir.iterdir()} == EXPECTED_FILES
    config = json.loads((tiny_phi3_dir / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert config["dtype"] == "float32"
    assert config["rope_parameters"]["rope_type"] == "default"
    assert config["max_position_embeddings"] == 4096
    # Phi-3's real vocabulary: 32000 pieces and 11 added tokens, padded to 32064 rows (llama.cpp names
    # the rest [PADn]).
    assert config["vocab_size"] == 32064
    n_sp = tiny.SPM_VOCAB_SIZE
    assert n_sp == 32000 and len(tokenizer) == n_sp + len(tiny.PHI3_ADDED_TOKENS) == 32011
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id) == (0, 1)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert config["bos_token_id"] == 1
    assert config["eos_token_id"] == config["pad_token_id"] == tokenizer.eos_token_id == n_sp
    generation = json.loads((tiny_phi3_dir / "generation_config.json").read_text())
    end, assistant, endoftext = tokenizer.convert_tokens_to_ids(["<|end|>", "<|assistant|>", "<|endoftext|>"])
    assert generation["eos_token_id"] == [end, assistant, endoftext] == [32007, 32001, 32000]  # as Borea's


def test_model_loads_in_float32(tiny_phi3_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_phi3_dir)
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_rebuild_is_byte_identical(tiny_phi3_dir, tmp_path):
    """build_tiny's phi3 is build_tiny_phi3's (the fixture's) file for file."""
    again = tiny.build_tiny(tmp_path / "again", "phi3")
    assert _sha256s(again) == _sha256s(tiny_phi3_dir)


def test_seed_changes_weights_only(tiny_phi3_dir, tmp_path):
    other = _sha256s(build_tiny_phi3(tmp_path / "seed1", seed=1))
    base = _sha256s(tiny_phi3_dir)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in base.items() if k != "model.safetensors"
    }


def test_build_replaces_a_folder_only_on_success(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_write_model", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_phi3(out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    monkeypatch.undo()
    build_tiny_phi3(out)
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("kwargs", [{"hidden_size": 250}, {"num_heads": 0}, {"hidden_size": 12, "num_heads": 4}])
def test_bad_shape_is_rejected(tmp_path, kwargs):
    with pytest.raises(ValueError):
        build_tiny_phi3(tmp_path / "bad", **kwargs)
    assert not any(tmp_path.iterdir())


def test_chat_template_renders_like_phi35(tokenizer, tiny_phi3_dir):
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == RENDERED
    # Without a generation prompt Phi-3.5 closes with eos; an empty system message is dropped.
    closed = tokenizer.apply_chat_template(
        [{"role": "system", "content": ""}, *MESSAGES[1:3]], tokenize=False, add_generation_prompt=False
    )
    assert closed == "<|user|>\n黄金比とは何ですか？<|end|>\n<|assistant|>\n約1.618の比です。<|end|>\n<|endoftext|>"
    # Phi-3.5-mini-instruct's template exactly as the pinned llama.cpp ships it.
    assert (tiny_phi3_dir / "chat_template.jinja").read_text(encoding="utf-8") == vocab.chat_template("phi3")


def test_special_tokens_are_single_ids_in_phi3_order(tokenizer):
    first = tiny.SPM_VOCAB_SIZE
    for offset, token in enumerate(tiny.PHI3_ADDED_TOKENS):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [first + offset]
        assert tokenizer(f"前{token}後", add_special_tokens=False)["input_ids"].count(first + offset) == 1
    assert tokenizer("<s></s><unk>", add_special_tokens=False)["input_ids"] == [1, 2, 0]


@pytest.mark.parametrize("text", TEXTS)
def test_encodings_are_sane(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids[1:] or "<unk>" in text
    if "<" not in text:
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_turns_tokenize_to_whole_special_tokens(tokenizer):
    ids = tokenizer(RENDERED)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<s>", "<|system|>"]
    assert tokens.count("<|end|>") == 4 and tokens.count("<|user|>") == 2 and tokens.count("<|assistant|>") == 2
    assert tokens[-1] == "<|assistant|>"


def _top1_probability(model_dir: Path, tokenizer) -> tuple[float, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    ids = torch.tensor([tokenizer(RENDERED)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    return logits.softmax(-1).max(-1).values.mean().item(), logits


def test_logits_are_not_flat(tiny_phi3_dir, tokenizer):
    top1, logits = _top1_probability(tiny_phi3_dir, tokenizer)
    assert top1 > 50 / logits.shape[-1]
    # Different positions (contexts) give different predictions.
    assert len(set(logits.argmax(-1).tolist())) > 3


def test_tied_variant(tiny_phi3_tied_dir, tiny_phi3_dir, tokenizer):
    config = json.loads((tiny_phi3_tied_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    with safe_open(tiny_phi3_tied_dir / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = AutoModelForCausalLM.from_pretrained(tiny_phi3_tied_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    top1, logits = _top1_probability(tiny_phi3_tied_dir, tokenizer)
    assert top1 > 50 / logits.shape[-1]
    for name in EXPECTED_FILES - {"config.json", "model.safetensors"}:
        assert (tiny_phi3_tied_dir / name).read_bytes() == (tiny_phi3_dir / name).read_bytes()


@pytest.mark.parametrize("hidden_size", [128, 512])
def test_other_hidden_sizes(tmp_path, hidden_size):
    folder = build_tiny_phi3(tmp_path / "m", hidden_size=hidden_size, intermediate_size=2 * hidden_size)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.hidden_size == hidden_size
    with torch.no_grad():
        logits = model(torch.tensor([[1, 300, 301]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)
    assert logits.softmax(-1).max().item() > 50 / model.config.vocab_size


# --- the real vocabulary: llama.cpp's own test strings ---------------------------------------


def test_tokenizer_matches_llama_cpps_test_strings(tiny_phi3_dir, tokenizer):
    """The demo tokenizer (tokenizer.json through AutoTokenizer, and tokenizer.model, which the converter
    reads) gives the ids llama.cpp's own tokenizer test expects on every one of its Phi-3 strings."""
    import sentencepiece as spm

    pairs = vocab.llama_cpp_test_pairs("phi3")
    assert len(pairs) == 46  # ggml-vocab-phi-3.gguf.inp, read as tests/test-tokenizer-0.cpp reads it
    sp = spm.SentencePieceProcessor(model_file=str(tiny_phi3_dir / "tokenizer.model"))
    for text, expected in pairs:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, repr(text)
        assert sp.encode(text) == expected, repr(text)


def _rendered(tokenizer, messages: list[dict]) -> str:
    """A conversation as the template renders it: with a generation prompt after a user turn,
    closed by the template's eos after an assistant turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=messages[-1]["role"] != "assistant")


# --- parity with llama.cpp's tokenizer --------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    """The llama_cpp bindings, bound to the pinned build's shared libraries (makeutil.needs_llama_cpp)."""
    return needs_llama_cpp(bindings=True)


def _gguf_vocab(llama_cpp, model_dir: Path, out: Path):
    from pipeline import llamacpp

    gguf = llamacpp.convert_hf_to_gguf(model_dir, out, "f32")
    return llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def gguf_vocab(llama_cpp, tiny_phi3_dir, tmp_path_factory):
    """The tiny model converted as fuse's output is (a folder named "fused": the converter's default
    general.name would not say Phi-3, so pipeline.llamacpp names it "fused-phi3"), read by llama.cpp."""
    model_dir = tmp_path_factory.mktemp("named") / "fused"
    shutil.copytree(tiny_phi3_dir, model_dir)
    return _gguf_vocab(llama_cpp, model_dir, model_dir.parent / "fused.gguf")


def test_llama_cpp_reads_the_tiny_gguf_as_its_own_vocabulary(gguf_vocab):
    """The converted tiny model carries Phi-3's vocabulary: llama.cpp gives its expected ids."""
    assert gguf_vocab.metadata["general.name"] == "fused-phi3"
    assert gguf_vocab.metadata["tokenizer.ggml.add_bos_token"] == "true"
    assert gguf_vocab.n_vocab() == 32064
    for text, expected in vocab.llama_cpp_test_pairs("phi3"):
        assert gguf_vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False) == expected, repr(text)


def test_llama_cpp_tokenizes_like_hf(gguf_vocab, tokenizer):
    for text in TEXTS + [_rendered(tokenizer, c) for c in CONVERSATIONS]:
        hf_ids = tokenizer(text)["input_ids"]
        cpp_ids = gguf_vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert cpp_ids == hf_ids, f"{text!r}: llama.cpp {tokenizer.convert_ids_to_tokens(cpp_ids)}"


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_ids_are_llama_cpps(gguf_vocab, tokenizer, conversation):
    """HF's apply_chat_template ids and llama.cpp's tokenization of the same rendered prompt (as Ollama's
    llama-server tokenizes it: BOS from the GGUF, special tokens parsed) are the same ids, BOS exactly
    once. Phi-3.5's template writes no BOS and transformers 5 tokenizes a rendered chat without adding
    one, so llama.cpp's BOS is the one difference; the pipeline (training, the gate) tokenizes the
    rendered text with the tokenizer's BOS, which gives llama.cpp's ids exactly."""
    messages = CONVERSATIONS[conversation]
    text = _rendered(tokenizer, messages)
    hf_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           add_generation_prompt=messages[-1]["role"] != "assistant")["input_ids"]
    cpp_ids = gguf_vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    bos = tokenizer.bos_token_id
    assert cpp_ids[0] == bos and cpp_ids.count(bos) == 1
    assert cpp_ids[1:] == list(hf_ids), f"llama.cpp {tokenizer.convert_ids_to_tokens(cpp_ids)}"
    assert tokenizer(text)["input_ids"] == cpp_ids
    turns = sum(1 for m in messages if m["role"] != "system" or m["content"])
    assert cpp_ids.count(tokenizer.convert_tokens_to_ids("<|end|>")) == turns


def test_without_a_phi3_name_llama_cpp_keeps_the_newline_after_each_turn_marker(
        llama_cpp, tiny_phi3_dir, tokenizer, tmp_path, monkeypatch):
    """The general.name rule (pipeline.llamacpp) re-checked on the real tokenizer: llama.cpp gives Phi-3's
    special tokens their right-strip only when general.name says Phi-3. A GGUF named plainly "fused"
    keeps the newline after every <|system|>, <|user|>, <|assistant|> and <|end|> as a byte-fallback
    <0x0A> (with a dummy-prefix piece before it), so every chat prompt tokenizes differently from training."""
    from pipeline import llamacpp

    monkeypatch.setattr(llamacpp, "_gguf_model_name", lambda model_dir, model_name: "fused")
    model_dir = tmp_path / "fused"
    shutil.copytree(tiny_phi3_dir, model_dir)
    plain = _gguf_vocab(llama_cpp, model_dir, tmp_path / "fused.gguf")
    assert plain.metadata["general.name"] == "fused"
    newline = tokenizer.convert_tokens_to_ids("<0x0A>")
    for messages in CONVERSATIONS:
        text = _rendered(tokenizer, messages)
        hf_ids = tokenizer(text)["input_ids"]
        cpp_ids = plain.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert cpp_ids != hf_ids
        markers = text.count("|>\n")
        assert cpp_ids.count(newline) - hf_ids.count(newline) == markers
    # Plain text, without special tokens, is unaffected: the rule is about the chat markers.
    for text, expected in vocab.llama_cpp_test_pairs("phi3"):
        assert plain.tokenize(text.encode("utf-8"), add_bos=False, special=False) == expected
