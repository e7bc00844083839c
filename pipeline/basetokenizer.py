"""What check-config can tell from a base's tokenizer files before any work: whether the pinned
llama.cpp can serve the vocabulary as transformers tokenizes it, and whether the chat format's
end-of-turn stop is a token of it.

Read without transformers or torch, from the files as they ship (tokenizer.model,
tokenizer.json, tokenizer_config.json), so that a base that would fail hours later, at
convert or at Ollama's first chat, is refused at check-config with nothing written.

SentencePiece *Unigram* vocabularies (llm-jp-3's, sarashina2's) are refused. What the pinned
llama.cpp (0c1e570) does with them, observed on tiny bases of each (pipeline.tiny.REFUSED_BASES,
tests/test_unigram_bases.py):
  - a tokenizer.json alone (llm-jp-3): LlamaModel.set_vocab (conversion/llama.py) finds no
    tokenizer.model, gguf-py's LlamaHfVocab takes only BPE files (gguf-py/gguf/vocab.py, "Cannot
    find Llama BPE tokenizer"), and the GPT-2 path it falls back to stops on the unknown
    pre-tokenizer hash (conversion/base.py get_vocab_base_pre, "BPE pre-tokenizer was not
    recognized"): `make gguf` fails after training and fusing;
  - a tokenizer.model (sarashina2): _set_vocab_sentencepiece (conversion/base.py) writes it as a
    "llama" vocabulary, which llama.cpp tokenizes by merging the best-scoring adjacent pieces
    (src/llama-vocab.cpp, llm_tokenizer_spm), not by Unigram's best segmentation: the convert
    gate finds chat prompts that llama.cpp tokenizes differently from SentencePiece (and
    from transformers). llama.cpp has a Unigram tokenizer (tokenizer model "t5", llm_tokenizer_ugm),
    but the Llama converter never writes it.

Errors: none; unreadable files are left to the checks that own them (pipeline.modeldir).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

# The tokenizer files check-config reads, in the order they are consulted.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
# A stop written like a special token ("<|eot_id|>", "</s>", "<end_of_turn>"), not text like "### 指示:".
SPECIAL_SHAPE = re.compile(r"<[^<>\s]+>")
# The first key of a `tokenizers` model object, as tokenizer.json files are written.
_MODEL_TYPE = re.compile(r'"model"\s*:\s*\{\s*"type"\s*:\s*"(\w+)"')

REFUSED_UNIGRAM_MODEL = (
    "is a SentencePiece Unigram model. The pinned llama.cpp's converter writes it as a \"llama\" vocabulary "
    "(conversion/base.py _set_vocab_sentencepiece), which llama.cpp tokenizes by merging the best-scoring "
    "adjacent pieces (src/llama-vocab.cpp llm_tokenizer_spm), not by Unigram's best segmentation: Ollama would "
    "tokenize prompts differently from training, and the convert gate would stop the run after training. "
    "Bases on Unigram vocabularies (sarashina2, for one) are not supported with this llama.cpp; use a base "
    "of a supported family on a BPE vocabulary (Phi-3.5, Llama-3.x, Qwen2.5, Qwen3, Gemma-3)")
REFUSED_UNIGRAM_JSON = (
    "holds a Unigram model and the base has no tokenizer.model. The pinned llama.cpp's converter cannot "
    "convert it: gguf-py's LlamaHfVocab takes only BPE tokenizer.json files (gguf-py/gguf/vocab.py), and the "
    "GPT-2 BPE path it falls back to stops on an unknown pre-tokenizer (conversion/base.py get_vocab_base_pre), "
    "after training and fusing. Bases on Unigram vocabularies (llm-jp-3, for one) are not supported with this "
    "llama.cpp (a tokenizer.model beside it would convert, but llama.cpp would tokenize prompts differently "
    "from training); use a base of a supported family on a BPE vocabulary (Phi-3.5, Llama-3.x, Qwen2.5, "
    "Qwen3, Gemma-3)")


def _by_name(files: list[Path]) -> dict[str, Path]:
    return {f.name: f for f in files}


def _sentencepiece_model(path: Path) -> sp_pb2.ModelProto | None:
    model = sp_pb2.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except (OSError, DecodeError):
        return None
    return model


def _tokenizer_json_model_type(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    found = _MODEL_TYPE.search(text)
    if found:
        return found.group(1)
    try:  # a file written by hand, keys in another order
        model = json.loads(text).get("model")
    except (ValueError, AttributeError):
        return None
    return model.get("type") if isinstance(model, dict) else None


def tokenizer_problems(files: list[Path]) -> list[str]:
    """Why the pinned llama.cpp cannot serve the base's vocabulary faithfully (empty when it can,
    or when the files do not say). `files`: the base's tokenizer files at hand (TOKENIZER_FILES),
    from one folder. The converter reads tokenizer.model when there is one, else tokenizer.json."""
    found = _by_name(files)
    if "tokenizer.model" in found:
        model = _sentencepiece_model(found["tokenizer.model"])
        if model is not None and model.trainer_spec.model_type == sp_pb2.TrainerSpec.UNIGRAM:
            return [f"model.base: {found['tokenizer.model']} {REFUSED_UNIGRAM_MODEL}"]
        return []
    if "tokenizer.json" in found and _tokenizer_json_model_type(found["tokenizer.json"]) == "Unigram":
        return [f"model.base: {found['tokenizer.json']} {REFUSED_UNIGRAM_JSON}"]
    return []


def is_token(files: list[Path], token: str) -> bool | None:
    """Whether `token` is one token of the base's tokenizer: an added token of tokenizer_config.json,
    a token of tokenizer.json, a piece of tokenizer.model. None when none of them holds a
    vocabulary to tell from (no file at hand, or placeholders)."""
    found = _by_name(files)
    vocabularies = 0
    config = found.get("tokenizer_config.json")
    if config is not None:
        try:
            settings = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            settings = {}
        added = (settings.get("added_tokens_decoder") or {}).values() if isinstance(settings, dict) else ()
        if any(isinstance(t, dict) and t.get("content") == token for t in added):
            return True
    if "tokenizer.json" in found:
        try:
            text = found["tokenizer.json"].read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        # As a JSON string it is a vocabulary key or an added token's content (tokenizer.json
        # holds no chat template); either escaping of non-ASCII text.
        if json.dumps(token) in text or json.dumps(token, ensure_ascii=False) in text:
            return True
        vocabularies += '"model"' in text
    if "tokenizer.model" in found:
        model = _sentencepiece_model(found["tokenizer.model"])
        if model is not None and any(p.piece == token for p in model.pieces):
            return True
        vocabularies += model is not None and len(model.pieces) > 0
    return False if vocabularies else None


def stop_problems(files: list[Path], stops: list[str], source: str) -> list[str]:
    """The chat format's end of turn against the base's tokenizer. The end-of-turn stop is the first
    stop written like a special token (every Modelfile in modelfiles/ lists it first: <|end|>,
    <|eot_id|>, <|im_end|>, <end_of_turn>); when it is no token of the base, the chat format is
    another model's (Llama-3's on an llm-jp-3 base, say), and Ollama would prompt the model in a
    format it was never trained on. Only the first: a later stop may belong to a newer release of
    the family (Llama-3.0's tokenizer has no <|eom_id|> or <|python_tag|>). Text stops are not
    checked. `source` names where the stops come from, for the message."""
    turn_end = next((s for s in stops if SPECIAL_SHAPE.fullmatch(s)), None)
    if turn_end is None or is_token(files, turn_end) is not False:
        return []
    where = ", ".join(sorted(str(f) for f in files))
    return [f"{source}: its end-of-turn stop {turn_end!r} is no token of the base's tokenizer ({where}): the "
            "chat format is another model's, and Ollama would prompt the model in a format it was not trained "
            "on. Set ollama.template to the base's own chat format (its chat template as a Go template) and "
            "ollama.stop to its stops, end of turn first, or ollama.family to a Modelfile in modelfiles/ "
            "written for it"]
