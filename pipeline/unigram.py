"""A small SentencePiece Unigram vocabulary, trained deterministically on the project's data.

llm-jp-3 (llm-jp-tokenizer v3) and sarashina2 tokenize with SentencePiece
Unigram models with byte fallback, and no vocabulary of that kind ships in the
pinned llama.cpp's models/ folder. Their test bases (pipeline/tiny.py) get one
trained here: the Japanese and English text of data/ (the demo conversations,
the PII corpus, the calibration and held-out text), with Llama-2-style
settings (byte fallback, identity normalization, whitespace kept, a dummy
prefix, single digits; unk/bos/eos at 0/1/2) and the caller's control or
user-defined pieces right after them, as the real models have theirs. One
thread and no shuffling make it deterministic: the same data gives the same
bytes. About 1700 pieces, 0.1 s.

It comes in the two forms those bases ship: the SentencePiece model itself
(tokenizer.model, as sarashina2 ships it) and a `tokenizers` Unigram model
with byte fallback (tokenizer.json only, as llm-jp-3 ships it: llm-jp-tokenizer's
hf/convert_llmjp_unigram_spm_to_hf_fast.py makes it from the .model the same way).

Errors: OSError when data/ cannot be read; RuntimeError from the trainer.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Pieces to ask the trainer for; it stops short where the text has no more (hard_vocab_limit off).
VOCAB_SIZE = 2000
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPACE = "\u2581"  # SentencePiece's visible space


def training_text() -> list[str]:
    """The lines of text in data/: each message or `text` of the .jsonl files, each line of the .txt files."""
    lines: list[str] = []
    for path in sorted(DATA_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            lines += [m["content"] for m in record["messages"]] if "messages" in record else [record["text"]]
    for path in sorted(DATA_DIR.glob("*.txt")):
        lines += path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


def train_unigram(control: tuple[str, ...] = (), user_defined: tuple[str, ...] = ()) -> sp_pb2.ModelProto:
    """A Unigram SentencePiece model of data/'s text: <unk> <s> </s>, then `control` (never produced
    from text: special tokens) and `user_defined` (always one piece where they occur), then the 256
    byte pieces and the learned ones."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=out, model_type="unigram", vocab_size=VOCAB_SIZE,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=list(control), user_defined_symbols=list(user_defined),
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    model = sp_pb2.ModelProto()
    model.ParseFromString(out.getvalue())
    return model


def unigram_tokenizer(model: sp_pb2.ModelProto, normalizer: dict, post_processor: dict,
                      special_ids: list[int]) -> Tokenizer:
    """The model as a `tokenizers` Unigram tokenizer with byte fallback: every piece with its score,
    the given normalizer (which writes spaces as "\u2581" and adds the dummy prefix) and
    post-processor, no pre-tokenizer, and the pieces at special_ids as special added tokens."""
    added = [{"id": i, "content": model.pieces[i].piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in special_ids]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": None, "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"}, {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "Unigram", "unk_id": model.trainer_spec.unk_id, "byte_fallback": True,
                  "vocab": [[p.piece, p.score] for p in model.pieces]},
    }
    return Tokenizer.from_str(json.dumps(spec))
