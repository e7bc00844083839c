"""The tiny test bases of the non-Phi families (pipeline/tiny.py) on their real vocabularies: each
loads offline with its real model's architecture and config shape, llama.cpp's converter accepts
it, llama.cpp tokenizes chat-rendered prompts (Japanese, several turns, with and without a system
message) to the ids transformers gives, BOS exactly once, the tokenizer gives llama.cpp's own
expected ids on its test strings, the GGUF's head is where the family puts it, and two builds are
byte-identical.

Each variant is built and converted once (module-scoped fixtures, grouped by variant)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from makeutil import needs_llama_cpp
from pipeline import tiny, vocab
from pipeline.chattext import encode_rendered, without_bos
from pipeline.formats import validate_gguf

pytestmark = pytest.mark.slow

# (family, tied): every variant of every non-Phi family; Gemma-3 always ties its head.
VARIANTS = [("llama3", True), ("llama3", False), ("qwen2", True), ("qwen2", False), ("qwen3", True),
            ("qwen3", False), ("gemma3", True)]

# Conversations for the parity tests: Japanese and English, a system message or none, several turns,
# and both endings (a generation prompt after a user turn, or a closing assistant turn). Roles
# alternate, as Gemma-3's template requires.
CONVERSATIONS = [
    [{"role": "user", "content": "日本の首都はどこですか？"}],
    [{"role": "system", "content": "あなたは親切なアシスタントです。丁寧語で答えてください。"},
     {"role": "user", "content": "日本の首都はどこですか？"}],
    [{"role": "system", "content": "You are a careful assistant. Answer in one sentence."},
     {"role": "user", "content": "What is the golden ratio?"},
     {"role": "assistant", "content": "About 1.618, the ratio (1 + sqrt 5) / 2."},
     {"role": "user", "content": "And its square?"}],
    [{"role": "user", "content": "富士山の高さは？"},
     {"role": "assistant", "content": "3776メートルです。"},
     {"role": "user", "content": "龘や𠮷のような珍しい字も書けますか？ 😀\n\n　全角スペースも。"},
     {"role": "assistant", "content": "  はい、書けます：龘、𠮷。\n"}],
]

# The real models' config.json values each tiny base keeps (pipeline/tiny.py cites them).
REAL_CONFIG = {
    "llama3": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
               "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
               "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "head_dim": 64,
               "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "attention_bias": False},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "use_sliding_window": False,
              "bos_token_id": 151643, "eos_token_id": 151645},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "head_dim": 128,
              "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "attention_bias": False,
              "bos_token_id": 151643, "eos_token_id": 151645},
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262208,
               "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
               "layer_types": ["sliding_attention", "sliding_attention"],
               "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
               "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
               "final_logit_softcapping": None, "tie_word_embeddings": True,
               "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0},
}
# (bos, eos, pad) of each tokenizer, and the generation config's eos list.
SPECIAL = {
    "llama3": (("<|begin_of_text|>", 128000), ("<|eot_id|>", 128009), None, [128001, 128008, 128009]),
    "qwen2": (None, ("<|im_end|>", 151645), ("<|endoftext|>", 151643), [151645, 151643]),
    "qwen3": (None, ("<|im_end|>", 151645), ("<|endoftext|>", 151643), [151645, 151643]),
    "gemma3": (("<bos>", 2), ("<eos>", 1), ("<pad>", 0), [1, 106]),
}
# Chat tokens that must each be one id, and the ids of the real tokenizers.
CHAT_TOKENS = {
    "llama3": {"<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
               "<|python_tag|>": 128010, "<|finetune_right_pad_id|>": 128004, "<|reserved_special_token_247|>": 128255},
    "qwen2": {"<|im_start|>": 151644, "<tool_call>": 151657, "<|file_sep|>": 151664},
    "qwen3": {"<|im_start|>": 151644, "<|file_sep|>": 151664, "<tool_response>": 151665, "<think>": 151667,
              "</think>": 151668},
    "gemma3": {"<start_of_turn>": 105, "<end_of_turn>": 106, "<start_of_image>": 255999, "<unused0>": 6,
               "<unused98>": 104, "<unused99>": 256001, "<unused6241>": 262143},
}


def _sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _variant_id(variant: tuple[str, bool]) -> str:
    return f"{variant[0]}-{'tied' if variant[1] else 'untied'}"


def encode_chat(tokenizer, text: str) -> list[int]:
    """A rendered chat tokenized as the pipeline tokenizes it (pipeline.chattext)."""
    return encode_rendered(tokenizer, text)["input_ids"]


def _rendered(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=messages[-1]["role"] != "assistant")


def _gguf_tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's dimensions, from the GGUF's header (ggml order: the row length first)."""
    return validate_gguf(path).tensor_shapes


@pytest.fixture(scope="module", params=VARIANTS, ids=_variant_id)
def built(request, tmp_path_factory):
    """(family, tied, folder): the variant's tiny base, built once. Read-only. Removed with its GGUF
    once the variant's tests are done (a real vocabulary makes each some 100 MB)."""
    needs_llama_cpp()
    family, tied = request.param
    root = tmp_path_factory.mktemp(_variant_id(request.param))
    yield family, tied, tiny.build_tiny(root / f"tiny-{family}", family, tie_word_embeddings=tied)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tokenizer(built):
    return AutoTokenizer.from_pretrained(built[2])


@pytest.fixture(scope="module")
def converted(built):
    """(the f32 GGUF, llama.cpp's reading of its vocabulary)."""
    from pipeline import fidelity, llamacpp

    needs_llama_cpp(bindings=True)
    family, _, folder = built
    gguf = llamacpp.convert_hf_to_gguf(folder, folder.parent / f"{family}-f32.gguf", "f32")
    return gguf, fidelity.gguf_model(gguf, n_ctx=64, vocab_only=True)


def test_loads_offline_with_the_real_models_architecture_and_shape(built, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family, tied, folder = built
    config = json.loads((folder / "config.json").read_text())
    for key, value in REAL_CONFIG[family].items():
        assert config[key] == value, key
    assert config["tie_word_embeddings"] is tied and config["dtype"] == "float32"
    assert config["hidden_size"] % 8 == 0  # the soul's 8x8 blocks

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == config["architectures"][0]
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert (head.data_ptr() == embed.data_ptr()) is tied
    assert embed.shape == head.shape == (config["vocab_size"], config["hidden_size"])
    # The rows past the tokenizer's ids: Llama-3 none, Qwen 271 or 267, Gemma-3 64.
    n_ids = vocab.REAL_VOCABULARIES[family].n_ids
    assert len(tokenizer) == n_ids <= config["vocab_size"]
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases
    if family == "qwen3":
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (128,)  # per-head q/k RMSNorm

    bos, eos, pad, generation_eos = SPECIAL[family]
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == (bos or (None, None))
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == eos
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == (pad or (None, None))
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == generation_eos
    for token, token_id in CHAT_TOKENS[family].items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert tokenizer(f"前{token}後", add_special_tokens=False)["input_ids"].count(token_id) == 1, token

    # Logits of std ~LOGIT_STD (not flat) at init, tied or not.
    ids = encode_chat(tokenizer, _rendered(tokenizer, CONVERSATIONS[2]))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    assert 0.5 * tiny.LOGIT_STD < logits.std(-1).median().item() < 2 * tiny.LOGIT_STD
    assert len(set(logits.argmax(-1).tolist())) > 3


def test_chat_template_is_the_real_one(built, tokenizer):
    family, _, folder = built
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == vocab.chat_template(family)
    text = _rendered(tokenizer, CONVERSATIONS[1])
    expected_start = {"llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
                      "qwen2": "<|im_start|>system\nあなたは親切なアシスタントです。",
                      "qwen3": "<|im_start|>system\nあなたは親切なアシスタントです。",
                      "gemma3": "<bos><start_of_turn>user\nあなたは親切なアシスタントです。"}[family]
    expected_end = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                    "qwen2": "<|im_start|>assistant\n", "qwen3": "<|im_start|>assistant\n",
                    "gemma3": "<start_of_turn>model\n"}[family]
    assert text.startswith(expected_start) and text.endswith(expected_end), text
    assert "日本の首都はどこですか？" in text


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_llama_cpp_tokenizes_chat_prompts_like_hf(built, tokenizer, converted, conversation):
    """The rendered prompt, tokenized as the pipeline does (encode_chat) and as llama.cpp does for
    Ollama (BOS as the GGUF's add_bos says, special tokens parsed): the same ids, BOS exactly once
    where the family has one and never where it has none (Qwen)."""
    _, llm = converted
    text = _rendered(tokenizer, CONVERSATIONS[conversation])
    hf_ids = encode_chat(tokenizer, text)
    cpp_ids = llm.tokenize(without_bos(tokenizer, text).encode("utf-8"), add_bos=True, special=True)
    assert cpp_ids == hf_ids, f"llama.cpp {tokenizer.convert_ids_to_tokens(cpp_ids)}"
    bos_id = {"<|begin_of_text|>": 128000, "<bos>": 2}.get(tokenizer.bos_token)
    if bos_id is None:
        assert llm.metadata.get("tokenizer.ggml.add_bos_token") == "false"
        assert 151643 not in hf_ids  # <|endoftext|>, which the Qwen GGUF names its BOS, is never added
    else:
        assert hf_ids[0] == bos_id and hf_ids.count(bos_id) == 1
    # Without the rule, a template that writes its BOS gets a second one from the tokenizer.
    if bos_id is not None:
        assert tokenizer(text)["input_ids"][:2] == [bos_id, bos_id]


def test_tokenizer_gives_llama_cpps_ids_on_its_test_strings(built, tokenizer):
    """llama.cpp's own test strings for the vocabulary (models/ggml-vocab-*.gguf.inp) and the ids it
    expects (.out): transformers gives them all through the tokenizer built here. For Gemma-3 the
    strings are Gemma-4's, whose pieces are Gemma-3's, and tokenizer.model (what llama.cpp's converter
    reads) gives them too: its scores, taken from the GGUF's merge order, make SentencePiece's
    merging the same as the BPE merges."""
    family, _, folder = built
    pairs = vocab.llama_cpp_test_pairs(family)
    assert len(pairs) == 46
    for text, expected in pairs:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, repr(text)
    if family == "gemma3":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        for text, expected in pairs:
            assert sp.encode(text) == expected, repr(text)


def test_the_gguf_reads_its_vocabulary_as_llama_cpp_expects(built, converted):
    """llama.cpp, reading the converted tiny model, gives its own expected ids on its test strings."""
    family, _, _ = built
    _, llm = converted
    for text, expected in vocab.llama_cpp_test_pairs(family):
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == expected, repr(text)


def test_the_gguf_has_the_head_where_the_family_puts_it(built, converted):
    """A tied model's GGUF has no output.weight (llama.cpp uses token_embd); an untied one has it.
    Every row reaches the GGUF, and the GGUF's vocabulary has one token per row. For Gemma-3 that
    includes the 64 rows past the tokenizer's 262144 ids: the pinned converter reads vocab_size
    through AutoConfig and pads the vocabulary with [PADn] tokens rather than cutting token_embd
    (conversion/gemma.py's cut to the tokenizer's size then cuts nothing)."""
    family, tied, folder = built
    gguf, llm = converted
    config = json.loads((folder / "config.json").read_text())
    shapes = _gguf_tensor_shapes(gguf)
    assert ("output.weight" in shapes) is not tied
    rows = config["vocab_size"]
    assert shapes["token_embd.weight"] == [config["hidden_size"], rows]
    if not tied:
        assert shapes["output.weight"] == [config["hidden_size"], rows]
    assert llm.n_vocab() == rows
    n_ids = vocab.REAL_VOCABULARIES[family].n_ids
    padding = [llm._model.token_get_text(i) for i in range(n_ids, rows)]
    assert all(re.fullmatch(r"\[PAD\d+\]", piece) for piece in padding), padding[:4]
    if family == "llama3":
        assert "rope_freqs.weight" in shapes  # the "llama3" RoPE scaling's factors


def test_rebuild_is_byte_identical(built, tmp_path):
    family, tied, folder = built
    again = tiny.build_tiny(tmp_path / "again", family, tie_word_embeddings=tied)
    assert _sha256s(again) == _sha256s(folder)


def test_gemma3_has_no_untied_variant(tmp_path):
    with pytest.raises(ValueError, match="no untied variant"):
        tiny.build_tiny(tmp_path / "untied", "gemma3", tie_word_embeddings=False)
    assert not any(tmp_path.iterdir())


def test_the_cli_offers_every_family_it_can_build():
    from pipeline.cli import TINY_FAMILIES, build_parser

    assert TINY_FAMILIES == tuple(tiny.FAMILIES)
    args = build_parser().parse_args(["tiny-model", "--out", "x", "--family", "qwen3", "--no-tied"])
    assert (args.family, args.tied) == ("qwen3", False)
    args = build_parser().parse_args(["tiny-model", "--out", "x"])
    assert (args.family, args.tied) == ("phi3", None)
