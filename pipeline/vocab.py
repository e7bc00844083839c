"""Real tokenizer vocabularies and chat templates, offline, from the pinned llama.cpp source.

The llama.cpp tree that scripts/build-llama-cpp.sh takes from the pinned
llama-cpp-python sdist ships, in `models/`, the real vocabularies of several
model families as vocab-only GGUFs (`ggml-vocab-<name>.gguf`), each with
llama.cpp's own test strings (`.gguf.inp`) and the token ids it expects for
them (`.gguf.out`), and real chat templates in `models/templates/`. This
module is the one place that finds them: a table of families (plain data),
the paths, the test pairs, the GGUF's token table and merges, and the
transformers tokenizer read from it. Nothing comes from the hub; a missing
file is a ToolchainError that says how to get it. Gemma-3's chat template,
which the pin does not ship, is written out here (GEMMA3_CHAT_TEMPLATE).

Inputs everywhere: the environment, as for pipeline.llamacpp.install_dir()
(LLAMA_CPP_DIR, AGIASI_CACHE_DIR, GGML_CUDA).
Errors: ToolchainError (pipeline.errors) when the pinned build or one of its
files is missing; KeyError for a family not in REAL_VOCABULARIES.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from .errors import ToolchainError
from .formats import GGUFError, validate_gguf
from .llamacpp import require_install

# llama.cpp's test files end each string with this line (tests/test-tokenizer-0.cpp).
_TEST_SEPARATOR = "\n__ggml_vocab_test__\n"


@dataclass(frozen=True)
class RealVocabulary:
    """One family's vocabulary and chat template in the pinned llama.cpp's models/ folder."""

    gguf: str  # the vocab-only GGUF, in models/
    chat_template: str | None  # the chat template, in models/templates/; None: WRITTEN_OUT_TEMPLATES has it
    n_ids: int  # ids the family's tokenizer defines; rows past these are padding
    # ids of the GGUF that are real tokens, when the family's tokenizer adds tokens the GGUF lacks
    # (the GGUF's later rows are the converter's [PADn] padding); None: n_ids.
    gguf_ids: int | None = None

    @property
    def n_gguf_ids(self) -> int:
        return self.n_ids if self.gguf_ids is None else self.gguf_ids


REAL_VOCABULARIES = {
    # Phi-3.5-mini-instruct (and so Borea-Phi-3.5-mini-Instruct-Jp): Llama-2's 32000 SentencePiece
    # pieces with byte fallback, then Phi-3's 11 added tokens (32000..32010); the GGUF pads to 32064.
    "phi3": RealVocabulary(gguf="ggml-vocab-phi-3.gguf", chat_template="microsoft-Phi-3.5-mini-instruct.jinja",
                           n_ids=32011),
    # Llama-3's byte-level BPE: 128000 pieces and 256 special tokens (128000..128255), pre-tokenizer
    # "llama-bpe". The GGUF names the specials as Llama-3.0 did; Llama-3.1+ renamed four of them
    # (pipeline.tiny). Llama-3.2-3B-Instruct's template (the 1B's is the same).
    "llama3": RealVocabulary(gguf="ggml-vocab-llama-bpe.gguf", chat_template="meta-llama-Llama-3.2-3B-Instruct.jinja",
                             n_ids=128256),
    # Qwen2's byte-level BPE: 151643 pieces, then <|endoftext|>, <|im_start|>, <|im_end|> (151643..151645),
    # all the GGUF holds; Qwen2.5 adds 151646..151664 and Qwen3 151665..151668 (pipeline.tiny).
    "qwen2": RealVocabulary(gguf="ggml-vocab-qwen2.gguf", chat_template="Qwen-Qwen2.5-7B-Instruct.jinja",
                            n_ids=151665, gguf_ids=151646),
    "qwen3": RealVocabulary(gguf="ggml-vocab-qwen2.gguf", chat_template="Qwen-Qwen3-0.6B.jinja",
                            n_ids=151669, gguf_ids=151646),
    # Gemma's 262144 SentencePiece pieces, from Gemma-4's GGUF: Gemma-4 kept Gemma-3's pieces and ids,
    # gave 19 special and reserved ids new names and renumbered the other reserved ones (pipeline.tiny
    # names them back). No Gemma-3 template ships at the pin: GEMMA3_CHAT_TEMPLATE.
    "gemma3": RealVocabulary(gguf="ggml-vocab-gemma-4.gguf", chat_template=None, n_ids=262144),
}

# google/gemma-3-1b-it's chat template (tokenizer_config.json "chat_template"; the same text is
# gemma-3-4b/12b/27b-it's chat_template.json). A system message becomes a prefix of the first
# user turn; "assistant" is written "model"; the template writes the BOS itself.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
# The real chat templates the pin does not ship.
WRITTEN_OUT_TEMPLATES = {"gemma3": GEMMA3_CHAT_TEMPLATE}


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
    """The family's real chat template (Jinja source, as shipped; Gemma-3's as released).
    Errors: ToolchainError when missing."""
    name = REAL_VOCABULARIES[family].chat_template
    if name is None:
        return WRITTEN_OUT_TEMPLATES[family]
    path = _require(models_dir() / "templates" / name, f"the {family} chat template")
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


@functools.lru_cache(maxsize=1)  # the last one read: Gemma's holds 780k strings
def _gguf_tokenizer_metadata(path: Path) -> dict[str, object]:
    """The tokenizer.* metadata of a vocab-only GGUF (arrays as lists).

    The `gguf` package's GGUFReader takes 10-30 s on the 128k-262k token vocabularies (one numpy
    array per string); pipeline.formats.validate_gguf, which reads the header alone, about a second.
    """
    try:
        metadata = validate_gguf(path).metadata
    except GGUFError as err:
        raise ToolchainError(str(err)) from None
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


def gguf_token_table(family: str) -> tuple[list[str], list[float], list[int]]:
    """The family's tokens, scores and token types (llama.cpp's, SentencePiece's numbering) for the
    GGUF's real ids (RealVocabulary.n_gguf_ids). A byte-level BPE GGUF has no scores: they are 0.0.
    Errors: ToolchainError when the GGUF is missing or short."""
    n = REAL_VOCABULARIES[family].n_gguf_ids
    metadata = _gguf_tokenizer_metadata(vocab_gguf(family))
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    scores = metadata.get("tokenizer.ggml.scores", [0.0] * len(tokens))
    if min(len(tokens), len(scores), len(types)) < n:
        raise ToolchainError(f"{vocab_gguf(family)} holds fewer than {n} tokens")
    return list(tokens[:n]), [float(s) for s in scores[:n]], [int(t) for t in types[:n]]


def gguf_merges(family: str) -> list[tuple[str, str]]:
    """The family's BPE merges from the vocab GGUF, in rank order, as (left, right) pairs.

    llama.cpp splits each "left right" entry at the first space after its first character
    (src/llama-vocab.cpp), so a left part may itself be a space. Errors: ToolchainError when the
    GGUF is missing or has no merges."""
    merges = _gguf_tokenizer_metadata(vocab_gguf(family)).get("tokenizer.ggml.merges")
    if not merges:
        raise ToolchainError(f"{vocab_gguf(family)} has no tokenizer.ggml.merges")
    pairs = []
    for merge in merges:
        cut = merge.index(" ", 1)
        pairs.append((merge[:cut], merge[cut + 1:]))
    return pairs


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
