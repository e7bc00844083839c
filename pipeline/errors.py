"""The errors a stage reports to its user: each message says what and where.

The CLI prints them without a traceback and exits with `exit_code`:
2 for bad input (config, data, model files), 1 for a stage that failed.
"""


class PipelineError(Exception):
    exit_code = 1


class BadInputError(PipelineError):
    exit_code = 2


class DataError(BadInputError, ValueError):
    """A dataset problem; the message names the file and line."""


class ModelError(BadInputError):
    """A base model that cannot be found or used."""


class FuseError(PipelineError):
    """A checkpoint that cannot be fused into this base."""


class CheckpointMismatchError(FuseError):
    """A checkpoint made for another model (its soul or LoRA does not fit the base): bad input."""

    exit_code = 2


class ToolchainError(PipelineError):
    """The pinned llama.cpp is missing or one of its tools failed."""


class OllamaError(PipelineError):
    """Ollama is missing, unreachable, or refused the model."""


class SoulError(BadInputError, ValueError):
    """A soul file (soul.safetensors, a seed soul.pt) that cannot be used; the message names it."""
