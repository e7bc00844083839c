"""Real tokenizer vocabularies and chat templates, offline, from the pinned llama.cpp source.

The llama.cpp tree that scripts/build-llama-cpp.sh takes from the pinned
llama-cpp-python sdist ships, in `models/`, the real vocabularies of several
model families as vocab-only GGUFs (`ggml-vocab-<name>.gguf`), each with
llama.cpp's own test strings (`.gguf.inp`) and the token ids it expects for
them (`.gguf.out`), and real chat templates in `models/templates/`. This
module is the one place that finds them: a table of families (plain data),
the paths, the test pairs, the GGUF's token table, and the transformers
tokenizer read from it. Nothing comes from the hub; a missing file is a
ToolchainError that says how to get it.

Inputs everywhere: the environment, as for pipeline.llamacpp.install_dir()
(LLAMA_CPP_DIR, AGIASI_CACHE_DIR, GGML_CUDA).
Errors: ToolchainError (pipeline.errors) when the pinned build or one of its
files is missing; KeyError for a family not in REAL_VOCABULARIES.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ToolchainError
from .llamacpp import require_install

# llama.cpp's test files end each string with this line (tests/test-tokenizer-0.cpp).
_TEST_SEPARATOR = "\n__ggml_vocab_test__\n"


@dataclass(frozen=True)
class RealVocabulary:
    """One family's vocabulary and chat template in the pinned llama.cpp's models/ folder."""

    gguf: str  # the vocab-only GGUF, in models/
    chat_template: str  # the chat template, in models/templates/
    n_ids: int  # ids the tokenizer defines; GGUF rows past these are the converter's [PADn] padding


# Phi-3.5-mini-instruct (and so Borea-Phi-3.5-mini-Instruct-Jp): Llama-2's 32000 SentencePiece
# pieces with byte fallback, then Phi-3's 11 added tokens (32000..32010); the GGUF pads to 32064.
REAL_VOCABULARIES = {
    "phi3": RealVocabulary(gguf="ggml-vocab-phi-3.gguf", chat_template="microsoft-Phi-3.5-mini-instruct.jinja",
                           n_ids=32011),
}


def models_dir() -> Path:
    """models/ of the pinned llama.cpp source (the build's src/, copied from the sdist's vendor/llama.cpp).

    Errors: ToolchainError when llama.cpp is not built, or its source has no models/ folder.
    """
    path = require_install() / "src" / "models"
    if not path.is_dir():
        raise ToolchainError(f"the pinned llama.cpp source has no models/ folder at {path}: "
                             "rebuild it with `make llama-cpp` (scripts/build-llama-cpp.sh)")
    return path


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ToolchainError(f"{what} is missing from the pinned llama.cpp source: {path} "
                             "(it ships in the llama-cpp-python sdist's vendor/llama.cpp/models; "
                             "rebuild with `make llama-cpp`)")
    return path


def vocab_gguf(family: str) -> Path:
    """The family's vocab-only GGUF. Errors: ToolchainError when missing."""
    return _require(models_dir() / REAL_VOCABULARIES[family].gguf, f"the {family} vocabulary")


def chat_template(family: str) -> str:
    """The family's real chat template (Jinja source, as shipped). Errors: ToolchainError when missing."""
    path = _require(models_dir() / "templates" / REAL_VOCABULARIES[family].chat_template,
                    f"the {family} chat template")
    return path.read_text(encoding="utf-8")


def llama_cpp_test_pairs(family: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's own test strings for the family's vocabulary and the ids it expects (no BOS).

    Errors: ToolchainError when the .inp/.out files are missing or do not pair up.
    """
    gguf = vocab_gguf(family)
    inp = _require(gguf.with_name(gguf.name + ".inp"), f"the {family} test strings")
    out = _require(gguf.with_name(gguf.name + ".out"), f"the {family} expected ids")
    # Read as tests/test-tokenizer-0.cpp reads them: strings end at each separator (the file ends
    # with one), and .out holds one line of ids per string.
    raw = inp.read_text(encoding="utf-8")
    texts = raw.removesuffix(_TEST_SEPARATOR).split(_TEST_SEPARATOR)
    ids = out.read_text(encoding="utf-8").splitlines()
    if len(texts) != len(ids):
        raise ToolchainError(f"{inp} has {len(texts)} test strings but {out} has {len(ids)} id lines")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


def gguf_token_table(family: str) -> tuple[list[str], list[float], list[int]]:
    """The family's tokens, scores and token types (llama.cpp's, SentencePiece's numbering) for its
    n_ids defined ids, from the vocab GGUF. Errors: ToolchainError when the GGUF is missing or short."""
    from gguf import GGUFReader

    entry = REAL_VOCABULARIES[family]
    reader = GGUFReader(vocab_gguf(family))
    fields = [reader.fields[f"tokenizer.ggml.{key}"] for key in ("tokens", "scores", "token_type")]
    if any(len(field.data) < entry.n_ids for field in fields):
        raise ToolchainError(f"{vocab_gguf(family)} holds fewer than {entry.n_ids} tokens")
    tokens, scores, types = ([field.contents(i) for i in range(entry.n_ids)] for field in fields)
    return tokens, [float(s) for s in scores], [int(t) for t in types]


def hf_tokenizer_json(family: str) -> dict:
    """The family's tokenizer as transformers reads it from the vocab GGUF, as a tokenizer.json dict.

    transformers' GGUF loader turns the vocabulary into a `tokenizers` model (BPE with byte fallback
    and the merges for Llama-style SentencePiece vocabularies) and its normalizer, decoder and BOS
    post-processor. Its added tokens carry no per-token flags (the GGUF has none); callers set them.
    Errors: ToolchainError when the GGUF is missing.
    """
    import json

    from transformers import AutoTokenizer

    gguf = vocab_gguf(family)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return json.loads(tokenizer.backend_tokenizer.to_str())
