"""The model families the pipeline supports, as data: one entry per family.

A family is what the pipeline must know about a base beyond its config.json
to train it, fold the soul into its head, convert it with the pinned
llama.cpp and serve it through Ollama so that Ollama runs what was trained.
The family of a base comes from its config.json (`architectures`, else
`model_type`), never from its name. Adding a family means adding an entry
here, a `modelfiles/<modelfile>.Modelfile` and a test model (pipeline/tiny.py).

Sources of the facts, at the pins (llama.cpp 0c1e570, Ollama v0.33.0-rc2):
  - llama.cpp's converter classes (`conversion/*.py`) and its tensor lists
    (`gguf-py/gguf/constants.py`): which tensors reach the GGUF;
  - llama.cpp's `src/llama-vocab.cpp`: Phi-3's general.name rule;
  - Ollama's `template/<name>.gotmpl` and `<name>.json`: TEMPLATE and stops;
  - Ollama's `server/images.go` (shouldPreferChatTemplate): a GGUF chat
    template that supports tools or thinking wins over the Modelfile TEMPLATE.

Errors: UnsupportedBaseError (a ValueError) naming the architecture and the
supported ones, or the reason a family is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class UnsupportedBaseError(ValueError):
    """A base whose architecture the pipeline refuses, with the reason."""


# PEFT's names for the linear layers of the Llama-style decoder (split projections).
SPLIT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """What differs between model families, as plain data."""

    name: str  # ollama.family's default, and the name the README and the dashboard show
    display: str  # for people: "Phi-3 / Phi-3.5"
    architectures: tuple[str, ...]  # HF `architectures` entries that mean this family
    model_types: tuple[str, ...]  # HF `model_type` values, used when `architectures` is missing
    lora_targets: tuple[str, ...]  # train.lora.target_modules' default
    modelfile: str  # modelfiles/<modelfile>.Modelfile: the Ollama TEMPLATE and stops
    ollama_template: str  # Ollama's template/<name>.gotmpl the Modelfile follows (cited there)
    # Does an untied lm_head reach the GGUF as output.weight? Where not, the folded soul would
    # vanish silently, so such a family is refused (see `refused`).
    head_survives_convert: bool = True
    # How the rows of token_embd and output are laid out in the GGUF. "config": vocab_size rows, as
    # in the HF model; ids past the tokenizer's become [PADn] tokens (Phi-3 pads 32011 ids to 32064,
    # Qwen 151669 to 151936, Gemma-3's text models 262144 to 262208: Gemma3Model.modify_tensors cuts
    # token_embd to the converter's token list, which is already padded to vocab_size, so it cuts
    # nothing at the pin; tests/test_family_vocab.py checks it). The only layout the pinned converter
    # produces for these families; a family whose converter trims the embeddings only would need fuse
    # to trim the head alike.
    gguf_vocab_rows: str = "config"
    # Would Ollama prefer the GGUF's own chat template over the Modelfile TEMPLATE for the family's
    # current release's chat template (it supports tools or thinking)? Then the GGUF's template must
    # be the one training used (it is: convert copies the tokenizer's). It depends on the base's own
    # template (Llama-3.0's has no tools; 3.1+'s have), so registration decides from the GGUF's
    # actual template (ollama.template_in_use); this is the expectation tests/test_family_templates.py
    # checks against Ollama's rule.
    gguf_template_wins: bool = False
    thinking: tuple[str, str] | None = None  # the family's own reasoning tags, if its template has them
    # llama.cpp gives the special tokens their tokenizer.json right-strip only when general.name
    # matches (src/llama-vocab.cpp); the GGUF's name must then match.
    general_name: re.Pattern | None = None
    general_name_suffix: str = ""  # appended to a default name that does not match general_name
    # LongRoPE: llama.cpp picks the long factors by the allocated context, so num_ctx above the
    # original context changes the model for every prompt.
    long_rope: bool = False
    # Tensors the GGUF holds that the HF model computes instead (Llama-3.1's rope_freqs).
    extra_gguf_tensors: tuple[str, ...] = ()
    refused: str | None = None  # why the pipeline refuses this family; None when supported
    notes: tuple[str, ...] = field(default=())  # other llama.cpp facts, for the README's table


FAMILIES: tuple[Family, ...] = (
    Family(
        name="phi3",
        display="Phi-3 / Phi-3.5",
        architectures=("Phi3ForCausalLM",),
        model_types=("phi3",),
        lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused q/k/v and gate/up
        modelfile="phi3",
        ollama_template="phi-3",
        general_name=re.compile(r"phi-?3", re.IGNORECASE),
        general_name_suffix="-phi3",
        long_rope=True,
        notes=("llama.cpp ignores Phi-3's sliding window beyond 2047 tokens",),
    ),
    Family(
        name="llama3",
        display="Llama-3.x (Swallow, ELYZA-JP)",
        architectures=("LlamaForCausalLM",),
        model_types=("llama",),
        lora_targets=SPLIT_PROJECTIONS,
        modelfile="llama3",
        ollama_template="llama3-instruct",
        gguf_template_wins=True,  # Llama-3.1+'s template supports tools
        extra_gguf_tensors=("rope_freqs.weight",),  # rope_scaling "llama3" factors (conversion/llama.py)
        notes=("llm-jp-3 and sarashina2 are LlamaForCausalLM on SentencePiece Unigram vocabularies, which the "
               "pinned llama.cpp cannot serve as transformers tokenizes them: refused at check-config from the "
               "base's tokenizer files (pipeline/basetokenizer.py)",),
    ),
    Family(
        name="qwen2",
        display="Qwen2 / Qwen2.5 (TinySwallow, EZO-Qwen2.5)",
        architectures=("Qwen2ForCausalLM",),
        model_types=("qwen2",),
        lora_targets=SPLIT_PROJECTIONS,
        modelfile="qwen2",
        ollama_template="chatml",
        gguf_template_wins=True,  # Qwen2.5's template supports tools
        notes=("q/k/v projections carry biases",),
    ),
    Family(
        name="qwen3",
        display="Qwen3 (Qwen3-Swallow)",
        architectures=("Qwen3ForCausalLM",),
        model_types=("qwen3",),
        lora_targets=SPLIT_PROJECTIONS,
        modelfile="qwen3",
        ollama_template="chatml",
        gguf_template_wins=True,  # tools and thinking
        thinking=("<think>", "</think>"),
        notes=("q/k RMSNorm per head",),
    ),
    Family(
        name="gemma3",
        display="Gemma-3 text (Gemma3ForCausalLM)",
        architectures=("Gemma3ForCausalLM",),
        model_types=("gemma3_text",),
        lora_targets=SPLIT_PROJECTIONS,
        modelfile="gemma3",
        ollama_template="gemma3-instruct",
        notes=("embeddings scaled by sqrt(hidden_size); RMSNorm weights stored as w - 1",
               "the system prompt is folded into the first user turn"),
    ),
    Family(
        name="gemma2",
        display="Gemma-2",
        architectures=("Gemma2ForCausalLM",),
        model_types=("gemma2",),
        lora_targets=SPLIT_PROJECTIONS,
        modelfile="gemma3",
        ollama_template="gemma-instruct",
        head_survives_convert=False,
        refused=("llama.cpp's Gemma-2 converter drops lm_head.weight and its GGUF has no output tensor "
                 "(conversion/gemma.py, gguf-py constants MODEL_ARCH.GEMMA2; llama.cpp#9065), so the soul "
                 "folded into the head would vanish without an error"),
    ),
)

BY_NAME = {f.name: f for f in FAMILIES}


def supported() -> list[Family]:
    return [f for f in FAMILIES if f.refused is None]


def family_of(hf: dict[str, Any], where: str = "config.json") -> Family:
    """The family of a base from its config.json contents.

    Errors: UnsupportedBaseError for a refused family (with the reason) or an architecture no
    family has (naming the supported ones).
    """
    archs = [a for a in (hf.get("architectures") or []) if isinstance(a, str)]
    model_type = hf.get("model_type")
    found = next((f for f in FAMILIES if set(archs) & set(f.architectures)), None)
    if found is None and not archs:
        found = next((f for f in FAMILIES if model_type in f.model_types), None)
    if found is None:
        names = ", ".join(a for f in supported() for a in f.architectures)
        raise UnsupportedBaseError(
            f"{where} describes {archs or model_type!r}, which this pipeline does not support; "
            f"supported architectures: {names}")
    if found.refused:
        raise UnsupportedBaseError(f"{where} describes a {found.display} model ({', '.join(archs) or model_type}), "
                                   f"which this pipeline refuses: {found.refused}")
    return found


def gguf_name(family: Family, default: str, model_name: str | None) -> str:
    """general.name for the family's GGUF: model_name, else `default` made to match the family's rule.

    Errors: ValueError for a model_name that the family's rule does not accept.
    """
    if family.general_name is None:
        return model_name or default
    if model_name is None:
        return default if family.general_name.search(default) else f"{default}{family.general_name_suffix}"
    if not family.general_name.search(model_name):
        raise ValueError(
            f"model_name {model_name!r} must match {family.general_name.pattern!r}: llama.cpp applies "
            f"{family.display}'s special-token rules only when general.name does (src/llama-vocab.cpp)")
    return model_name
