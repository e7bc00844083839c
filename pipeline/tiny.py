"""A tiny, deterministic Phi-3 on Phi-3.5's real tokenizer and chat template, built offline.

The demo pipeline and the tests need a base model that has the layout of the
real one (Phi3ForCausalLM, Phi-3.5's tokenizer and chat template, 32011 ids in
32064 rows) but trains and converts in seconds on a CPU. The tokenizer is the
real one: Llama-2's 32000 SentencePiece pieces with byte fallback and Phi-3's
11 added tokens, read from the vocab-only GGUF that the pinned llama.cpp
ships (pipeline/vocab.py), with Phi-3.5's chat template from the same source.
The weights are generated from fixed seeds, so two builds give byte-identical
folders and nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer
from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

from .artifacts import atomic_dir
from .vocab import REAL_VOCABULARIES, chat_template, gguf_token_table, hf_tokenizer_json

FAMILY = "phi3"
# Llama-2's SentencePiece pieces: 3 specials, 256 byte pieces (ids 3..258), 31741 merged pieces.
SPM_VOCAB_SIZE = 32000
# Target standard deviation of the logits at init; std 0.02 weights give nearly flat ones.
LOGIT_STD = 4.0

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

# SentencePiece's piece types (sentencepiece_model.proto), which llama.cpp's token types follow.
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_BYTE = 1, 2, 3, 6


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
    spec = hf_tokenizer_json(FAMILY)
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


def _tokenizer_config(added_tokens: dict[int, str]) -> dict:
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


def _special_tokens_map() -> dict:
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {"bos_token": entry(BOS), "eos_token": entry(ENDOFTEXT), "pad_token": entry(ENDOFTEXT), "unk_token": entry(UNK)}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(folder: Path) -> dict[str, int]:
    """Writes every tokenizer file into folder; returns the ids of the special tokens.

    Errors: ToolchainError (pipeline.vocab) when the pinned llama.cpp source lacks the vocabulary
    or the chat template."""
    tokens, scores, types = gguf_token_table(FAMILY)
    ids = {t: tokens.index(t) for t in (UNK, BOS, EOS, *PHI3_ADDED_TOKENS)}
    (folder / "tokenizer.model").write_bytes(
        _sentencepiece_model(tokens[:SPM_VOCAB_SIZE], scores[:SPM_VOCAB_SIZE], types[:SPM_VOCAB_SIZE]))
    _fast_tokenizer(tokens).save(str(folder / "tokenizer.json"), pretty=True)
    _write_json(folder / "tokenizer_config.json", _tokenizer_config({i: t for t, i in ids.items()}))
    _write_json(folder / "special_tokens_map.json", _special_tokens_map())
    # As Phi-3.5-mini-instruct ships it: the added tokens past the SentencePiece pieces.
    _write_json(folder / "added_tokens.json", {t: ids[t] for t in sorted(PHI3_ADDED_TOKENS)})
    (folder / "chat_template.jinja").write_text(chat_template(FAMILY), encoding="utf-8")
    return ids


def _padded_vocab_size(n_tokens: int, multiple: int = 64) -> int:
    return -(-n_tokens // multiple) * multiple


def _write_model(
    folder: Path,
    ids: dict[str, int],
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    tie_word_embeddings: bool,
    seed: int,
) -> None:
    """Writes config.json, generation_config.json and model.safetensors (float32) into folder."""
    config = Phi3Config(
        vocab_size=_padded_vocab_size(REAL_VOCABULARIES[FAMILY].n_ids),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        original_max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids[BOS],
        eos_token_id=ids[ENDOFTEXT],
        pad_token_id=ids[ENDOFTEXT],
        dtype="float32",
    )
    # A private RNG stream: the caller's torch random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(config).to(torch.float32)
        # The final RMSNorm gives unit-RMS hidden states, so head rows of std LOGIT_STD / sqrt(hidden)
        # give logits of std ~LOGIT_STD. Embeddings get the same scale so that the tied variant matches.
        std = LOGIT_STD / hidden_size**0.5
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, std)
            if not tie_word_embeddings:
                model.lm_head.weight.normal_(0.0, std)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[END], ids[ASSISTANT], ids[ENDOFTEXT]],
        pad_token_id=ids[ENDOFTEXT],
    )
    model.save_pretrained(folder)


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
    """Build a tiny random Phi-3 model folder on Phi-3.5's real tokenizer, offline and deterministically.

    Inputs: out_dir, the folder to create (its parent is created if missing; an existing out_dir is replaced,
    but only once the new folder is complete); the model shape (hidden_size must be a multiple of num_heads);
    tie_word_embeddings, whether lm_head shares the embedding matrix; seed, the torch seed of the weights.
    The tokenizer does not depend on any argument.

    Outputs: out_dir, holding config.json, generation_config.json, model.safetensors (float32),
    tokenizer.model (SentencePiece BPE, Llama-2's 32000 pieces), tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, added_tokens.json (32011 ids; the embedding and head have 32064 rows, as
    Phi-3's do) and Phi-3.5's chat_template.jinja, loadable offline with AutoModelForCausalLM and
    AutoTokenizer and convertible by llama.cpp's convert_hf_to_gguf.py. The same arguments give
    byte-identical files.

    Errors: ValueError for a shape that does not divide into heads or a non-positive size;
    ToolchainError when the pinned llama.cpp (whose source holds the vocabulary and the template) is
    not built; OSError when out_dir cannot be written. On any error out_dir is left as it was.
    """
    if min(hidden_size, intermediate_size, num_layers, num_heads) <= 0:
        raise ValueError("hidden_size, intermediate_size, num_layers and num_heads must be positive")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        ids = _write_tokenizer(staging)
        _write_model(
            staging,
            ids,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            tie_word_embeddings=tie_word_embeddings,
            seed=seed,
        )
    return out_dir

