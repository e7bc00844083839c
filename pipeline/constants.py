"""Names and tables that several layers share, with nothing below them.

The config checks values against the llama.cpp tables, the toolchain runs
them, integrity and the stages find folders by their markers: keeping these
here lets each of those import them from below, with no cycle.
"""

SOUL_BLOCK = 8  # the soul rotates the hidden state in independent 8x8 blocks
CHECKPOINT_MARKER = "checkpoint.json"  # written last into a complete checkpoint folder
FUSION_MARKER = "fusion.json"  # written last into a complete fused model folder
PREPARED_MARKER = "data.json"  # written last into the prepared dataset folder (train.jsonl, validation.jsonl)

# What convert_hf_to_gguf.py's --outtype accepts. The k-quants are not here:
# they need llama-quantize after conversion.
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0", "auto")

# llama-quantize's type names (QUANT_OPTIONS in tools/quantize/quantize.cpp at
# the pinned commit, same order). Q4_K, Q5_K and Q3_K are its aliases for the
# _M mixes; COPY rewrites the file without quantizing. The very low-bit IQ
# types need an importance matrix, which quantize() does not pass: for them
# llama-quantize fails (ToolRunError). A test compares this list with the one
# the built binary prints.
QUANT_TYPES = (
    "Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0",
    "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q3_K", "IQ3_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L",
    "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
    "F16", "BF16", "F32", "COPY",
)

# What llama-quantize's --output-tensor-type accepts: a ggml type name (ggml_type_name, matched
# case-insensitively by parse_ggml_type in tools/quantize/quantize.cpp), not a file-type mix such
# as Q4_K_M. Only the types a weight can be stored in (type_traits in ggml/src/ggml.c at the pinned
# commit, without the integer types, f64, the dot-product-only q8_1/q8_K and the removed ones).
GGML_WEIGHT_TYPES = (
    "f32", "f16", "bf16", "q1_0", "q2_0", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "mxfp4", "nvfp4",
    "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq2_xxs", "iq2_xs", "iq3_xxs", "iq3_s", "iq2_s",
    "iq1_s", "iq1_m", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0",
)

# Tokens past a LongRoPE model's original context at which the fidelity gate reports the
# long-factor model (one KV-cache block: llama.cpp picks the factors by the context alone).
LONG_CONTEXT_PROBE = 256
