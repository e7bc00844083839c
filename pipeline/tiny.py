"""Tiny, deterministic test bases of every supported family, on real vocabularies, built offline.

The demo pipeline and the tests need base models that have the layout of the
real ones (the architecture, the config keys that matter to training,
conversion and serving, the real tokenizer and chat template) but train and
convert in seconds on a CPU. Each family's tiny base scales down a named
real model (FAMILIES below cites it): few layers and a small hidden size,
but the real vocabulary in full, since vocabulary rows, special tokens and
their ids are what conversion and chat formatting get wrong.

The tokenizers are the real ones, read from the vocab-only GGUFs that the
pinned llama.cpp ships (pipeline/vocab.py), with each family's real chat
template from the same source (Gemma-3's from pipeline.vocab):
  - phi3:   Phi-3.5-mini-instruct: Llama-2's SentencePiece pieces, Phi-3's 11 added tokens;
  - llama3: Llama-3.2-1B-Instruct: Llama-3's byte-level BPE, Llama-3.1+'s special tokens;
  - qwen2:  Qwen2.5-0.5B-Instruct: Qwen2's byte-level BPE, Qwen2.5's added tokens;
  - qwen3:  Qwen3-0.6B: the same, and Qwen3's four added tokens;
  - gemma3: gemma-3-1b-it: Gemma's SentencePiece pieces (from Gemma-4's GGUF, which kept Gemma-3's
            pieces and ids) with Gemma-3's special tokens, as tokenizer.model and tokenizer.json.
The weights are generated from fixed seeds, so two builds give byte-identical
folders, and nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from . import unigram
from .artifacts import atomic_dir
from .vocab import REAL_VOCABULARIES, chat_template, gguf_merges, gguf_token_table, hf_tokenizer_json

# Target standard deviation of the logits at init; std 0.02 weights give nearly flat ones.
LOGIT_STD = 4.0
# Spread of the random offsets given to the norm weights and biases of the new families (see
# _randomize_constants), so that a converter that drops or mis-shifts one changes the logits.
CONSTANT_JITTER = 0.1

# SentencePiece's piece types (sentencepiece_model.proto), which llama.cpp's token types follow.
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER, _SP_BYTE = 1, 2, 3, 4, 6


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _added_token(content: str, *, special: bool = True, rstrip: bool = False) -> dict:
    """An added token's flags in tokenizer_config.json's added_tokens_decoder."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False,
            "special": special}


def _token_entry(content: str) -> dict:
    """A token in special_tokens_map.json."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


# ---- Phi-3 (Phi-3.5-mini-instruct) ----------------------------------------------------------

# Llama-2's SentencePiece pieces: 3 specials, 256 byte pieces (ids 3..258), 31741 merged pieces.
SPM_VOCAB_SIZE = 32000
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
ENDOFTEXT, END, USER, ASSISTANT, SYSTEM = "<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
# Phi-3's added tokens, in Phi-3's order, right after the SentencePiece vocab (32000..32010).
PHI3_ADDED_TOKENS = (
    ENDOFTEXT,
    ASSISTANT,
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    SYSTEM,
    END,
    "<|placeholder5|>",
    "<|placeholder6|>",
    USER,
)
MODEL_MAX_LENGTH = 4096


def _sentencepiece_model(tokens: list[str], scores: list[float], types: list[int]) -> bytes:
    """tokenizer.model (a serialized SentencePiece ModelProto) for Llama-2's pieces.

    Llama-2's settings: BPE, byte fallback, identity normalization, whitespace kept as is, a
    dummy prefix, single-digit pieces; unk/bos/eos are ids 0/1/2 (unknown, control, control;
    the GGUF lists them as added tokens) and there is no pad piece. The GGUF's -1000 scores of
    the three specials are the converter's; Llama-2's file has 0, as for the byte pieces.
    """
    model = sp_pb2.ModelProto()
    for piece_id, (token, score, token_type) in enumerate(zip(tokens, scores, types)):
        piece = model.pieces.add()
        piece.piece = token
        if piece_id == 0:
            piece.type, piece.score = _SP_UNKNOWN, 0.0
        elif piece_id in (1, 2):
            piece.type, piece.score = _SP_CONTROL, 0.0
        elif token_type == _SP_BYTE:
            piece.type, piece.score = _SP_BYTE, 0.0
        elif token_type == _SP_NORMAL:
            piece.type, piece.score = _SP_NORMAL, score
        else:
            raise ValueError(f"piece {piece_id} {token!r} has token type {token_type}, not one of Llama-2's")
    spec = model.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    spec.unk_piece, spec.bos_piece, spec.eos_piece = UNK, BOS, EOS
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.precompiled_charsmap = b""
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString(deterministic=True)


def _added_token_flags(content: str) -> dict:
    """Phi-3.5's flags: every special token strips whitespace on its right except <unk>, <s>, <|endoftext|>."""
    return {
        "lstrip": False,
        "normalized": False,
        "rstrip": content not in (UNK, BOS, ENDOFTEXT),
        "single_word": False,
        "special": content != EOS,
    }


def _fast_tokenizer(tokens: list[str]) -> Tokenizer:
    """tokenizer.json in Phi-3.5's layout, from transformers' reading of the vocab GGUF.

    transformers gives the BPE model (Llama-2's merges, byte fallback), the normalizer that adds
    the dummy prefix, no pre-tokenizer, the decoder and the BOS post-processor. It puts every GGUF
    row in the model's vocab, the [PADn] rows included, and no flags on the added tokens; Phi-3.5's
    file has the 32000 pieces in the model, `<unk>` as its unknown token, and the added tokens
    (ids 0..2 and 32000..32010) with the flags of _added_token_flags.
    """
    spec = hf_tokenizer_json("phi3")
    pieces = {token: piece_id for piece_id, token in enumerate(tokens[:SPM_VOCAB_SIZE])}
    vocab = spec["model"]["vocab"]
    if any(vocab.get(token) != piece_id for token, piece_id in pieces.items()):
        raise ValueError("transformers' reading of the vocab GGUF numbers its pieces differently from the GGUF")
    spec["model"]["vocab"] = pieces
    spec["model"]["unk_token"] = UNK
    spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                               if all(part in pieces for part in (m.split(" ") if isinstance(m, str) else m))]
    spec["added_tokens"] = [{"id": tokens.index(content), "content": content, **_added_token_flags(content)}
                            for content in (UNK, BOS, EOS, *PHI3_ADDED_TOKENS)]
    return Tokenizer.from_str(json.dumps(spec))


def _phi3_tokenizer_config(added_tokens: dict[int, str]) -> dict:
    """tokenizer_config.json as Phi-3.5-mini-instruct has it, except add_bos_token and model_max_length."""
    return {
        # Phi-3.5's file says false (no BOS from HF). True here: HF puts <s> first, and so does llama.cpp,
        # whose tokenizer.ggml.add_bos_token the converter takes from this key.
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, **_added_token_flags(t)} for i, t in added_tokens.items()},
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": UNK,
        "use_default_system_prompt": False,
    }


def _write_phi3_tokenizer(folder: Path) -> dict[str, int]:
    tokens, scores, types = gguf_token_table("phi3")
    ids = {t: tokens.index(t) for t in (UNK, BOS, EOS, *PHI3_ADDED_TOKENS)}
    (folder / "tokenizer.model").write_bytes(
        _sentencepiece_model(tokens[:SPM_VOCAB_SIZE], scores[:SPM_VOCAB_SIZE], types[:SPM_VOCAB_SIZE]))
    _fast_tokenizer(tokens).save(str(folder / "tokenizer.json"), pretty=True)
    _write_json(folder / "tokenizer_config.json", _phi3_tokenizer_config({i: t for t, i in ids.items()}))
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": _token_entry(BOS), "eos_token": _token_entry(ENDOFTEXT),
        "pad_token": _token_entry(ENDOFTEXT), "unk_token": _token_entry(UNK)})
    # As Phi-3.5-mini-instruct ships it: the added tokens past the SentencePiece pieces.
    _write_json(folder / "added_tokens.json", {t: ids[t] for t in sorted(PHI3_ADDED_TOKENS)})
    (folder / "chat_template.jinja").write_text(chat_template("phi3"), encoding="utf-8")
    return ids


def _phi3_config(ids: dict[str, int], shape: _Shape) -> Phi3Config:
    """Phi-3.5-mini-instruct's layout (LongRoPE aside: the tiny one has the default RoPE)."""
    return Phi3Config(
        vocab_size=_padded_vocab_size(REAL_VOCABULARIES["phi3"].n_ids),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        original_max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=ids[BOS],
        eos_token_id=ids[ENDOFTEXT],
        pad_token_id=ids[ENDOFTEXT],
        dtype="float32",
    )


def _phi3_generation(ids: dict[str, int]) -> GenerationConfig:
    return GenerationConfig(bos_token_id=ids[BOS], eos_token_id=[ids[END], ids[ASSISTANT], ids[ENDOFTEXT]],
                            pad_token_id=ids[ENDOFTEXT])


def _padded_vocab_size(n_tokens: int, multiple: int = 64) -> int:
    return -(-n_tokens // multiple) * multiple


# ---- byte-level BPE: Llama-3 and Qwen2 ------------------------------------------------------

# The pre-tokenizer regexes of the real tokenizer.json files (llama.cpp's LLAMA3 and QWEN2
# pre-tokenizers, src/llama-vocab.cpp): Qwen2 splits digits one by one, Llama-3 in threes.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

BEGIN_OF_TEXT, END_OF_TEXT, EOM, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"
# Llama-3.1's and 3.2's 256 special tokens (128000..128255), as transformers'
# models/llama/convert_llama_weights_to_hf.py lists them for "3.2" (DEFAULT_LLAMA_SPECIAL_TOKENS)
# and meta-llama/Llama-3.2-1B-Instruct's tokenizer.json has them. The GGUF has Llama-3.0's names,
# which differ at 128004, 128008, 128010 and in the numbering of the reserved tokens after them.
LLAMA3_SPECIAL_TOKENS = (
    BEGIN_OF_TEXT, END_OF_TEXT, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    EOM, EOT, "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
)
LLAMA3_FIRST_SPECIAL = 128000

QWEN_ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_FIRST_SPECIAL = 151643
# Qwen2.5's added tokens (151643..151664) and whether each is special, as
# Qwen/Qwen2.5-7B-Instruct's tokenizer_config.json (added_tokens_decoder) has them.
QWEN25_ADDED_TOKENS = (
    (QWEN_ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
# Qwen3's four more (151665..151668), none special, as Qwen/Qwen3-0.6B's tokenizer_config.json has them.
QWEN3_ADDED_TOKENS = QWEN25_ADDED_TOKENS + (
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
# Rows of Qwen2.5's and Qwen3's embeddings and head (config.json vocab_size): 271 or 267 past the ids.
QWEN_ROWS = 151936
# The special ones, in Qwen's special_tokens_map.json "additional_special_tokens".
QWEN_ADDITIONAL_SPECIAL = tuple(t for t, special in QWEN25_ADDED_TOKENS[1:] if special)


def _byte_level_bpe(family: str, first_special: int) -> tuple[dict[str, int], list[list[str]]]:
    """The model vocab (the byte-level pieces below first_special) and merges of a GGUF, checked to
    be consistent: every merge joins two pieces into a third."""
    tokens, _, _ = gguf_token_table(family)
    vocab = {token: i for i, token in enumerate(tokens[:first_special])}
    merges = gguf_merges(family)
    if len(vocab) != first_special or any(a not in vocab or b not in vocab or a + b not in vocab for a, b in merges):
        raise ValueError(f"the {family} vocabulary GGUF's pieces and merges do not fit together")
    return vocab, [[a, b] for a, b in merges]


def _split_then_bytes(split: str, trim_offsets: bool) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": trim_offsets, "use_regex": False}]}


def _bos_template(bos: str, bos_id: int) -> dict:
    """A post-processor that puts the BOS first (tokenizers' TemplateProcessing)."""
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _llama3_layout(bos_id: int) -> dict:
    """meta-llama/Llama-3.2-1B-Instruct's tokenizer.json, less its vocab, merges and added tokens:
    ignore_merges (a pre-token that is a whole piece stays whole, as in llama.cpp's llama-bpe), and
    <|begin_of_text|> put first by the post-processor, which llama.cpp's converter reads as add_bos."""
    return {
        "normalizer": None,
        "pre_tokenizer": _split_then_bytes(LLAMA3_SPLIT, trim_offsets=True),
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            _bos_template(BEGIN_OF_TEXT, bos_id)]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True},
    }


def _qwen2_layout() -> dict:
    """Qwen/Qwen2.5-7B-Instruct's (and Qwen3's) tokenizer.json, less its vocab, merges and added
    tokens: NFC first, digits split one by one, no BOS."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": _split_then_bytes(QWEN2_SPLIT, trim_offsets=False),
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False},
    }


def _tokenizer_json(layout: dict, vocab: dict[str, int], merges: list[list[str]], added: list[dict]) -> Tokenizer:
    """A tokenizer.json (as a `tokenizers` Tokenizer) from a layout and its vocabulary."""
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            **{k: v for k, v in layout.items() if k != "model"},
            "model": {**layout["model"], "vocab": vocab, "merges": merges}}
    return Tokenizer.from_str(json.dumps(spec))


def _added_tokens_json(tokens: list[tuple[int, str, bool]]) -> list[dict]:
    """tokenizer.json's added_tokens (id, content, special)."""
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": special} for i, t, special in tokens]


def _write_llama3_tokenizer(folder: Path) -> dict[str, int]:
    """Llama-3.2-1B-Instruct's tokenizer files: tokenizer.json, tokenizer_config.json,
    special_tokens_map.json (eos <|eot_id|>, as the instruct model has it) and its chat template."""
    vocab, merges = _byte_level_bpe("llama3", LLAMA3_FIRST_SPECIAL)
    ids = {t: LLAMA3_FIRST_SPECIAL + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    added = _added_tokens_json([(i, t, True) for t, i in ids.items()])
    _tokenizer_json(_llama3_layout(ids[BEGIN_OF_TEXT]), vocab, merges, added).save(
        str(folder / "tokenizer.json"), pretty=True)
    _write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": {str(i): _added_token(t) for t, i in ids.items()},
        "bos_token": BEGIN_OF_TEXT,
        "clean_up_tokenization_spaces": True,
        "eos_token": EOT,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _write_json(folder / "special_tokens_map.json", {"bos_token": _token_entry(BEGIN_OF_TEXT),
                                                     "eos_token": _token_entry(EOT)})
    (folder / "chat_template.jinja").write_text(chat_template("llama3"), encoding="utf-8")
    return ids


def _write_qwen_tokenizer(folder: Path, family: str) -> dict[str, int]:
    """Qwen2.5's (qwen2) or Qwen3's (qwen3) tokenizer files: tokenizer.json, tokenizer_config.json,
    special_tokens_map.json and the chat template. No BOS: Qwen's tokenizers add none."""
    vocab, merges = _byte_level_bpe(family, QWEN_FIRST_SPECIAL)
    added_tokens = QWEN3_ADDED_TOKENS if family == "qwen3" else QWEN25_ADDED_TOKENS
    tokens, _, _ = gguf_token_table(family)
    # The GGUF's own three specials (151643..151645) are Qwen's.
    if tuple(tokens[QWEN_FIRST_SPECIAL:]) != tuple(t for t, _ in added_tokens[:3]):
        raise ValueError(f"the {family} vocabulary GGUF's special tokens are not Qwen's")
    ids = {t: QWEN_FIRST_SPECIAL + i for i, (t, _) in enumerate(added_tokens)}
    special = dict(added_tokens)
    added = _added_tokens_json([(i, t, special[t]) for t, i in ids.items()])
    _tokenizer_json(_qwen2_layout(), vocab, merges, added).save(str(folder / "tokenizer.json"), pretty=True)
    _write_json(folder / "tokenizer_config.json", {
        # Qwen3-0.6B's file says add_bos_token false; Qwen2.5's has no key and means the same.
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added_token(t, special=special[t]) for t, i in ids.items()},
        "additional_special_tokens": list(QWEN_ADDITIONAL_SPECIAL),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": QWEN_ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    _write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": list(QWEN_ADDITIONAL_SPECIAL),
        "eos_token": _token_entry(IM_END), "pad_token": _token_entry(QWEN_ENDOFTEXT)})
    (folder / "chat_template.jinja").write_text(chat_template(family), encoding="utf-8")
    return ids


# ---- Gemma-3 (gemma-3-1b-it) ----------------------------------------------------------------

GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK, GEMMA_MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# Gemma-3's special tokens at the ids Gemma-4 gave new names (Gemma-4: <|turn>, <turn|>, <|image>, <|audio>).
GEMMA3_NAMED = {105: START_OF_TURN, 106: END_OF_TURN, 255999: "<start_of_image>", 256000: "<end_of_image>"}
# Gemma-3's reserved tokens: <unused0>..<unused98> at 6..104 and <unused99>.. from 256001 to the end
# (262143 is <unused6241>). Gemma-4 made 15 of them into its tool, thinking and media tokens and
# renumbered the rest; Gemma-3's names come back here.
GEMMA3_UNUSED = ((6, 105, 0), (256001, 262144, 99))  # (first id, end id, first number)


def _gemma3_tokens() -> tuple[list[str], list[int]]:
    """Gemma-3's 262144 pieces and which of them are special (control) tokens.

    The pieces are Gemma-4's vocabulary GGUF's, which kept Gemma-3's ids: <bos> 2, "\\n" 107,
    "user" 2364, "model" 4368, "Hello" 9259 are the ids gemma-3-1b-it's chat prompts have. Gemma-4
    renamed specials only; the names here are Gemma-3's (GEMMA3_NAMED, GEMMA3_UNUSED).
    Returns the tokens and the ids of the control tokens: the specials, the reserved ones and
    [multimodal] (5); <unk> (3) is SentencePiece's unknown piece, not a control one.
    """
    tokens, _, types = gguf_token_table("gemma3")
    tokens = list(tokens)
    for first, end, number in GEMMA3_UNUSED:
        for i in range(first, end):
            tokens[i] = f"<unused{number + i - first}>"
    for i, name in GEMMA3_NAMED.items():
        tokens[i] = name
    renamed = {first + k for first, end, _ in GEMMA3_UNUSED for k in range(end - first)} | set(GEMMA3_NAMED)
    control = sorted(renamed | {i for i, t in enumerate(types) if t == _SP_CONTROL and i != 3} | {5})
    if tokens[:5] != [GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK, GEMMA_MASK] or len(set(tokens)) != len(tokens):
        raise ValueError("the gemma vocabulary GGUF does not have Gemma's special tokens at Gemma's ids")
    return tokens, control


def _gemma3_merge_ranks(tokens: list[str]) -> tuple[list[list[str]], dict[str, int]]:
    """The GGUF's merges, and for each piece they make, the rank of the first one that makes it."""
    index = {t: i for i, t in enumerate(tokens)}
    merges, first_rank = [], {}
    for rank, (a, b) in enumerate(gguf_merges("gemma3")):
        if a not in index or b not in index or a + b not in index:
            raise ValueError(f"the gemma vocabulary GGUF's merge {a!r} {b!r} does not join two of its pieces")
        merges.append([a, b])
        first_rank.setdefault(a + b, rank)
    return merges, first_rank


def _gemma3_sentencepiece_model(tokens: list[str], control: list[int], first_rank: dict[str, int]) -> bytes:
    """tokenizer.model (a serialized SentencePiece ModelProto) for Gemma's pieces.

    Gemma's settings: BPE, byte fallback, identity normalization, whitespace kept as is, no dummy
    prefix, single-digit pieces; pad/eos/bos/unk are ids 0/1/2/3. The GGUF carries merges, not
    SentencePiece scores; a piece's score is minus the rank of the first merge that makes it, so
    that SentencePiece's highest-score-first merging (and llama.cpp's, which reads this file
    through the converter) is the merge order of tokenizer.json. This reproduces llama.cpp's
    expected ids for every Gemma test string (tests/test_family_vocab.py).
    """
    types = {i: _SP_CONTROL for i in control}
    types[3] = _SP_UNKNOWN
    model = sp_pb2.ModelProto()
    for piece_id, token in enumerate(tokens):
        piece = model.pieces.add()
        piece.piece = token
        if piece_id in types:
            piece.type, piece.score = types[piece_id], 0.0
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            piece.type, piece.score = _SP_BYTE, 0.0
        else:
            piece.type, piece.score = _SP_NORMAL, -float(first_rank.get(token, 0))
    spec = model.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.pad_id, spec.eos_id, spec.bos_id, spec.unk_id = 0, 1, 2, 3
    spec.pad_piece, spec.eos_piece, spec.bos_piece, spec.unk_piece = GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.precompiled_charsmap = b""
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString(deterministic=True)


def _gemma3_layout() -> dict:
    """Gemma's tokenizer.json, less its vocab, merges and added tokens: BPE with byte fallback over
    all the pieces, spaces written "▁" by the normalizer, no dummy prefix, <bos> put first."""
    return {
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                          "invert": False},
        "post_processor": _bos_template(GEMMA_BOS, 2),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": GEMMA_UNK, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False},
    }


def _write_gemma3_tokenizer(folder: Path) -> dict[str, int]:
    """gemma-3-1b-it's tokenizer files: tokenizer.model, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json and Gemma-3's chat template."""
    tokens, control = _gemma3_tokens()
    merges, first_rank = _gemma3_merge_ranks(tokens)
    (folder / "tokenizer.model").write_bytes(_gemma3_sentencepiece_model(tokens, control, first_rank))
    specials = sorted([*control, 3])
    added = _added_tokens_json([(i, tokens[i], True) for i in specials])
    _tokenizer_json(_gemma3_layout(), {t: i for i, t in enumerate(tokens)}, merges, added).save(
        str(folder / "tokenizer.json"), pretty=True)
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added_token(tokens[i]) for i in specials},
        "bos_token": GEMMA_BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": GEMMA_EOS,
        "model_max_length": 1000000000000000019884624838656,  # transformers' VERY_LARGE_INTEGER, as Gemma-3's
        "pad_token": GEMMA_PAD,
        "sp_model_kwargs": None,
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": GEMMA_UNK,
        "use_default_system_prompt": False,
    })
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": _token_entry(GEMMA_BOS), "eos_token": _token_entry(GEMMA_EOS),
        "pad_token": _token_entry(GEMMA_PAD), "unk_token": _token_entry(GEMMA_UNK)})
    (folder / "chat_template.jinja").write_text(chat_template("gemma3"), encoding="utf-8")
    return {tokens[i]: i for i in specials}


# ---- SentencePiece Unigram Llama bases: llm-jp-3 and sarashina2 (refused) ------------------

# Both are LlamaForCausalLM on SentencePiece Unigram vocabularies with byte fallback, which the
# pinned llama.cpp cannot serve as transformers tokenizes them (pipeline/basetokenizer.py says why;
# tests/test_unigram_bases.py shows it). Their test bases exist so that check-config's refusal is
# tested on the files the real ones ship. The vocabulary is pipeline.unigram's, trained on data/:
# none of these ships in the pinned llama.cpp's models/.

# llm-jp-tokenizer v3's special pieces after <unk> <s> </s> (ids 3..7), control pieces in its
# SentencePiece model; the 256 byte pieces follow (8..263).
LLMJP_SPECIALS = ("<MASK|LLM-jp>", "<PAD|LLM-jp>", "<CLS|LLM-jp>", "<SEP|LLM-jp>", "<EOD|LLM-jp>")
# llm-jp-3-*-instruct's chat template: Alpaca-style "### 指示:" / "### 応答:" turns, a fixed Japanese
# preamble in place of any system message, </s> after each answer. As published copies of its
# tokenizer_config.json's chat_template have it (read in public code; the hub is out of reach here).
LLMJP3_CHAT_TEMPLATE = (
    "{{bos_token}}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '\\n\\n### 指示:\\n' + message['content'] }}{% elif message['role'] == 'system' %}"
    "{{ '以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。' }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\n### 応答:\\n' + message['content'] + eos_token }}"
    "{% endif %}{% if loop.last and add_generation_prompt %}{{ '\\n\\n### 応答:\\n' }}{% endif %}{% endfor %}")
SARASHINA_ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
# sarashina2.2-*-instruct-v0.1's chat template: each turn is <|role|> + content + </s>, and the
# generation prompt <|assistant|>. As published copies have it (read in public code, not the hub).
SARASHINA22_CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{{- '<|user|>' + message['content'] + eos_token -}}"
    "{%- elif message['role'] == 'system' %}{{- '<|system|>' + message['content'] + eos_token -}}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|assistant|>' + message['content'] + eos_token -}}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>' -}}{%- endif %}")
# Rows of the tiny bases' embeddings and head: the ~1700 pieces padded, as the real ones pad theirs.
UNIGRAM_ROWS = 2048


def _unigram_ids(model) -> dict[str, int]:
    """The ids of the special pieces of a trained Unigram model, checked to fit UNIGRAM_ROWS."""
    if len(model.pieces) > UNIGRAM_ROWS:
        raise ValueError(f"the Unigram vocabulary has {len(model.pieces)} pieces, more than {UNIGRAM_ROWS} rows")
    return {p.piece: i for i, p in enumerate(model.pieces) if p.type in (_SP_UNKNOWN, _SP_CONTROL, _SP_USER)}


def _write_llmjp3_tokenizer(folder: Path) -> dict[str, int]:
    """llm-jp-3's tokenizer files: tokenizer.json only (no tokenizer.model), in the layout of
    llm-jp-tokenizer's HF conversion (a Unigram model with byte fallback; the normalizer writes the
    dummy prefix at the start of the text, not after a newline, and spaces as "▁"; no
    pre-tokenizer), a <s> put first, tokenizer_config.json as llm-jp-tokenizer v3's, and the chat template."""
    model = unigram.train_unigram(control=LLMJP_SPECIALS)
    ids = _unigram_ids(model)
    specials = sorted(ids.values())
    normalizer = {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"Regex": "(?<!\\n)^"}, "content": unigram.SPACE},
        {"type": "Replace", "pattern": {"Regex": " "}, "content": unigram.SPACE}]}
    unigram.unigram_tokenizer(model, normalizer, _bos_template(BOS, ids[BOS]), specials).save(
        str(folder / "tokenizer.json"), pretty=True)
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added_token(model.pieces[i].piece) for i in specials},
        "bos_token": BOS, "cls_token": "<CLS|LLM-jp>", "eos_token": EOS, "mask_token": "<MASK|LLM-jp>",
        "pad_token": "<PAD|LLM-jp>", "sep_token": "<SEP|LLM-jp>", "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": _token_entry(BOS), "eos_token": _token_entry(EOS), "pad_token": _token_entry("<PAD|LLM-jp>"),
        "unk_token": _token_entry(UNK)})
    (folder / "chat_template.jinja").write_text(LLMJP3_CHAT_TEMPLATE, encoding="utf-8")
    return ids


def _write_sarashina2_tokenizer(folder: Path) -> dict[str, int]:
    """sarashina2's tokenizer files: the SentencePiece Unigram tokenizer.model (the role tokens as
    user-defined pieces), tokenizer_config.json naming LlamaTokenizer, a tokenizer.json of the same
    Unigram model in Llama-2's layout (dummy prefix and "▁" by the normalizer, <s> first) and
    sarashina2.2-instruct's chat template."""
    model = unigram.train_unigram(user_defined=SARASHINA_ROLES)
    ids = _unigram_ids(model)
    specials = sorted(ids.values())
    (folder / "tokenizer.model").write_bytes(model.SerializeToString(deterministic=True))
    normalizer = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": unigram.SPACE},
        {"type": "Replace", "pattern": {"String": " "}, "content": unigram.SPACE}]}
    unigram.unigram_tokenizer(model, normalizer, _bos_template(BOS, ids[BOS]), specials).save(
        str(folder / "tokenizer.json"), pretty=True)
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added_token(model.pieces[i].piece) for i in specials},
        "bos_token": BOS, "eos_token": EOS, "pad_token": UNK, "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 8192,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    })
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": _token_entry(BOS), "eos_token": _token_entry(EOS), "pad_token": _token_entry(UNK),
        "unk_token": _token_entry(UNK)})
    (folder / "chat_template.jinja").write_text(SARASHINA22_CHAT_TEMPLATE, encoding="utf-8")
    return ids


# ---- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool


def _llama3_config(ids: dict[str, int], shape: _Shape) -> LlamaConfig:
    """meta-llama/Llama-3.2-1B-Instruct's config.json, scaled down: head_dim 64 (hidden / heads), 4 query
    heads per KV head, rope_theta 500000 with the "llama3" RoPE scaling (factor 32, low 1, high 4,
    original context 8192), context 131072, rms_norm_eps 1e-5, eos <|end_of_text|> <|eom_id|> <|eot_id|>."""
    return LlamaConfig(
        vocab_size=REAL_VOCABULARIES["llama3"].n_ids,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=ids[BEGIN_OF_TEXT],
        eos_token_id=[ids[END_OF_TEXT], ids[EOM], ids[EOT]],
        dtype="float32",
    )


def _llama3_generation(ids: dict[str, int]) -> GenerationConfig:
    return GenerationConfig(bos_token_id=ids[BEGIN_OF_TEXT], eos_token_id=[ids[END_OF_TEXT], ids[EOM], ids[EOT]])


def _qwen2_config(ids: dict[str, int], shape: _Shape) -> Qwen2Config:
    """Qwen/Qwen2.5-0.5B-Instruct's config.json, scaled down: biases on q/k/v (always, in Qwen2), head_dim
    64 (hidden / heads), rope_theta 1e6, context 32768, rms_norm_eps 1e-6, no sliding window, 151936 rows."""
    return Qwen2Config(
        vocab_size=QWEN_ROWS,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        max_window_layers=shape.num_layers,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=ids[QWEN_ENDOFTEXT],
        eos_token_id=ids[IM_END],
        dtype="float32",
    )


def _qwen3_config(ids: dict[str, int], shape: _Shape) -> Qwen3Config:
    """Qwen/Qwen3-0.6B's config.json, scaled down: head_dim 128 whatever the hidden size (the 0.6B's
    16 heads x 128 are twice its hidden size), an RMSNorm on each head's q and k, no biases,
    rope_theta 1e6, context 40960, rms_norm_eps 1e-6, 151936 rows."""
    return Qwen3Config(
        vocab_size=QWEN_ROWS,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attention_bias=False,
        use_sliding_window=False,
        max_window_layers=shape.num_layers,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=ids[QWEN_ENDOFTEXT],
        eos_token_id=ids[IM_END],
        dtype="float32",
    )


def _qwen_generation(ids: dict[str, int]) -> GenerationConfig:
    # Qwen2.5-Instruct's and Qwen3's generation_config.json: stop at <|im_end|> or <|endoftext|>.
    return GenerationConfig(bos_token_id=ids[QWEN_ENDOFTEXT], eos_token_id=[ids[IM_END], ids[QWEN_ENDOFTEXT]],
                            pad_token_id=ids[QWEN_ENDOFTEXT])


# Rows of the embeddings (and the tied head) of gemma-3-4b/12b/27b-it's text model, whose config.json
# leaves vocab_size to Gemma3TextConfig's default.
GEMMA3_ROWS = 262208


def _gemma3_config(ids: dict[str, int], shape: _Shape) -> Gemma3TextConfig:
    """google/gemma-3-1b-it's config.json (Gemma3ForCausalLM, model_type gemma3_text), scaled down:
    head_dim 256 and query_pre_attn_scalar 256 whatever the hidden size, 4 query heads per KV head,
    sliding-window attention (window 512) in five layers of six (so in every layer of a model of
    fewer than six, in transformers and llama.cpp alike), RoPE theta 1e6 global and 1e4 local,
    gelu_pytorch_tanh, context 32768, eos <eos> and <end_of_turn>. Its 262208 rows are those of
    gemma-3-4b/12b/27b-it's text model, 64 past the tokenizer's ids (the 1b has exactly 262144).
    The pinned converter keeps them all: it reads vocab_size through AutoConfig and pads the
    GGUF's vocabulary with 64 [PADn] tokens to match (conversion/base.py
    _create_vocab_sentencepiece); its cut of token_embd to the tokenizer (conversion/gemma.py)
    then cuts nothing."""
    return Gemma3TextConfig(
        vocab_size=GEMMA3_ROWS,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(shape.num_layers)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        bos_token_id=ids[GEMMA_BOS],
        eos_token_id=[ids[GEMMA_EOS], ids[END_OF_TURN]],
        pad_token_id=ids[GEMMA_PAD],
        dtype="float32",
    )


def _gemma3_generation(ids: dict[str, int]) -> GenerationConfig:
    return GenerationConfig(bos_token_id=ids[GEMMA_BOS], eos_token_id=[ids[GEMMA_EOS], ids[END_OF_TURN]],
                            pad_token_id=ids[GEMMA_PAD])


def _unigram_llama_config(ids: dict[str, int], shape: _Shape, max_positions: int) -> LlamaConfig:
    """A plain Llama-2-style LlamaConfig (RoPE theta 1e4, no scaling, rms_norm_eps 1e-5, bos <s>,
    eos </s>) of UNIGRAM_ROWS rows: the layout llm-jp-3 and sarashina2 share. Only the tokenizer
    matters to what their test bases test (they are refused before training)."""
    return LlamaConfig(
        vocab_size=UNIGRAM_ROWS,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        dtype="float32",
    )


def _unigram_generation(ids: dict[str, int]) -> GenerationConfig:
    return GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS])


@dataclass(frozen=True)
class TinyFamily:
    """How to build one family's tiny base: the real model it scales down and the default shape.

    hidden_size and intermediate_size default to multiples of 256, the row length llama.cpp's
    k-quants need: every tensor quantizes as it would in the real model."""

    real_model: str
    model_class: type
    write_tokenizer: Callable[[Path], dict[str, int]]
    config: Callable[[dict[str, int], _Shape], PretrainedConfig]
    generation: Callable[[dict[str, int]], GenerationConfig]
    intermediate_size: int
    kv_group: int  # query heads per KV head in the real model
    tied: bool  # the real model's tie_word_embeddings
    untied_allowed: bool = True
    fixed_head_dim: bool = False  # head_dim is fixed (Qwen3, Gemma-3): hidden_size need not split into heads
    hidden_size: int = 256
    num_heads: int = 4


FAMILIES: dict[str, TinyFamily] = {
    "phi3": TinyFamily("microsoft/Phi-3.5-mini-instruct", Phi3ForCausalLM, _write_phi3_tokenizer, _phi3_config,
                       _phi3_generation, intermediate_size=512, kv_group=1, tied=False),
    "llama3": TinyFamily("meta-llama/Llama-3.2-1B-Instruct", LlamaForCausalLM, _write_llama3_tokenizer,
                         _llama3_config, _llama3_generation, intermediate_size=1024, kv_group=4, tied=True),
    "qwen2": TinyFamily("Qwen/Qwen2.5-0.5B-Instruct", Qwen2ForCausalLM,
                        lambda folder: _write_qwen_tokenizer(folder, "qwen2"), _qwen2_config, _qwen_generation,
                        intermediate_size=1280, kv_group=7, tied=True),
    "qwen3": TinyFamily("Qwen/Qwen3-0.6B", Qwen3ForCausalLM, lambda folder: _write_qwen_tokenizer(folder, "qwen3"),
                        _qwen3_config, _qwen_generation, intermediate_size=768, kv_group=2, tied=True,
                        fixed_head_dim=True),
    # Gemma-3 always ties the head to the embeddings (Gemma3ForCausalLM has no untied variant).
    "gemma3": TinyFamily("google/gemma-3-1b-it", Gemma3ForCausalLM, _write_gemma3_tokenizer, _gemma3_config,
                         _gemma3_generation, intermediate_size=1536, kv_group=4, tied=True, untied_allowed=False,
                         fixed_head_dim=True),
}


# Test bases of LlamaForCausalLM models the pipeline refuses at check-config (pipeline/basetokenizer.py),
# built like the families' so that the refusal is tested on the files the real models ship.
REFUSED_BASES: dict[str, TinyFamily] = {
    "llmjp3": TinyFamily("llm-jp/llm-jp-3-1.8b-instruct", LlamaForCausalLM, _write_llmjp3_tokenizer,
                         lambda ids, shape: _unigram_llama_config(ids, shape, 4096), _unigram_generation,
                         intermediate_size=512, kv_group=1, tied=False),
    "sarashina2": TinyFamily("sbintuitions/sarashina2.2-3b-instruct-v0.1", LlamaForCausalLM,
                             _write_sarashina2_tokenizer, lambda ids, shape: _unigram_llama_config(ids, shape, 8192),
                             _unigram_generation, intermediate_size=512, kv_group=1, tied=False),
}


def _spec(family: str) -> TinyFamily:
    """The tiny base of a family (FAMILIES) or of a refused base (REFUSED_BASES). Errors: KeyError."""
    spec = FAMILIES.get(family) or REFUSED_BASES.get(family)
    if spec is None:
        raise KeyError(f"no tiny model for family {family!r}; families: {', '.join(FAMILIES)}; "
                       f"refused bases: {', '.join(REFUSED_BASES)}")
    return spec


def _write_tokenizer(folder: Path, family: str = "phi3") -> dict[str, int]:
    """Writes every tokenizer file of the family into folder; returns the ids of its special tokens.

    Errors: ToolchainError (pipeline.vocab) when the pinned llama.cpp source lacks the vocabulary
    or the chat template."""
    return _spec(family).write_tokenizer(folder)


def _randomize_constants(model: torch.nn.Module) -> None:
    """Give the norm weights and the biases, which the default init makes constant (ones, zeros),
    random offsets: a tiny model whose q/k norms are all ones, say, could not tell a converter
    that drops them from one that keeps them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * CONSTANT_JITTER)


def _write_model(folder: Path, family: str, ids: dict[str, int], shape: _Shape, seed: int) -> None:
    """Writes config.json, generation_config.json and model.safetensors (float32) into folder."""
    spec = _spec(family)
    config = spec.config(ids, shape)
    # A private RNG stream: the caller's torch random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model_class(config).to(torch.float32)
        # The final RMSNorm gives unit-RMS hidden states, so head rows of std LOGIT_STD / sqrt(hidden)
        # give logits of std ~LOGIT_STD. Embeddings get the same scale so that the tied variant matches.
        std = LOGIT_STD / shape.hidden_size**0.5
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, std)
            if not shape.tie_word_embeddings:
                model.lm_head.weight.normal_(0.0, std)
        if family != "phi3":  # phi3's weights stay as they were before the other families came
            _randomize_constants(model)
    model.generation_config = spec.generation(ids)
    model.save_pretrained(folder)


def _shape(spec: TinyFamily, family: str, hidden_size: int | None, intermediate_size: int | None, num_layers: int,
           num_heads: int | None, tie_word_embeddings: bool | None) -> _Shape:
    hidden = spec.hidden_size if hidden_size is None else hidden_size
    heads = spec.num_heads if num_heads is None else num_heads
    intermediate = spec.intermediate_size if intermediate_size is None else intermediate_size
    tied = spec.tied if tie_word_embeddings is None else tie_word_embeddings
    if min(hidden, intermediate, num_layers, heads) <= 0:
        raise ValueError("hidden_size, intermediate_size, num_layers and num_heads must be positive")
    if not spec.fixed_head_dim and (hidden % heads or (hidden // heads) % 2):
        raise ValueError(f"hidden_size {hidden} must split into {heads} heads of even size")
    if tied is False and not spec.untied_allowed:
        raise ValueError(f"{family} ties the LM head to the embeddings; it has no untied variant")
    kv_heads = max(1, heads // spec.kv_group)
    if heads % kv_heads:
        raise ValueError(f"{heads} heads do not share {kv_heads} KV heads evenly")
    return _Shape(hidden, intermediate, num_layers, heads, kv_heads, tied)


def build_tiny(
    out_dir: Path,
    family: str = "phi3",
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    num_heads: int | None = None,
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
) -> Path:
    """Build a tiny random model folder of a family on its real tokenizer, offline and deterministically.

    Inputs: out_dir, the folder to create (its parent is created if missing; an existing out_dir is replaced,
    but only once the new folder is complete); family, a key of FAMILIES, or of REFUSED_BASES (llmjp3,
    sarashina2: Llama bases on a Unigram vocabulary trained on data/, which check-config refuses); the model shape, each None taking
    the family's default (FAMILIES; hidden_size must split into num_heads heads of even size, except for
    qwen3 and gemma3, whose head_dim is fixed; KV heads follow the real model's grouping);
    tie_word_embeddings, whether lm_head shares the embedding matrix (default: as the real model);
    seed, the torch seed of the weights. The tokenizer depends on the family only.

    Outputs: out_dir, holding config.json, generation_config.json, model.safetensors (float32), the family's
    tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json; tokenizer.model for the
    SentencePiece families; added_tokens.json for phi3) and chat_template.jinja, loadable offline with
    AutoModelForCausalLM and AutoTokenizer and (but for REFUSED_BASES) convertible by llama.cpp's convert_hf_to_gguf.py. The same
    arguments give byte-identical files.

    Errors: KeyError for an unknown family; ValueError for a shape that does not divide into heads, a
    non-positive size, or an untied gemma3; ToolchainError when the pinned llama.cpp (whose source holds
    the vocabularies and templates) is not built; OSError when out_dir cannot be written. On any error
    out_dir is left as it was.
    """
    spec = _spec(family)
    shape = _shape(spec, family, hidden_size, intermediate_size, num_layers, num_heads, tie_word_embeddings)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        ids = _write_tokenizer(staging, family)
        _write_model(staging, family, ids, shape, seed)
    return out_dir


def build_tiny_phi3(
    out_dir: Path,
    *,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """build_tiny(out_dir, "phi3", ...): the tiny Phi-3 on Phi-3.5's real tokenizer (32011 ids in 32064 rows)."""
    return build_tiny(out_dir, "phi3", hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_layers=num_layers, num_heads=num_heads, tie_word_embeddings=tie_word_embeddings, seed=seed)
