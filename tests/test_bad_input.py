"""Bad input corpus: every case is refused by the real CLI (and a few by make) with a
clear error naming what is wrong, a non-zero exit, no traceback, and no artifact.

Each case builds its bad input under its own tmp_path and returns the command to
run; nothing under tmp_path may appear or change while the command runs (no
checkpoint, fused model, GGUF or Modelfile, nothing half-written). The checks
cost what the pipeline does before refusing: most cases stop at config
validation (no torch import), the data and model cases at the start of `train`.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, small_config, write_config

pytestmark = pytest.mark.reliability("bad-input")

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "こんにちは。"},
                                     {"role": "assistant", "content": "こんにちは。"}]}, ensure_ascii=False)
LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 7340032\n")


@dataclass
class Env:
    """What a case builds on: its own folder and the shared read-only base models."""

    tmp: Path
    bases: dict[str, Path]

    @property
    def build(self) -> Path:
        return self.tmp / "build"

    @property
    def run_dir(self) -> Path:
        return self.build / "t"

    def config(self, base: Path | None = None, **overrides) -> Path:
        """The small test config (tiny Phi-3 unless `base`), with `overrides` merged in."""
        # Relative paths of the shipped demo config (data/...) resolve next to the config file.
        if not (self.tmp / "data").exists():
            (self.tmp / "data").symlink_to(REPO / "data", target_is_directory=True)
        return write_config(self.tmp / "cfg.yaml", small_config(base or self.bases["phi3"], self.build, **overrides))

    def raw_config(self, text: str | bytes) -> Path:
        path = self.tmp / "cfg.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    def base_copy(self, name: str = "base") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.bases["phi3"], dst)
        return dst

    def jsonl(self, text: str | bytes, steps: int = 1) -> Path:
        """A config training `steps` steps on a dataset of the given content (bad.jsonl)."""
        data = self.tmp / "bad.jsonl"
        data.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return self.config(data={"train": str(data)}, train={"steps": steps, "save_every": steps},
                           soul={"warmup_steps": 0, "anneal_steps": steps})


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Env], list[str]]  # writes the bad input; returns the pipeline command line
    # Substrings the error must contain; a tuple inside means any one of them.
    expect: tuple[str | tuple[str, ...], ...]
    exit_code: int | None = 2  # BadInputError; 1 where a stage refuses (FuseError, ToolchainError); None: any but 0
    env: dict[str, str] = field(default_factory=dict)


def cfg_case(name: str, overrides: dict, *expect: str, command: str = "check-config") -> Case:
    return Case(name, lambda e: [command, "--config", str(e.config(**overrides))], expect)


def without(section: str) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        cfg = small_config(e.bases["phi3"], e.build)
        del cfg[section]
        return ["check-config", "--config", str(write_config(e.tmp / "cfg.yaml", cfg))]
    return build


def duplicate_key(e: Env) -> list[str]:
    text = e.config().read_text(encoding="utf-8")
    lines = text.splitlines()
    at = lines.index("train:") + 1
    lines.insert(at, "  steps: 3")  # train.steps appears again further down
    return ["check-config", "--config", str(e.raw_config("\n".join(lines) + "\n"))]


def base_variant(mutate: Callable[[Path], object], command: str = "check-config") -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        base = e.base_copy()
        mutate(base)
        return [command, "--config", str(e.config(base=base))]
    return build


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def shard_index(base: Path) -> None:
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))


def lfs_base_file(e: Env) -> list[str]:
    pointer = e.tmp / "tiny-phi3"
    pointer.write_text(LFS_POINTER)
    return ["check-config", "--config", str(e.config(base=pointer))]


def inside_run(key: str) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        if key == "model.base":
            base = e.run_dir / "fused"
            shutil.copytree(e.bases["phi3"], base)
            return ["plan", "--config", str(e.config(base=base))]
        data = e.run_dir / "data.jsonl"
        data.parent.mkdir(parents=True)
        data.write_text(GOOD_LINE + "\n")
        return ["plan", "--config", str(e.config(data={"train": str(data)}))]
    return build


def gguf_header(version: int = 3, tensors: int = 1) -> bytes:
    """A GGUF header announcing `tensors` F32 tensors of 1024 elements, with no tensor data."""
    out = b"GGUF" + struct.pack("<IQQ", version, tensors, 0)
    for i in range(tensors):
        name = f"t{i}".encode()
        out += struct.pack("<Q", len(name)) + name + struct.pack("<I", 1) + struct.pack("<Q", 1024)
        out += struct.pack("<IQ", 0, i * 4096)
    return out


def gguf_case(stage: str, kind: str, content: bytes) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        cfg = e.config()
        path = e.run_dir / "gguf" / f"t-{kind}.gguf"
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        return [stage, "--config", str(cfg)] + (["--type", "Q4_K_M"] if stage == "quantize" else [])
    return build


def seed_soul(content: Callable[[], object] | bytes, *extra: str) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        import torch

        path = e.tmp / "soul.pt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content(), path)
        return ["import-soul", str(path), "--out", str(e.tmp / "soul.safetensors"), *extra]
    return build


def rotation(blocks: int):
    import torch

    from pipeline.soul import rotation_from_generator

    return rotation_from_generator(torch.randn(blocks, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1)


def fake_checkpoint(e: Env, soul_blocks: int | None, adapter: str = "safetensors") -> Path:
    """A complete-looking checkpoint folder: empty LoRA adapter, and a soul of `soul_blocks` blocks
    (None: garbage bytes)."""
    import torch
    from safetensors.torch import save_file

    from pipeline.soul import SO8Soul, save_soul

    ckpt = e.tmp / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    if adapter == "safetensors":
        save_file({}, str(ckpt / "adapter_model.safetensors"))
    else:
        torch.save({}, ckpt / "adapter_model.bin")
    if soul_blocks is None:
        (ckpt / "soul.safetensors").write_bytes(b"\x00" * 100)
    else:
        save_soul(ckpt / "soul.safetensors", SO8Soul(soul_blocks * 8), step=1)
    (ckpt / "checkpoint.json").write_text(json.dumps(
        {"step": 1, "base": str(e.bases["phi3"]), "quantization": "none", "nf4": None}))
    return ckpt


def fuse_case(soul_blocks: int | None) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        cfg = e.config(fidelity={"enabled": False}, fuse={"merge_base": "original"})
        return ["fuse", "--config", str(cfg), "--checkpoint", str(fake_checkpoint(e, soul_blocks)),
                "--out", str(e.tmp / "fused")]
    return build


def chat_pickled_adapter(e: Env) -> list[str]:
    return ["chat", "--checkpoint", str(fake_checkpoint(e, 32, adapter="bin")), "--prompt", "hi"]


SCHEDULE = {"train": {"steps": 6, "save_every": 3}}
CASES = [
    # -- the config file itself ------------------------------------------------
    Case("config-not-found", lambda e: ["check-config", "--config", str(e.tmp / "absent.yaml")],
         ("absent.yaml", "file not found")),
    Case("config-empty", lambda e: ["plan", "--config", str(e.raw_config(""))], ("cfg.yaml", "the file is empty")),
    Case("config-is-a-list", lambda e: ["check-config", "--config", str(e.raw_config("- run\n- model\n"))],
         ("the top level must be a mapping",)),
    Case("config-yaml-syntax", lambda e: ["check-config", "--config", str(e.raw_config("run:\n  name: t\nmodel: [base\n"))],
         ("invalid YAML", "line 4")),
    Case("config-duplicate-key", duplicate_key, ("duplicate key 'steps'",)),
    Case("config-not-utf8", lambda e: ["check-config", "--config", str(e.raw_config(b"run:\n  name: \xff\xfe\n"))],
         ("cfg.yaml", "cannot read")),
    Case("config-missing-section", without("model"), ("model: required key is missing",)),
    # -- keys and types ---------------------------------------------------------
    cfg_case("unknown-top-level-key", {"trian": {}}, "trian: unknown key"),
    cfg_case("unknown-nested-key", {"train": {"lora": {"rank": 8}}}, "train.lora.rank: unknown key", command="plan"),
    cfg_case("int-given-as-string", {"train": {"steps": "500"}}, "train.steps: Input should be a valid integer"),
    cfg_case("number-given-as-word", {"train": {"lr": "fast"}}, "train.lr: Input should be a valid number"),
    cfg_case("bool-given-as-word", {"train": {"gradient_checkpointing": "yes"}}, "train.gradient_checkpointing"),
    cfg_case("section-not-a-mapping", {"soul": 5}, "soul: Input should be a valid dictionary"),
    cfg_case("negative-lr", {"train": {"lr": -1e-4}}, "train.lr: Input should be greater than 0"),
    cfg_case("zero-steps", {"train": {"steps": 0}}, "train.steps: Input should be greater than or equal to 1",
             command="train"),
    cfg_case("zero-batch-size", {"train": {"batch_size": 0}}, "train.batch_size"),
    cfg_case("dropout-above-one", {"train": {"lora": {"dropout": 1.5}}}, "train.lora.dropout"),
    cfg_case("max-length-too-small", {"data": {"max_length": 4}}, "data.max_length"),
    cfg_case("alpha-not-finite", {"soul": {"alpha_target": float("nan")}}, "soul.alpha_target: must be a finite number"),
    # -- values that do not fit together ------------------------------------------
    cfg_case("schedule-longer-than-run", {**SCHEDULE, "soul": {"warmup_steps": 5, "anneal_steps": 10}},
             "soul.warmup_steps + soul.anneal_steps (5 + 10) is longer than train.steps (6)", command="train"),
    cfg_case("save-every-beyond-steps", {"train": {"save_every": 100}}, "train.save_every (100)"),
    cfg_case("lr-warmup-beyond-steps", {"train": {"lr_warmup_steps": 100}}, "train.lr_warmup_steps (100)"),
    cfg_case("unknown-quant-type", {"gguf": {"quantizations": ["Q4_K_X"]}},
             "gguf.quantizations: 'Q4_K_X' is not a type llama-quantize knows"),
    cfg_case("quant-type-twice", {"gguf": {"quantizations": ["Q4_K_M", "q4_k_m"]}}, "gguf.quantizations: lists a type twice"),
    cfg_case("converter-outtype-k-quant", {"gguf": {"outtype": "q4_k_m"}}, "gguf.outtype"),
    cfg_case("unknown-fuse-dtype", {"fuse": {"dtype": "fp8"}}, "fuse.dtype"),
    cfg_case("unknown-compute-dtype", {"train": {"compute_dtype": "fp8"}}, "train.compute_dtype"),
    cfg_case("unknown-quantization-mode", {"train": {"quantization": "int3"}}, "train.quantization"),
    cfg_case("template-without-stops", {"ollama": {"template": "{{ .Prompt }}"}}, "ollama.template and ollama.stop"),
    cfg_case("ollama-model-name", {"ollama": {"model": "Has Spaces"}}, "ollama.model"),
    cfg_case("ollama-model-cloud-suffix", {"ollama": {"model": "agiasi:cloud"}}, "ollama.model", "cloud"),
    cfg_case("ollama-parameter-string-for-number", {"ollama": {"parameters": {"num_ctx": "4096"}}},
             "ollama.parameters.num_ctx: must be an integer"),
    cfg_case("ollama-parameter-misspelled", {"ollama": {"parameters": {"num_context": 4096}}},
             "ollama.parameters.num_context: unknown parameter", "num_ctx"),
    cfg_case("ollama-num-ctx-above-model", {"ollama": {"parameters": {"num_ctx": 8192}}},
             "ollama.parameters.num_ctx: 8192 is above", "Allowed: 1 to"),
    cfg_case("ollama-parameter-out-of-range", {"ollama": {"parameters": {"top_p": 1.5}}},
             "ollama.parameters.top_p: must be <= 1"),
    cfg_case("ollama-parameter-string-for-bool", {"ollama": {"parameters": {"use_mmap": "yes"}}},
             "ollama.parameters.use_mmap: must be true or false"),
    cfg_case("ollama-parameter-stop", {"ollama": {"parameters": {"stop": ["<|end|>"]}}},
             "ollama.parameters.stop: the stops come from the chat format", "ollama.stop"),
    cfg_case("output-tensor-type-unknown", {"gguf": {"output_tensor_type": "Q4_K_M"}},
             "gguf.output_tensor_type: 'Q4_K_M' is not a ggml type", "q8_0"),
    cfg_case("lora-target-not-in-base", {"train": {"lora": {"target_modules": ["q_proj"]}}},
             "train.lora.target_modules: 'q_proj' is no module of the base", "qkv_proj"),
    cfg_case("unknown-family", {"ollama": {"family": "gemma"}}, "ollama.family: no template modelfiles/gemma.Modelfile"),
    # -- paths --------------------------------------------------------------------
    cfg_case("missing-base-folder", {"model": {"base": "./no-such-model"}}, "model.base: folder not found", "no-such-model"),
    cfg_case("missing-data-file", {"data": {"train": "no/such/file.jsonl"}}, "data.train: file not found", "file.jsonl"),
    Case("data-is-a-folder", lambda e: ["check-config", "--config", str(e.config(data={"train": str(e.tmp)}))],
         ("data.train:", "is a folder")),
    cfg_case("run-name-escapes", {"run": {"name": "../escape"}}, "run.name: String should match pattern"),
    cfg_case("family-is-a-path", {"ollama": {"family": "../../../tmp/x"}}, "ollama.family: String should match pattern"),
    cfg_case("build-dir-in-project-sources", {"run": {"build_dir": str(REPO / "pipeline")}},
             "run.build_dir", "lies inside the project's pipeline/", command="plan"),
    Case("base-inside-run-folder", inside_run("model.base"), ("model.base:", "lies inside the run folder")),
    Case("data-inside-run-folder", inside_run("data.train"), ("data.train:", "lies inside the run folder")),
    # -- the base model -------------------------------------------------------------
    Case("base-gemma2-architecture", lambda e: ["check-config", "--config", str(e.config(base=e.bases["gemma2"]))],
         ("Gemma2ForCausalLM", "drops lm_head.weight", "would vanish")),
    # llm-jp-3 and sarashina2: Llama on SentencePiece Unigram vocabularies (pipeline/basetokenizer.py)
    Case("base-llmjp3-unigram-tokenizer-json",
         lambda e: ["check-config", "--config", str(e.config(base=e.bases["llmjp3"]))],
         ("tokenizer.json holds a Unigram model", "no tokenizer.model", "get_vocab_base_pre",
          "modelfiles/llama3.Modelfile (the base's family's default): its end-of-turn stop '<|eot_id|>'",
          "ollama.template")),
    Case("base-sarashina2-unigram-tokenizer-model",
         lambda e: ["check-config", "--config", str(e.config(
             base=e.bases["sarashina2"], ollama={"template": "{{ .Prompt }}", "stop": ["</s>", "<|user|>"]}))],
         ("tokenizer.model is a SentencePiece Unigram model", "llm_tokenizer_spm")),
    Case("chat-format-of-another-tokenizer",
         lambda e: ["check-config", "--config", str(e.config(ollama={"family": "qwen2"}))],
         ("modelfiles/qwen2.Modelfile (ollama.family): its end-of-turn stop '<|im_end|>' is no token",
          "tokenizer.json", "ollama.stop")),
    Case("custom-stop-of-another-tokenizer",
         lambda e: ["check-config", "--config", str(e.config(
             ollama={"template": "{{ .Prompt }}", "stop": ["### 指示:", "<|eot_id|>", "<|end|>"]}))],
         ("ollama.stop: its end-of-turn stop '<|eot_id|>' is no token",)),
    Case("base-gpt2-architecture", lambda e: ["train", "--config", str(e.config(base=e.bases["gpt2"]))],
         ("GPT2LMHeadModel", "supported architectures: Phi3ForCausalLM, LlamaForCausalLM")),
    Case("base-hidden-36", lambda e: ["train", "--config", str(e.config(base=e.bases["hidden36"]))],
         ("hidden_size 36", "not divisible by 8")),
    Case("base-without-config-json", base_variant(lambda b: (b / "config.json").unlink()), ("no config.json",)),
    Case("base-config-json-broken", base_variant(lambda b: (b / "config.json").write_text("{'not': json")),
         ("model.base: cannot read", "config.json")),
    Case("base-weights-lfs-pointer", base_variant(lambda b: (b / "model.safetensors").write_text(LFS_POINTER), "train"),
         ("model.safetensors is a git-lfs pointer file", "git lfs pull")),
    Case("base-config-lfs-pointer", base_variant(lambda b: (b / "config.json").write_text(LFS_POINTER)),
         ("config.json is a git-lfs pointer file",)),
    Case("base-is-an-lfs-pointer-file", lfs_base_file, ("tiny-phi3 is a git-lfs pointer file",)),
    Case("base-weights-truncated", base_variant(lambda b: truncate(b / "model.safetensors", 100_000), "train"),
         ("model.safetensors is truncated",)),
    Case("base-weights-not-safetensors", base_variant(lambda b: (b / "model.safetensors").write_bytes(b"\x80\x02}q\x00.")),
         ("model.safetensors is not a safetensors file",)),
    Case("base-only-bin-weights", base_variant(lambda b: (b / "model.safetensors").rename(b / "pytorch_model.bin")),
         ("no .safetensors weights",)),
    Case("base-missing-shard", base_variant(shard_index), ("names the shard model-00002-of-00002.safetensors",)),
    Case("base-without-tokenizer", base_variant(
        lambda b: [(b / n).unlink() for n in ("tokenizer.json", "tokenizer.model")], "train"), ("has no tokenizer",)),
    # -- the dataset (read when training starts) ---------------------------------------
    Case("jsonl-bad-json", lambda e: ["train", "--config", str(e.jsonl(f"{GOOD_LINE}\n{GOOD_LINE}\n{{\"messages\": [oops\n"))],
         ("bad.jsonl:3: invalid JSON",)),
    Case("jsonl-no-messages", lambda e: ["train", "--config", str(e.jsonl(f'{GOOD_LINE}\n{{"prompt": "x"}}\n'))],
         ("bad.jsonl:2:", 'exactly one of "messages" or "text"')),
    Case("jsonl-unknown-role", lambda e: ["train", "--config", str(e.jsonl(
        GOOD_LINE + '\n{"messages": [{"role": "bot", "content": "x"}]}\n'))], ("bad.jsonl:2:", "unknown role 'bot'")),
    Case("jsonl-no-assistant", lambda e: ["train", "--config", str(e.jsonl(
        '{"messages": [{"role": "user", "content": "x"}]}\n'))], ("bad.jsonl:1:", "no assistant message")),
    Case("jsonl-content-not-string", lambda e: ["train", "--config", str(e.jsonl(
        '{"messages": [{"role": "assistant", "content": 5}]}\n'))], ("bad.jsonl:1:", "content must be a string")),
    Case("jsonl-line-is-array", lambda e: ["train", "--config", str(e.jsonl("[1, 2]\n"))], ("bad.jsonl:1:",)),
    Case("jsonl-empty", lambda e: ["train", "--config", str(e.jsonl("\n\n"))], ("bad.jsonl", "no examples")),
    Case("jsonl-not-utf8", lambda e: ["train", "--config", str(e.jsonl(
        GOOD_LINE.encode() + b"\n" + b'{"text": "\xff\xfe"}\n'))], ("bad.jsonl:2: not UTF-8",)),
    # -- GGUF files a stage consumes -------------------------------------------------------
    # The converted GGUF is the run's own artifact: the quantize stage refuses it either for
    # its header or because no sidecar says this pipeline wrote it (and removes it).
    Case("quantize-gguf-bad-magic", gguf_case("quantize", "f16", b"GGML" + b"\x00" * 60),
         ("t-f16.gguf", ("not a GGUF file (bad magic)", "t-f16.gguf.sha256")), exit_code=None),
    Case("quantize-gguf-truncated", gguf_case("quantize", "f16", gguf_header()),
         ("t-f16.gguf", ("truncated GGUF", "t-f16.gguf.sha256")), exit_code=None),
    Case("quantize-gguf-old-version", gguf_case("quantize", "f16", gguf_header(version=1)),
         ("t-f16.gguf", ("unsupported GGUF version 1", "t-f16.gguf.sha256")), exit_code=None),
    Case("modelfile-gguf-bad-magic", gguf_case("modelfile", "q4_k_m", b"\x89PNG\r\n\x1a\n" + b"\x00" * 60),
         ("t-q4_k_m.gguf: not a GGUF file (bad magic)",)),
    Case("register-gguf-bad-magic", gguf_case("register", "q4_k_m", b"GGUX" + b"\x00" * 60),
         ("t-q4_k_m.gguf: not a GGUF file (bad magic)",), env={"OLLAMA_HOST": "127.0.0.1:9"}),
    Case("quantize-type-not-configured", lambda e: ["quantize", "--config", str(e.config()), "--type", "Q2_K"],
         ("gguf.quantizations does not list 'Q2_K'",)),
    # -- souls and checkpoints ----------------------------------------------------------------
    Case("seed-soul-wrong-shape", seed_soul(lambda: {"alpha": 1.0, "so8_rotation": __import__("torch").eye(8)[:3]}),
         ("soul.pt: so8_rotation has shape [3, 8]",)),
    Case("seed-soul-wrong-size", seed_soul(lambda: {"alpha": 1.0, "so8_rotation": rotation(4)}, "--hidden-size", "48"),
         ("soul.pt: 4 blocks of 8 do not fit hidden size 48",)),
    Case("seed-soul-not-a-rotation", seed_soul(lambda: {"alpha": 0.0, "so8_rotation": 2 * rotation(2)}),
         ("soul.pt: the rotation is not in SO(8)",)),
    Case("seed-soul-missing-keys", seed_soul(lambda: {"alpha": 1.0}), ("expected a dict with 'alpha' and 'so8_rotation'",)),
    Case("seed-soul-nan", seed_soul(lambda: {"alpha": 1.0, "so8_rotation": rotation(2) * float("nan")}),
         ("soul.pt: so8_rotation holds NaN",)),
    Case("seed-soul-alpha-not-a-number", seed_soul(lambda: {"alpha": "high", "so8_rotation": rotation(2)}),
         ("soul.pt: alpha and so8_rotation must be numbers",)),
    Case("seed-soul-not-a-torch-file", seed_soul(b"\x00" * 64), ("soul.pt: not a plain tensor file, refused",)),
    Case("seed-soul-missing", lambda e: ["import-soul", str(e.tmp / "soul.pt"), "--out", str(e.tmp / "s.safetensors")],
         ("soul.pt: file not found",)),
    Case("fuse-soul-wrong-size", fuse_case(4), ("soul has 4 blocks of 8", "hidden_size is 256")),
    Case("fuse-soul-not-safetensors", fuse_case(None), ("soul.safetensors: not a readable safetensors file",)),
    Case("chat-pickled-adapter", chat_pickled_adapter, ("no adapter_model.safetensors",)),
]


@pytest.fixture(scope="module")
def bases(tiny_phi3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only base models: the tiny Phi-3, a tiny Gemma-2 (refused) and GPT-2 (unsupported), real
    transformers folders with the Phi-3 tokenizer, a real tiny Phi-3 of hidden size 36, and the tiny
    llm-jp-3 and sarashina2 bases (refused: Unigram vocabularies)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

    from pipeline.tiny import REFUSED_BASES, build_tiny, build_tiny_phi3

    root = tmp_path_factory.mktemp("bases")
    out = {"phi3": tiny_phi3_dir, "hidden36": build_tiny_phi3(root / "hidden36", hidden_size=36, num_heads=2)}
    out.update({name: build_tiny(root / name, name, hidden_size=32, intermediate_size=64)
                for name in REFUSED_BASES})
    others = {
        "gemma2": Gemma2ForCausalLM(Gemma2Config(vocab_size=32064, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                 head_dim=16)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=32064, n_embd=32, n_layer=1, n_head=2)),
    }
    for name, model in others.items():
        model.save_pretrained(root / name)
        for f in tiny_phi3_dir.glob("tokenizer*"):
            shutil.copy(f, root / name / f.name)
        out[name] = root / name
    return out


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def pipeline_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


@dataclass
class Outcome:
    tmp: Path
    proc: subprocess.CompletedProcess
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]


@pytest.fixture(scope="module")
def outcomes(bases, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every case run through the CLI, a few at a time: most of a case's time is the
    interpreter importing torch, which overlaps well."""
    from concurrent.futures import ThreadPoolExecutor

    def run(case: Case) -> Outcome:
        env = Env(tmp_path_factory.mktemp(case.name), bases)
        argv = case.build(env)
        before = snapshot(env.tmp)
        proc = subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO, capture_output=True, text=True,
                              env=pipeline_env(case.env), stdin=subprocess.DEVNULL, timeout=300)
        return Outcome(env.tmp, proc, before, snapshot(env.tmp))

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip((c.name for c in CASES), pool.map(run, CASES)))


def check_refusal(case: Case, out: Outcome) -> None:
    proc = out.proc
    if case.exit_code is None:
        assert proc.returncode != 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode == case.exit_code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "\nerror: " in "\n" + proc.stderr, proc.stderr
    for expected in case.expect:
        alternatives = (expected,) if isinstance(expected, str) else expected
        assert any(a in proc.stderr for a in alternatives), proc.stderr
    # Nothing new and nothing changed; a damaged artifact of the run itself may be removed.
    assert {k: v for k, v in out.after.items() if out.before.get(k) != v} == {}, "the command left files behind"
    assert all(k.startswith("build/") for k in set(out.before) - set(out.after)), "the command removed an input"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, outcomes):
    check_refusal(case, outcomes[case.name])
    assert not (REPO / "pipeline" / "t").exists()


def test_case_names_are_distinct():
    """`outcomes` is keyed by name: two cases of one name would share one outcome."""
    assert len({c.name for c in CASES}) == len(CASES)


def test_check_refusal_fails_what_is_no_clean_refusal(tiny_phi3_dir, tmp_path):
    """Negative controls for check_refusal, on the real CLI: a command that succeeds, a refusal for
    another reason than the case names, and a refusal that left a stage output behind."""
    def outcome(name: str, build: Callable[[Env], list[str]]) -> Outcome:
        env = Env(tmp_path / name, {"phi3": tiny_phi3_dir})
        env.tmp.mkdir()
        argv = build(env)
        before = snapshot(env.tmp)
        proc = subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO, capture_output=True, text=True,
                              env=pipeline_env({}), stdin=subprocess.DEVNULL, timeout=300)
        return Outcome(env.tmp, proc, before, snapshot(env.tmp))

    good = outcome("good", lambda e: ["check-config", "--config", str(e.config())])
    assert good.proc.returncode == 0, good.proc.stderr
    with pytest.raises(AssertionError):
        check_refusal(Case("good", lambda e: [], ("error",), exit_code=None), good)

    refused = outcome("refused", lambda e: ["check-config", "--config", str(e.config(trian={}))])
    check_refusal(Case("refused", lambda e: [], ("trian: unknown key",)), refused)  # the control's control
    with pytest.raises(AssertionError):
        check_refusal(Case("refused", lambda e: [], ("train.stepz: unknown key",)), refused)
    with pytest.raises(AssertionError):
        check_refusal(Case("refused", lambda e: [], ("trian: unknown key",), exit_code=1), refused)
    stray = refused.tmp / "build" / "t" / "gguf" / "t-f16.gguf"  # as if the command had written it
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"GGUF")
    with pytest.raises(AssertionError, match="left files behind"):
        check_refusal(Case("refused", lambda e: [], ("trian: unknown key",)),
                      Outcome(refused.tmp, refused.proc, refused.before, snapshot(refused.tmp)))


# -- through make: the DAG stops at the same point and builds nothing ----------------

MAKE_CASES = [
    Case("make-train-unknown-key", lambda e: ["train", str(e.config(train={"stepz": 1}))], ("train.stepz: unknown key",)),
    Case("make-train-impossible-schedule",
         lambda e: ["train", str(e.config(**SCHEDULE, soul={"warmup_steps": 5, "anneal_steps": 10}))],
         ("soul.warmup_steps + soul.anneal_steps",)),
    Case("make-gguf-gemma2-base", lambda e: ["gguf", str(e.config(base=e.bases["gemma2"]))],
         ("Gemma2ForCausalLM", "drops lm_head.weight")),
    Case("make-gguf-llmjp3-base", lambda e: ["gguf", str(e.config(base=e.bases["llmjp3"]))],
         ("tokenizer.json holds a Unigram model",)),
    Case("make-train-bad-jsonl", lambda e: ["train", str(e.jsonl(f"{GOOD_LINE}\nnot json\n"))],
         ("bad.jsonl:2: invalid JSON",)),
]


@pytest.mark.parametrize("case", MAKE_CASES, ids=[c.name for c in MAKE_CASES])
def test_make_stops_on_bad_input(case: Case, bases, tmp_path):
    target, config = case.build(Env(tmp_path, bases))
    before = snapshot(tmp_path)
    proc = subprocess.run(["make", "--no-print-directory", "-f", "pipeline.mk", target, f"CONFIG={config}",
                           f"PY={sys.executable}"], cwd=REPO, capture_output=True, text=True,
                          env=pipeline_env({}), stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for expected in case.expect:
        assert expected in proc.stderr, proc.stderr
    # `plan` may have written Make's view of the run (stamps, plan.mk); no stage output may exist.
    new = set(snapshot(tmp_path)) - set(before)
    assert not [p for p in new if p.split("/")[2:3] and p.split("/")[2] in RUN_OUTPUTS], sorted(new)


# What the stages write into build/<run>/ (a run that was refused has none of them).
RUN_OUTPUTS = {"checkpoints", "fused", "gguf", "Modelfile", "ollama.json", "metrics.jsonl", "imatrix.gguf", "reports"}


def test_a_line_separator_inside_a_json_string_is_no_line_break(tmp_path):
    """The other side of the line-numbered errors: U+2028 is valid inside a JSON string."""
    from pipeline.data.sources import read_jsonl

    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "a\u2028b"}\n{"text": "c"}\n', encoding="utf-8")
    assert [n for n, _ in read_jsonl(path)] == [1, 2]
