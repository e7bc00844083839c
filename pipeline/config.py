"""The run configuration: one YAML file, loaded once into typed objects.

`load_config(path)` is the only way in. It reads the YAML (refusing duplicate
keys), checks structure and types with pydantic (unknown keys are errors, no
silent coercion), then checks the values against each other (a schedule that
does not fit the run, a hidden size the soul cannot split into 8x8 blocks).
Every problem is collected and raised together as one `ConfigError` whose
lines each name the file and the key.

Relative paths in a config are resolved against the config file's folder, so
a config means the same thing whatever the current directory is.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pydantic
import yaml
from huggingface_hub import try_to_load_from_cache
from pydantic import BaseModel, ConfigDict, Field

from .basetokenizer import TOKENIZER_FILES, stop_problems, tokenizer_problems
from .constants import CHECKPOINT_MARKER, FUSION_MARKER, GGML_WEIGHT_TYPES, PREPARED_MARKER, QUANT_TYPES, SOUL_BLOCK
from .errors import BadInputError
from .families import Family, UnsupportedBaseError, family_of, gguf_name
from .modeldir import SAFETENSORS_INDEX, context_lengths, folder_problems, is_lfs_pointer, lfs_pointer_problem, tensor_names
from .modelfiles import MODELFILES, family_spec
from .ollama_rules import name_problem, option_problem

PROJECT_DIR = Path(__file__).resolve().parent.parent
# The project's own folders (sources, tools, bundled inputs): no run writes its outputs there.
PROJECT_FOLDERS = ("pipeline", "tests", "scripts", "modelfiles", "requirements", "data", "bench", "docker",
                   ".git", ".venv")


class ConfigError(BadInputError):
    """A config file that cannot be used; `problems` holds one line per key."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{self.path}: {len(problems)} problem(s) in config:\n{lines}")


class _Section(BaseModel):
    # strict: YAML already gives typed values, so "16" for an int is a mistake
    # worth reporting rather than coercing; extra="forbid": a typo is an error.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RunSection(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    build_dir: str = "build"
    seed: int = 42


class ModelSection(_Section):
    base: str = Field(min_length=1)
    revision: str = "main"


class DataSource(_Section):
    """One source of training examples: a local file (`path`) or a hub dataset (`hub`)."""
    path: str | None = Field(default=None, min_length=1)  # .jsonl, .json, .parquet or .csv
    hub: str | None = Field(default=None, min_length=1)  # owner/name, or a local folder laid out as a hub repo
    revision: str = "main"  # hub only: branch, tag or commit
    split: str = "train"  # hub only
    subset: str | None = None  # hub only: the dataset's config name
    format: Literal["auto", "messages", "sharegpt", "alpaca", "text"] = "auto"
    column: str | None = None  # messages format: the chat column (default: messages, conversations or conversation)
    columns: dict[str, str] = Field(default_factory=dict)  # the format's key -> the source's column
    max_examples: int | None = Field(default=None, ge=1)
    # Its license, an SPDX-like id (a hub dataset's card says it; this is for a card without one).
    license: str | None = Field(default=None, min_length=1)
    # The user has checked the source's terms: data.licenses.allow does not refuse it.
    license_acknowledged: bool = False
    # refusal: unsafe requests with refusals, to teach refusing, never generating: every assistant
    # reply must be a refusal (serve.guard's verdict when a guard is configured, else the check in
    # pipeline/data/refusal.py), else the example is dropped and counted.
    purpose: Literal["chat", "refusal"] = "chat"


PiiPolicy = Literal["mask", "drop", "keep"]


class PiiSection(_Section):
    url_credentials: PiiPolicy = "mask"
    email: PiiPolicy = "mask"
    credit_card: PiiPolicy = "drop"
    my_number: PiiPolicy = "drop"
    phone: PiiPolicy = "mask"
    postal_code: PiiPolicy = "mask"
    ip_address: PiiPolicy = "mask"


class DedupSection(_Section):
    exact: bool = True
    near: bool = True
    threshold: float = Field(default=0.85, gt=0, le=1)  # Jaccard similarity of character 5-grams


class LicensesSection(_Section):
    # SPDX-like ids (apache-2.0, cc-by-4.0, ...); a source whose license is unknown or not listed
    # stops `make data` unless it sets license_acknowledged. None: nothing is refused.
    allow: list[str] | None = None


class DataSection(_Section):
    # One path (format auto) or a list of sources.
    train: str | list[DataSource] = Field(min_length=1)
    max_length: int = Field(default=512, ge=8)
    overlong: Literal["truncate_prompt", "drop"] = "truncate_prompt"
    validation_fraction: float = Field(default=0.05, ge=0, lt=1)
    pii: PiiSection = PiiSection()
    # Credentials (API keys, tokens, private keys, password= assignments) in any turn:
    # drop the example, mask each, or keep them (pipeline/data/credentials.py).
    secrets: Literal["drop", "mask", "keep"] = "drop"
    licenses: LicensesSection = LicensesSection()
    # With serve.guard: also ask the guard about every assistant reply of the other sources, and
    # drop the unsafe ones (counted per category in the report).
    guard_replies: bool = False
    dedup: DedupSection = DedupSection()
    packing: bool = False

    @property
    def sources(self) -> list[DataSource]:
        return [DataSource(path=self.train)] if isinstance(self.train, str) else list(self.train)


class LoraSection(_Section):
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    # None: the base family's (pipeline/families.py): Phi-3's fused qkv_proj/gate_up_proj, else
    # the split q/k/v/o and gate/up/down projections.
    target_modules: list[str] | None = Field(default=None, min_length=1)


class TrainSection(_Section):
    quantization: Literal["nf4", "none", "auto"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lora: LoraSection = LoraSection()
    lr: float = Field(default=2e-4, gt=0)
    lr_warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=1, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    steps: int = Field(default=500, ge=1)
    save_every: int = Field(default=100, ge=1)
    eval_every: int = Field(default=0, ge=0)  # validation loss every this many steps (0: never)
    gradient_checkpointing: bool = False


class SoulSection(_Section):
    alpha_start: float = -5.0
    alpha_target: float = 1.618
    warmup_steps: int = Field(default=50, ge=0)
    anneal_steps: int = Field(default=400, ge=0)
    lr: float | None = Field(default=None, gt=0)
    ortho_weight: float = Field(default=0.0, ge=0)
    shared_block: bool = False
    learn_alpha: bool = False


class FuseSection(_Section):
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    merge_base: Literal["original", "dequantized", "auto"] = "auto"


class ImatrixSection(_Section):
    calibration: str | None = None  # text file; None: quantize without an importance matrix
    ctx: int = Field(default=512, ge=16)  # tokens per chunk (the file needs at least two chunks)
    chunks: int | None = Field(default=None, ge=1)  # at most this many chunks (None: all)


class GgufSection(_Section):
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    quantizations: list[str] = Field(default_factory=lambda: ["Q4_K_M"], min_length=1)
    output_tensor_type: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]+$")
    imatrix: ImatrixSection = ImatrixSection()


class FidelitySection(_Section):
    enabled: bool = True
    max_kl_fused: float = Field(default=0.02, ge=0)
    max_kl_converted: float = Field(default=1e-3, ge=0)
    # convert also writes a throwaway f32 GGUF and compares it with the fused model: that
    # isolates the converter and llama.cpp's arithmetic from gguf.outtype's rounding.
    compare_f32: bool = True
    max_kl_converted_f32: float = Field(default=1e-5, ge=0)
    # ...on a model made of the fused model's first layers (the property does not depend on
    # depth; a whole f32 copy of a 3.8B model is a 15 GB temporary).
    f32_slice_layers: int = Field(default=2, ge=1)
    max_kl_quantized: dict[str, float] = Field(
        default_factory=lambda: {"Q8_0": 0.01, "Q6_K": 0.02, "Q5_K_M": 0.05, "Q4_K_M": 0.1})
    max_kl_quantized_default: float = Field(default=0.25, ge=0)


class EvalSection(_Section):
    heldout: str = Field(default="data/heldout_ja.txt", min_length=1)  # plain Japanese text, not trained on
    max_ppl_ratio: float = Field(default=1.10, gt=0)  # bound on trained perplexity / base perplexity
    max_tokens: int = Field(default=4096, ge=2)  # evaluate at most this many held-out tokens
    # tokens per forward pass: llama.cpp ignores Phi-3's sliding window beyond 2047
    chunk_tokens: int = Field(default=1024, ge=2, le=2046)


# The context the Modelfile sets when the config gives no num_ctx: Ollama's smallest VRAM-based
# default (envconfig/config.go: 4096, 32768 or 262144), which is also Phi-3.5's original context.
DEFAULT_NUM_CTX = 4096


class OllamaSection(_Section):
    model: str = "agiasi-borea"  # checked with Ollama's own name rules (ollama_rules.name_problem)
    # A name in modelfiles/, not a path. None: the base family's (from its config.json).
    family: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    template: str | None = None  # a TEMPLATE of your own instead of the family's (needs `stop`)
    stop: list[str] | None = None
    system: str = ""
    # Checked against Ollama's option table (ollama_rules.OPTIONS): name, type, range.
    parameters: dict[str, Any] = Field(default_factory=dict)
    # num_ctx above the model's original context (LongRoPE's long factors for every prompt)
    allow_long_context: bool = False
    # What `make ollama` proves after create. Both: Ollama renders exactly the prompt training saw
    # (_debug_render_only) and stores every stop. strict: a greedy Japanese answer ends by a stop
    # token within 512 tokens, free of raw special tokens (a trained model). smoke: a 16-token
    # greedy answer arrives (a tiny random model may repeat one token, and Ollama aborts a stream
    # that repeats one token more than 30 times, llm/llama_server.go).
    proof: Literal["strict", "smoke"] = "strict"


class GuardSection(_Section):
    """serve.guard: a safety classifier behind an OpenAI-compatible API (pipeline/guard.py)."""
    model: str = Field(min_length=1)  # e.g. llama-guard3:1b or shieldgemma:2b in Ollama
    format: Literal["llama-guard-3", "shieldgemma"] = "llama-guard-3"  # how its answer reads
    backend: str | None = None  # its /v1 base URL; None: the main model's backend
    timeout: float = Field(default=30.0, gt=0, le=600)  # seconds per verdict, then `unavailable`
    # closed: no verdict (guard down, an answer that is no verdict) refuses like unsafe; open: passes.
    fail: Literal["closed", "open"] = "closed"
    # What the client gets instead of an answer when the prompt or the answer is unsafe.
    refusal: str = Field(default="申し訳ありませんが、そのご依頼にはお応えできません。", min_length=1)


class ServeSection(_Section):
    """`python -m pipeline serve` (pipeline/serve.py); its flags override these."""
    host: str = Field(default="127.0.0.1", min_length=1)  # any other address needs AGIASI_SERVE_TOKEN
    port: int = Field(default=8642, ge=1, le=65535)
    backend: str | None = None  # an OpenAI-compatible /v1 base URL; None: Ollama at OLLAMA_HOST
    backend_model: str | None = Field(default=None, min_length=1)  # None: ollama.model
    backend_timeout: float = Field(default=300.0, gt=0)  # seconds the backend may stay silent
    max_body_bytes: int = Field(default=65536, ge=1024)  # larger requests get 413
    # Requests in flight to the backend, /think and /v1 together; past it 429 with Retry-After.
    max_concurrent: int = Field(default=4, ge=1, le=1024)
    # Seconds a /v1 stream may stay silent (the model still thinking) before a `: keep-alive` line.
    keepalive_interval: float = Field(default=15.0, gt=0, le=300)
    guard: GuardSection | None = None  # None: no classifier


class Config(_Section):
    run: RunSection
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection()
    soul: SoulSection = SoulSection()
    fuse: FuseSection = FuseSection()
    gguf: GgufSection = GgufSection()
    fidelity: FidelitySection = FidelitySection()
    ollama: OllamaSection = OllamaSection()
    eval: EvalSection = EvalSection()
    serve: ServeSection = ServeSection()

    # Set by load_config: where the file lives, to resolve relative paths.
    source: Path = Field(default=Path("."), exclude=True)

    def resolve(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self.source.parent / path)

    @property
    def run_dir(self) -> Path:
        return self.resolve(self.run.build_dir) / self.run.name

    # Where each artifact of a run lives; the Makefile gets these from `plan`.
    @property
    def final_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "final"

    @property
    def checkpoint_marker(self) -> Path:
        return self.final_checkpoint / CHECKPOINT_MARKER

    @property
    def fused_dir(self) -> Path:
        return self.run_dir / "fused"

    @property
    def fused_marker(self) -> Path:
        return self.fused_dir / FUSION_MARKER

    @property
    def imatrix_calibration(self) -> Path | None:
        c = self.gguf.imatrix.calibration
        return None if c is None else self.resolve(c)

    @property
    def imatrix_path(self) -> Path | None:
        """The importance matrix quantization uses (None when gguf.imatrix.calibration is unset)."""
        return None if self.gguf.imatrix.calibration is None else self.run_dir / "imatrix.gguf"

    @property
    def gguf_model_name(self) -> str:
        """general.name of the run's GGUFs: the run's name, made to match the family's rule.

        llama.cpp gives Phi-3's special tokens their right-strip (as tokenizer.json
        has it) only when general.name says phi3; without it chat turns tokenize
        differently in llama.cpp and Ollama than in training (families.Family.general_name).
        """
        family = base_family(self)
        return self.run.name if family is None else gguf_name(family, self.run.name, None)

    def gguf_path(self, kind: str) -> Path:
        """kind: the converter's outtype (f16) or a quantization type (Q4_K_M)."""
        return self.run_dir / "gguf" / f"{self.run.name}-{kind.lower()}.gguf"

    @property
    def prepared_dir(self) -> Path:
        """The prepared dataset (train.jsonl, validation.jsonl, data.json): what train reads."""
        return self.run_dir / "data"

    @property
    def prepared_marker(self) -> Path:
        return self.prepared_dir / PREPARED_MARKER

    @property
    def data_report(self) -> Path:
        """Written by every data stage run: what Make takes as `make data` done."""
        return self.reports_dir / "data.json"

    def local_data_files(self) -> list[Path]:
        return [self.resolve(s.path).resolve() for s in self.data.sources if s.path]

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def reports_dir(self) -> Path:
        return self.run_dir / "reports"

    @property
    def plot_paths(self) -> dict[str, Path]:
        return {name: self.reports_dir / f"{name}.png" for name in ("phases", "training")}

    @property
    def heldout_path(self) -> Path:
        return self.resolve(self.eval.heldout)

    @property
    def eval_report(self) -> Path:
        return self.reports_dir / "eval.json"

    @property
    def eval_passed(self) -> Path:
        """Written only when the eval bounds hold: what Make takes as `make eval` done."""
        return self.reports_dir / "eval.passed"

    @property
    def modelfile_path(self) -> Path:
        return self.run_dir / "Modelfile"

    @property
    def served_context(self) -> int:
        """The context length (tokens) Ollama allocates for this run's model.

        The Modelfile and the /api/create parameters always set num_ctx to this, so that no
        server default (OLLAMA_CONTEXT_LENGTH, or 4096/32768/262144 by VRAM) decides it:
        `ollama.parameters.num_ctx` when given, which Ollama lowers to the GGUF's context length
        (max_position_embeddings; llm/server.go NewLlamaServer); else DEFAULT_NUM_CTX, bounded by
        the model's original context. check-config refuses a num_ctx above the original context
        unless `ollama.allow_long_context` (context_problems). A request's own options could
        still override it; the pipeline's requests never do.
        """
        asked = self.ollama.parameters.get("num_ctx")
        known = original_context(self)
        if known is None:
            return int(asked if asked is not None else DEFAULT_NUM_CTX)
        original, longest, _ = known
        return min(int(asked), longest) if asked is not None else min(DEFAULT_NUM_CTX, original)

    @property
    def ollama_stamp(self) -> Path:
        return self.run_dir / "ollama.json"

    @property
    def audit_log(self) -> Path:
        """The /think audit log (pipeline/audit.py): hashes of prompts, answers and thinking."""
        return self.run_dir / "audit" / "think.jsonl"

    @property
    def stamp_dir(self) -> Path:
        return self.run_dir / "stamps"

    def base_is_local(self) -> bool:
        return looks_local(self.model.base) or self.resolve(self.model.base).is_dir()

    def section_digest(self, stage: str) -> str:
        return hashlib.sha256(stage_inputs_json(self, stage).encode()).hexdigest()


def data_uses_guard(cfg: Config) -> bool:
    """Whether `make data` asks serve.guard: for refusal-only sources, and with data.guard_replies."""
    return cfg.serve.guard is not None and (
        cfg.data.guard_replies or any(s.purpose == "refusal" for s in cfg.data.sources))


def looks_local(base: str) -> bool:
    """A hub id is `owner/name`; anything starting like a path is a folder."""
    return base.startswith((".", "/", "~")) or base.count("/") != 1


# Which config keys each stage reads. A stage's stamp holds exactly these
# values, so changing the Ollama system prompt re-runs only the Modelfile and
# registration, and changing a quantization type re-runs only quantize onward.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    # The prepared dataset is tokenizer-independent; what tokenization does with it is train's.
    # The guard's model and format only where `data` asks it (data_uses_guard).
    "data": ("run.seed", "data.train", "data.validation_fraction", "data.pii", "data.secrets", "data.licenses",
             "data.dedup", "data.guard_replies", "serve.guard.model", "serve.guard.format"),
    "train": ("run.seed", "model", "data.max_length", "data.overlong", "data.packing", "train", "soul"),
    # Each gated stage follows its own bound only: a tighter quantize bound re-runs quantize, not fuse.
    "fuse": ("fuse", "fidelity.enabled", "fidelity.max_kl_fused"),
    "convert": ("gguf.outtype", "fidelity.enabled", "fidelity.max_kl_converted", "fidelity.compare_f32",
                "fidelity.max_kl_converted_f32", "fidelity.f32_slice_layers"),
    "imatrix": ("gguf.imatrix",),
    "quantize": ("gguf.output_tensor_type", "gguf.imatrix", "fidelity.enabled", "fidelity.max_kl_quantized",
                 "fidelity.max_kl_quantized_default"),
    "modelfile": ("ollama", "gguf.quantizations"),  # FROM names the first quantization
    "register": ("ollama.model", "ollama.proof"),
    "plots": ("train.steps", "soul"),  # the phase boundaries shaded in the figures
    "eval": ("eval",),
}


def stage_inputs_json(cfg: Config, stage: str) -> str:
    """Canonical JSON of the config values a stage depends on."""
    dumped = cfg.model_dump(mode="json")
    picked: dict[str, Any] = {}
    for key in STAGE_INPUTS[stage]:
        node: Any = dumped
        for part in key.split("."):
            node = None if node is None else node[part]
        picked[key] = node
    if stage == "data" and not data_uses_guard(cfg):
        picked["serve.guard.model"] = picked["serve.guard.format"] = None
    # Paths are compared resolved, so moving the config file with its data
    # does not look like a change while pointing at other data does.
    if "gguf.imatrix" in picked and cfg.gguf.imatrix.calibration:
        picked["gguf.imatrix"] = dict(picked["gguf.imatrix"], calibration=str(cfg.imatrix_calibration.resolve()))
    if stage in ("convert", "quantize"):
        # their gates run llama.cpp at the served context; above the original context that is
        # another model (LongRoPE's long factors), whose report only a new run writes
        known = original_context(cfg)
        picked["long_context"] = bool(known and cfg.served_context > known[0])
    if stage == "eval":
        picked["eval"] = dict(picked["eval"], heldout=str(cfg.heldout_path.resolve()))
    if stage == "data":
        picked["data.train"] = [dict(s.model_dump(mode="json"), path=str(cfg.resolve(s.path).resolve()))
                                if s.path else s.model_dump(mode="json") for s in cfg.data.sources]
    if stage == "train":
        if cfg.base_is_local():
            picked["model"] = dict(picked["model"], base=str(cfg.resolve(cfg.model.base).resolve()))
    return json.dumps(picked, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_config(path: Path | str) -> Config:
    """Load and validate a config file.

    Input: path to a YAML file. Output: a frozen `Config`.
    Raises `ConfigError` listing every problem found (missing file, YAML
    syntax or duplicate keys with their line, unknown keys, wrong types,
    values that do not fit together), each naming its key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, [f"cannot read: {e}"]) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(path, [f"invalid YAML: {e}".replace("\n", " ")]) from None
    if raw is None:
        raise ConfigError(path, ["the file is empty (expected sections run, model, data, ...)"])
    if not isinstance(raw, dict):
        raise ConfigError(path, ["the top level must be a mapping of sections (run, model, data, ...)"])

    try:
        cfg = Config.model_validate({**raw, "source": path.resolve()})
    except pydantic.ValidationError as e:
        problems = []
        for err in e.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(f"{_format_loc(err['loc'])}: {msg}")
        raise ConfigError(path, problems) from None

    problems = _check_values(cfg)
    if problems:
        raise ConfigError(path, problems)
    return cfg


def _check_values(cfg: Config) -> list[str]:
    """Checks that involve more than one key, or the files a key points at."""
    problems: list[str] = []
    t, s = cfg.train, cfg.soul
    if s.warmup_steps + s.anneal_steps > t.steps:
        problems.append(
            f"soul.warmup_steps + soul.anneal_steps ({s.warmup_steps} + {s.anneal_steps}) "
            f"is longer than train.steps ({t.steps}): the schedule would never reach alpha_target"
        )
    if t.save_every > t.steps:
        problems.append(f"train.save_every ({t.save_every}) is larger than train.steps ({t.steps})")
    if t.lr_warmup_steps > t.steps:
        problems.append(f"train.lr_warmup_steps ({t.lr_warmup_steps}) is larger than train.steps ({t.steps})")
    for key in ("alpha_start", "alpha_target"):
        if not math.isfinite(getattr(s, key)):
            problems.append(f"soul.{key}: must be a finite number")
    if len(set(q.upper() for q in cfg.gguf.quantizations)) != len(cfg.gguf.quantizations):
        problems.append("gguf.quantizations: lists a type twice")
    if (cfg.ollama.template is None) != (cfg.ollama.stop is None):
        problems.append("ollama.template and ollama.stop go together: a custom template needs its stop tokens")
    if "stop" in cfg.ollama.parameters:
        problems.append("ollama.parameters.stop: stop tokens come from the chat format (ollama.family or ollama.stop)")
    for q in cfg.gguf.quantizations:
        if q.upper() not in {name.upper() for name in QUANT_TYPES}:
            problems.append(f"gguf.quantizations: {q!r} is not a type llama-quantize knows ({', '.join(QUANT_TYPES)})")
    out_type = cfg.gguf.output_tensor_type
    if out_type is not None and out_type.lower() not in {t.lower() for t in GGML_WEIGHT_TYPES}:
        problems.append(f"gguf.output_tensor_type: {out_type!r} is not a ggml type llama-quantize's "
                        f"--output-tensor-type knows ({', '.join(GGML_WEIGHT_TYPES)})")
    problems.extend(_check_ollama(cfg))
    problems.extend(_check_paths(cfg))
    problems.extend(_check_make_paths(cfg))
    backend = cfg.serve.backend
    if backend is not None and (problem := backend_url_problem(backend)):
        problems.append(f"serve.backend: {backend!r} {problem}")
    problems.extend(_check_guard(cfg))

    problems.extend(_check_sources(cfg))
    calibration = cfg.imatrix_calibration
    if calibration is not None and not calibration.is_file():
        problems.append(f"gguf.imatrix.calibration: file not found: {calibration}")

    if cfg.base_is_local():
        problems.extend(_check_local_base(cfg.resolve(cfg.model.base)))
    problems.extend(_check_lora_targets(cfg))
    problems.extend(_check_base_tokenizer(cfg))
    problems.extend(context_problems(cfg))
    return problems


def _check_guard(cfg: Config) -> list[str]:
    guard = cfg.serve.guard
    if guard is None:
        return ["data.guard_replies: needs serve.guard, the classifier that judges the replies"] \
            if cfg.data.guard_replies else []
    if guard.backend is not None and (problem := backend_url_problem(guard.backend)):
        return [f"serve.guard.backend: {guard.backend!r} {problem}"]
    return []


def backend_url_problem(url: str) -> str | None:
    """Why url is no base URL of an OpenAI-compatible API (None when it is one)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL with a host, e.g. http://127.0.0.1:8080/v1"
    if parts.query or parts.fragment:
        return "must not have a query or fragment (give the API's /v1 base)"
    try:
        parts.port
    except ValueError:
        return "has a port that is not a number from 0 to 65535"
    return None


def _check_ollama(cfg: Config) -> list[str]:
    """The model name by Ollama's rules, each parameter against Ollama's option table, and no
    triple quote in what the Modelfile quotes with it."""
    o = cfg.ollama
    problems = []
    why = name_problem(o.model)
    if why:
        problems.append(f"ollama.model: {o.model!r} is {why}")
    for key, value in o.parameters.items():
        why = option_problem(key, value)
        if key == "stop":  # the chat format's stops are the ones sent (ollama.create_parameters)
            why = "the stops come from the chat format: set ollama.stop (with ollama.template), or the family's Modelfile"
        if why:
            problems.append(f"ollama.parameters.{key}: {why}")
    for key, text in (("ollama.system", o.system), ("ollama.template", o.template or "")):
        if '"""' in text:
            problems.append(f'{key}: must not contain """ (it ends the Modelfile string)')
    for i, stop in enumerate(o.stop or []):
        if not stop or "\n" in stop or '"' in stop:
            problems.append(f"ollama.stop[{i}]: {stop!r} must be non-empty, one line, without a double quote")
    return problems


def model_files(cfg: Config, names: tuple[str, ...]) -> list[Path]:
    """Where the run's model files can be read before anything is built: the fused model's,
    else the local base's, else a hub base's in the Hugging Face cache (at model.revision; nothing
    is downloaded). Returns the first source's files among `names` that exist, or []."""
    folders = [cfg.fused_dir]
    if cfg.base_is_local():
        folders.append(cfg.resolve(cfg.model.base))
    for folder in folders:
        found = [folder / n for n in names if (folder / n).is_file() and not is_lfs_pointer(folder / n)]
        if found:
            return found
    if cfg.base_is_local():
        return []
    cached = [try_to_load_from_cache(cfg.model.base, n, revision=cfg.model.revision) for n in names]
    return [Path(c) for c in cached if isinstance(c, str)]


def base_family(cfg: Config) -> Family | None:
    """The run's model family, from the config.json at hand (model_files: the fused model's, the
    local base's, or a hub base's in the cache), or None when none is at hand or it is not a
    supported family (check_base_architecture reports that)."""
    files = model_files(cfg, ("config.json",))
    try:
        return family_of(json.loads(files[0].read_text(encoding="utf-8"))) if files else None
    except (OSError, ValueError):
        return None


def lora_targets(cfg: Config) -> list[str] | None:
    """train.lora.target_modules, else the base family's; None when neither is known yet."""
    if cfg.train.lora.target_modules is not None:
        return list(cfg.train.lora.target_modules)
    family = base_family(cfg)
    return list(family.lora_targets) if family else None


def modelfile_family(cfg: Config) -> str | None:
    """The modelfiles/<name>.Modelfile of the run's chat format: ollama.family, else the base
    family's; None when neither is known yet (a hub base not in the cache)."""
    if cfg.ollama.family is not None:
        return cfg.ollama.family
    family = base_family(cfg)
    return family.modelfile if family else None


def chat_format_stops(cfg: Config) -> tuple[list[str], str] | None:
    """The chat format's stops and where they come from (ollama.stop, or the Modelfile of
    ollama.family or of the base's family); None when that Modelfile is not known or missing
    (_check_paths reports a missing one)."""
    if cfg.ollama.stop is not None:
        return list(cfg.ollama.stop), "ollama.stop"
    family = modelfile_family(cfg)
    if family is None or not (MODELFILES / f"{family}.Modelfile").is_file():
        return None
    chosen = "ollama.family" if cfg.ollama.family is not None else "the base's family's default"
    return family_spec(family)[1], f"modelfiles/{family}.Modelfile ({chosen})"


def _check_base_tokenizer(cfg: Config) -> list[str]:
    """The base's tokenizer files at hand (model_files) against what llama.cpp can serve and
    against the chat format's end-of-turn stop (pipeline.basetokenizer)."""
    files = model_files(cfg, TOKENIZER_FILES)
    if not files:
        return []
    stops = chat_format_stops(cfg)
    return tokenizer_problems(files) + (stop_problems(files, *stops) if stops else [])


def original_context(cfg: Config) -> tuple[int, int, Path] | None:
    """(original context, max positions, config.json read) of the served model, or None when
    no config.json is at hand yet (modeldir.context_lengths)."""
    files = model_files(cfg, ("config.json",))
    known = context_lengths(files[0].parent) if files else None
    return (*known, files[0]) if known else None


def context_problems(cfg: Config) -> list[str]:
    """num_ctx (cfg.served_context) against the model's own context.

    Above the original context llama.cpp, which Ollama runs for phi3, switches every prompt to
    LongRoPE's long factors (it picks them by the allocated context, not the prompt), so Ollama
    would serve a different model from the one the gate checked: refused unless
    `ollama.allow_long_context: true`. Above max_position_embeddings it is always refused.
    """
    num_ctx = cfg.ollama.parameters.get("num_ctx", DEFAULT_NUM_CTX)
    known = None if option_problem("num_ctx", num_ctx) else original_context(cfg)
    if known is None:
        return []  # a num_ctx of the wrong type is reported by _check_ollama
    original, longest, where = known
    if num_ctx > longest:
        return [f"ollama.parameters.num_ctx: {num_ctx} is above the model's max_position_embeddings "
                f"{longest} ({where}); Ollama would cut it to {longest}. Allowed: 1 to {original}, "
                f"or up to {longest} with ollama.allow_long_context: true"]
    if cfg.served_context > original and not cfg.ollama.allow_long_context:
        return [f"ollama.parameters.num_ctx: {num_ctx} is above the model's original context {original} "
                f"(original_max_position_embeddings in {where}): llama.cpp then uses LongRoPE's long "
                f"factors for every prompt, a different model from the one trained at {original}. "
                f"Allowed: 1 to {original}, or set ollama.allow_long_context: true to accept it"]
    return []


def _check_lora_targets(cfg: Config) -> list[str]:
    """train.lora.target_modules against the base's module names, from its safetensors index or
    headers (a local base, or one in the Hugging Face cache). PEFT matches a target when a module's
    full name equals it or ends with "." + it; the modules are those that own a .weight tensor."""
    files = model_files(cfg, (SAFETENSORS_INDEX, "model.safetensors"))
    names = tensor_names(files[:1]) if files else None
    if names is None:
        return []
    modules = {n[: -len(".weight")] for n in names if n.endswith(".weight")}
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return [f"train.lora.target_modules: {t!r} is no module of the base ({files[0].name}); "
            f"its modules: {', '.join(leaves)}"
            for t in lora_targets(cfg) or ()
            if not any(m == t or m.endswith("." + t) for m in modules)]


def _check_paths(cfg: Config) -> list[str]:
    """Where paths may point: a run replaces and deletes what lies in its run folder, so that folder
    holds no input and is none of the project's own; the family names a template in modelfiles/."""
    problems = []
    run_dir = cfg.run_dir.resolve()
    if run_dir == PROJECT_DIR:
        problems.append(f"run.build_dir: the run folder {run_dir} is the project folder itself")
    for name in PROJECT_FOLDERS:
        folder = PROJECT_DIR / name
        if run_dir == folder or folder in run_dir.parents:
            problems.append(f"run.build_dir: the run folder {run_dir} lies inside the project's {name}/, "
                            "which is not for build outputs")
    for key, path in _local_inputs(cfg).items():
        resolved = path.resolve()
        if resolved == run_dir or run_dir in resolved.parents:
            problems.append(f"{key}: {path} lies inside the run folder {run_dir}, "
                            "whose contents the pipeline replaces and deletes")
    family = modelfile_family(cfg)
    if cfg.ollama.template is None and family and not (MODELFILES / f"{family}.Modelfile").is_file():
        known = sorted(p.stem for p in MODELFILES.glob("*.Modelfile"))
        problems.append(f"ollama.family: no template modelfiles/{family}.Modelfile "
                        f"(known: {', '.join(known)})")
    return problems


def _local_inputs(cfg: Config) -> dict[str, Path]:
    """key -> path of each local training input: the data files, and the base when it is a folder."""
    inputs = {key: cfg.resolve(s.path) for key, s in _source_keys(cfg) if s.path}
    if cfg.base_is_local():
        inputs["model.base"] = cfg.resolve(cfg.model.base)
    return inputs


# What make reads in a file name as syntax, besides whitespace (which separates names): '#' starts a
# comment in plan.mk, '$' a variable, '%' a pattern, ':' ';' '|' a rule's parts, '*' '?' a glob, and
# '"' ends a recipe's quoted text. Make has no escape for these that survives its own functions.
MAKE_SYNTAX = '#$%:;|*?"'


def make_path(path: Path) -> str:
    """`path` as pipeline.mk names it: relative to the project folder when it lies inside it (make
    runs there), so that where the clone itself lives (a home folder with a space) never reaches
    make; else absolute. Paths with `..` or links are resolved first."""
    resolved = path.resolve()
    return str(resolved.relative_to(PROJECT_DIR)) if resolved.is_relative_to(PROJECT_DIR) else str(resolved)


def make_name_problem(name: str) -> str | None:
    """What in `name` make cannot take in a file name ("a space", "'#'"), or None."""
    if any(c.isspace() for c in name):
        return "a space"
    found = [c for c in MAKE_SYNTAX if c in name]
    return " and ".join(repr(c) for c in found) if found else None


def _check_make_paths(cfg: Config) -> list[str]:
    """Each file make is given (the run's artifacts, the inputs plan.mk lists) as make names it
    (make_path): refused here, naming the key, rather than failing later as "No rule to make target"."""
    inputs = _local_inputs(cfg)
    if cfg.imatrix_calibration is not None:
        inputs["gguf.imatrix.calibration"] = cfg.imatrix_calibration
    inputs["eval.heldout"] = cfg.heldout_path
    problems = []
    if problem := make_name_problem(make_path(cfg.run_dir)):
        problems.append(f"run.build_dir: the run folder {cfg.run_dir.resolve()} has {problem} in its path, which "
                        f"make cannot take in a file name; set run.build_dir to a folder whose path has none "
                        f"(inside the project folder, such as the default build, only the part below it counts)")
    for key, path in inputs.items():
        if problem := make_name_problem(make_path(path)):
            problems.append(f"{key}: {path.resolve()} has {problem} in its path, which make cannot take in a "
                            f"file name; move or copy it where its path has none (inside the project folder, only "
                            f"the part below it counts)")
    return problems


def _source_keys(cfg: Config) -> list[tuple[str, DataSource]]:
    """Each source with the key that names it in messages: data.train, or data.train[i]."""
    if isinstance(cfg.data.train, str):
        return [("data.train", cfg.data.sources[0])]
    return [(f"data.train[{i}]", s) for i, s in enumerate(cfg.data.train)]


def _check_sources(cfg: Config) -> list[str]:
    """Each source names one file that exists (of a known type) or one hub dataset."""
    problems = []
    for key, s in _source_keys(cfg):
        if (s.path is None) == (s.hub is None):
            problems.append(f"{key}: give exactly one of path (a local file) or hub (a hub dataset)")
            continue
        if s.path is not None:
            hub_only = [k for k in ("revision", "split", "subset") if k in s.model_fields_set]
            if hub_only:
                problems.append(f"{key}: {', '.join(hub_only)} apply to hub datasets only")
            data = cfg.resolve(s.path)
            if data.is_dir():
                problems.append(f"{key}: {data} is a folder, not a data file (.jsonl, .json, .parquet, .csv)")
            elif not data.is_file():
                problems.append(f"{key}: file not found: {data}")
            elif data.suffix.lower() not in (".jsonl", ".json", ".parquet", ".csv"):
                problems.append(f"{key}: {data} is not a .jsonl, .json, .parquet or .csv file")
        if s.column is not None and s.format != "messages":
            problems.append(f"{key}.column: applies to format messages only (this source is {s.format})")
    return problems


def _check_local_base(base: Path) -> list[str]:
    cfg_file = base / "config.json"
    if not base.exists():
        return [f"model.base: folder not found: {base}"]
    if is_lfs_pointer(base):
        return [lfs_pointer_problem(base)]
    if not cfg_file.is_file():
        return [f"model.base: {base} is not a Hugging Face model folder (no config.json)"]
    problems = folder_problems(base)  # weights and tokenizer: pointers, truncation, absence
    if is_lfs_pointer(cfg_file):
        return problems
    try:
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"model.base: cannot read {cfg_file}: {e}"] + problems
    if not isinstance(hf, dict):
        return [f"model.base: {cfg_file} is not a JSON object"] + problems
    return check_base_architecture(hf, str(cfg_file)) + problems


def check_base_architecture(hf: dict[str, Any], where: str) -> list[str]:
    """Problems that make a base model unusable for this pipeline: a family it does not support
    or refuses (pipeline/families.py), a hidden size the soul cannot rotate."""
    problems = []
    try:
        family_of(hf, where)
    except UnsupportedBaseError as err:
        problems.append(f"model.base: {err}")
    hidden = hf.get("hidden_size")
    if not isinstance(hidden, int) or hidden % SOUL_BLOCK:
        problems.append(
            f"model.base: hidden_size {hidden} in {where} is not divisible by {SOUL_BLOCK} "
            f"(the soul rotates {SOUL_BLOCK}x{SOUL_BLOCK} blocks)"
        )
    return problems
