"""Config loading: shipped configs load; bad ones report every problem, naming the key."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, small_config, write_config
from pipeline.config import ConfigError, load_config, stage_inputs_json


def test_shipped_real_config_loads():
    cfg = load_config(REPO / "config.yaml")
    assert cfg.model.base == "AXCXEPT/Borea-Phi-3.5-mini-Instruct-Jp"  # the canonical id, not the redirect
    assert re.fullmatch(r"[0-9a-f]{40}", cfg.model.revision)  # pinned to a commit
    assert (cfg.train.quantization, cfg.train.lora.r, cfg.train.lora.alpha) == ("nf4", 16, 32)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.data.max_length) == (2e-4, 1, 512)
    assert (cfg.train.steps, cfg.train.save_every) == (500, 100)
    s = cfg.soul
    assert (s.alpha_start, s.warmup_steps, s.anneal_steps, s.alpha_target) == (-5.0, 50, 400, 1.618)
    assert (cfg.gguf.outtype, cfg.gguf.quantizations) == ("f16", ["Q4_K_M"])
    assert cfg.ollama.model == "agiasi-borea" and cfg.ollama.system


def test_every_key_of_the_real_config_has_a_comment():
    for n, line in enumerate((REPO / "config.yaml").read_text(encoding="utf-8").splitlines(), 1):
        is_key = ":" in line and not line.lstrip().startswith("#")
        is_section = line.split("#")[0].rstrip().endswith(":")
        if is_key and not is_section:
            assert "#" in line, f"config.yaml:{n} has no comment: {line!r}"


def test_demo_config_has_the_same_shape(tiny_phi3_dir, tmp_path):
    real = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    demo = yaml.safe_load((REPO / "demo.yaml").read_text(encoding="utf-8"))

    def keys(d, prefix=""):
        return {prefix + k for k, v in d.items()} | {
            x for k, v in d.items() if isinstance(v, dict) and k != "parameters" for x in keys(v, prefix + k + ".")}
    assert keys(real) == keys(demo)
    cfg = load_config(write_config(tmp_path / "demo.yaml", small_config(tiny_phi3_dir, tmp_path / "b")))
    assert cfg.run_dir == tmp_path / "b" / "t"


def problems_of(tmp_path, cfg: dict) -> list[str]:
    path = write_config(tmp_path / "bad.yaml", cfg)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    return e.value.problems


BAD = [
    ({"train": {"lora": {"rank": 8}}}, "train.lora.rank: unknown key"),
    ({"trian": {}}, "trian: unknown key"),
    ({"train": {"steps": "500"}}, "train.steps: Input should be a valid integer"),
    ({"train": {"lr": "fast"}}, "train.lr: Input should be a valid number"),
    ({"train": {"quantization": "int3"}}, "train.quantization: Input should be 'nf4', 'none' or 'auto'"),
    ({"train": {"gradient_checkpointing": "yes"}}, "train.gradient_checkpointing: Input should be a valid boolean"),
    ({"train": {"steps": 0}}, "train.steps: Input should be greater than or equal to 1"),
    ({"soul": {"warmup_steps": 5, "anneal_steps": 10}, "train": {"steps": 6, "save_every": 3}},
     "soul.warmup_steps + soul.anneal_steps (5 + 10) is longer than train.steps (6)"),
    ({"train": {"save_every": 100}}, "train.save_every (100) is larger than train.steps (6)"),
    ({"data": {"train": "no/such/file.jsonl"}}, "data.train: file not found"),
    ({"gguf": {"quantizations": ["Q4_K_M", "q4_k_m"]}}, "gguf.quantizations: lists a type twice"),
    ({"gguf": {"outtype": "q4_k_m"}}, "gguf.outtype: Input should be"),
    ({"fuse": {"dtype": "fp8"}}, "fuse.dtype: Input should be"),
    ({"run": {"name": "../escape"}}, "run.name: String should match pattern"),
    ({"ollama": {"model": "Has Spaces"}}, "ollama.model: 'Has Spaces' is not a name Ollama accepts"),
    # Ollama's own rules (types/model/name.go, internal/modelref/modelref.go), looser or stricter than a regex
    ({"ollama": {"model": "my.team/agiasi"}}, "ollama.model: 'my.team/agiasi' is not a name Ollama accepts"),
    ({"ollama": {"model": "agiasi:v1:x"}}, "ollama.model: 'agiasi:v1:x' is not a name"),
    ({"ollama": {"model": "agiasi:cloud"}}, "ollama.model: 'agiasi:cloud' is the suffix ':cloud'"),
    ({"ollama": {"model": "agiasi:v1-cloud"}}, "cloud/local model reference"),
    ({"ollama": {"model": "-agiasi"}}, "ollama.model: '-agiasi' is not a name"),
    # parameters against Ollama's option table (api/types.go Options)
    ({"ollama": {"parameters": {"num_ctx": "4096"}}}, "ollama.parameters.num_ctx: must be an integer, not str"),
    ({"ollama": {"parameters": {"num_ctx": 2048.5}}}, "ollama.parameters.num_ctx: must be an integer"),
    ({"ollama": {"parameters": {"temprature": 0.7}}}, "ollama.parameters.temprature: unknown parameter"),
    ({"ollama": {"parameters": {"temperature": -1}}}, "ollama.parameters.temperature: must be >= 0"),
    ({"ollama": {"parameters": {"top_p": 1.5}}}, "ollama.parameters.top_p: must be <= 1"),
    ({"ollama": {"parameters": {"use_mmap": "yes"}}}, "ollama.parameters.use_mmap: must be true or false"),
    ({"ollama": {"parameters": {"stop": ["<|end|>"]}}}, "ollama.parameters.stop: the stops come from the chat format"),
    ({"ollama": {"parameters": {"num_gpu": -2}}}, "ollama.parameters.num_gpu: must be >= -1"),
    ({"ollama": {"system": 'a"""b'}}, 'ollama.system: must not contain """'),
    ({"ollama": {"template": '{{ .Prompt }}"""', "stop": ["<|end|>"]}}, 'ollama.template: must not contain """'),
    # the tiny base's config.json: original_max_position_embeddings = max_position_embeddings = 4096
    ({"ollama": {"parameters": {"num_ctx": 8192}}}, "ollama.parameters.num_ctx: 8192 is above the model's max_position"),
    ({"gguf": {"output_tensor_type": "q4_k_m"}}, "gguf.output_tensor_type: 'q4_k_m' is not a ggml type"),
    ({"train": {"lora": {"target_modules": ["qkv_proj", "q_proj"]}}},
     "train.lora.target_modules: 'q_proj' is no module of the base (model.safetensors); its modules: "),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_names_the_key(tiny_phi3_dir, tmp_path, override, message):
    problems = problems_of(tmp_path, small_config(tiny_phi3_dir, tmp_path / "b", **override))
    assert any(message in p for p in problems), problems


def test_all_problems_are_reported_together(tiny_phi3_dir, tmp_path):
    cfg = small_config(tiny_phi3_dir, tmp_path / "b", train={"steps": "x", "colour": 1}, fuse={"dtype": 3})
    problems = problems_of(tmp_path, cfg)
    assert {p.split(":")[0] for p in problems} >= {"train.steps", "train.colour", "fuse.dtype"}


def test_missing_required_section(tmp_path, tiny_phi3_dir):
    cfg = small_config(tiny_phi3_dir, tmp_path / "b")
    del cfg["model"]
    assert "model: required key is missing" in problems_of(tmp_path, cfg)


def test_hidden_size_not_divisible_by_8(tmp_path, tiny_phi3_dir):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_phi3_dir, base)
    hf = json.loads((base / "config.json").read_text())
    hf["hidden_size"] = 260
    (base / "config.json").write_text(json.dumps(hf))
    problems = problems_of(tmp_path, small_config(base, tmp_path / "b"))
    assert any("hidden_size 260" in p and "not divisible by 8" in p for p in problems)


def test_base_of_another_architecture(tmp_path, tiny_phi3_dir):
    import shutil

    base = tmp_path / "mistral"
    shutil.copytree(tiny_phi3_dir, base)
    hf = json.loads((base / "config.json").read_text())
    hf["architectures"], hf["model_type"] = ["MistralForCausalLM"], "mistral"
    (base / "config.json").write_text(json.dumps(hf))
    problems = problems_of(tmp_path, small_config(base, tmp_path / "b"))
    assert any("MistralForCausalLM" in p and "supported architectures: Phi3ForCausalLM" in p for p in problems)


def test_duplicate_key_and_bad_yaml_name_the_line(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("run:\n  name: a\n  name: b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"duplicate key 'name' \(first on line 2\).*line 3"):
        load_config(dup)
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")


def test_cli_bad_config_exits_2_and_writes_nothing(tiny_phi3_dir, tmp_path):
    build = tmp_path / "b"
    path = write_config(tmp_path / "bad.yaml", small_config(tiny_phi3_dir, build, train={"stepz": 1}))
    for command in ("plan", "train", "fuse", "modelfile"):
        proc = subprocess.run([sys.executable, "-m", "pipeline", command, "--config", str(path)],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "train.stepz: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    assert not build.exists()


def test_stage_stamps_depend_only_on_their_keys(tiny_phi3_dir, tmp_path):
    base = small_config(tiny_phi3_dir, tmp_path / "b")
    a = load_config(write_config(tmp_path / "a.yaml", base))
    b = load_config(write_config(tmp_path / "b.yaml", {**base, "ollama": {**base["ollama"], "system": "別の"}}))
    changed = {s for s in ("train", "fuse", "convert", "modelfile", "register")
               if stage_inputs_json(a, s) != stage_inputs_json(b, s)}
    assert changed == {"modelfile"}


@pytest.mark.parametrize("key,value,stage", [
    ("max_kl_fused", 0.01, "fuse"),
    ("max_kl_converted", 1e-4, "convert"),
    ("compare_f32", False, "convert"),
    ("max_kl_quantized", {"Q4_K_M": 0.05}, "quantize"),
    ("max_kl_quantized_default", 0.1, "quantize"),
])
def test_a_fidelity_bound_re_runs_only_the_stage_it_gates(tiny_phi3_dir, tmp_path, key, value, stage):
    base = small_config(tiny_phi3_dir, tmp_path / "b")
    a = load_config(write_config(tmp_path / "a.yaml", base))
    b = load_config(write_config(tmp_path / "b.yaml", {**base, "fidelity": {**base["fidelity"], key: value}}))
    changed = {s for s in ("train", "fuse", "convert", "imatrix", "quantize", "modelfile")
               if stage_inputs_json(a, s) != stage_inputs_json(b, s)}
    assert changed == {stage}


def test_ollama_rules_accept_what_ollama_accepts(tiny_phi3_dir, tmp_path):
    good = {"ollama": {"model": "Agiasi_Borea-3.5:v1.0", "allow_long_context": False,
                       "parameters": {"num_ctx": 4096, "temperature": 1, "use_mmap": True, "top_p": 0.9}},
            "gguf": {"output_tensor_type": "Q8_0"},
            "train": {"lora": {"target_modules": ["self_attn.qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}}}
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "b", **good)))
    assert cfg.served_context == 4096


def test_served_context_is_num_ctx_or_the_default(tiny_phi3_dir, tmp_path):
    raw = small_config(tiny_phi3_dir, tmp_path / "b")
    raw["ollama"]["parameters"].pop("num_ctx")
    assert load_config(write_config(tmp_path / "c.yaml", raw)).served_context == 4096
    raw["ollama"]["parameters"]["num_ctx"] = 1024
    assert load_config(write_config(tmp_path / "c.yaml", raw)).served_context == 1024


def test_num_ctx_above_the_original_context_needs_allow_long_context(tiny_phi3_dir, tmp_path):
    """A Phi-3.5-shaped config.json (LongRoPE: 4096 original of 131072 positions) in fused/,
    which is read before the base: 8192 is refused, then accepted with allow_long_context."""
    raw = small_config(tiny_phi3_dir, tmp_path / "b", ollama={"parameters": {"num_ctx": 8192}})
    fused = tmp_path / "b" / "t" / "fused"
    fused.mkdir(parents=True)
    hf = json.loads((tiny_phi3_dir / "config.json").read_text())
    (fused / "config.json").write_text(json.dumps({**hf, "max_position_embeddings": 131072}))
    problems = problems_of(tmp_path, raw)
    assert any("num_ctx: 8192 is above the model's original context 4096" in p
               and "allow_long_context" in p for p in problems), problems
    raw["ollama"]["allow_long_context"] = True
    assert load_config(write_config(tmp_path / "c.yaml", raw)).served_context == 8192
    long = load_config(write_config(tmp_path / "c.yaml", raw))
    raw["ollama"]["parameters"]["num_ctx"] = 4096
    short = load_config(write_config(tmp_path / "c4.yaml", raw))
    # the gates ran at another model's context: convert and quantize run again, train and fuse do not
    changed = {s for s in ("train", "fuse", "convert", "quantize", "modelfile")
               if stage_inputs_json(long, s) != stage_inputs_json(short, s)}
    assert changed == {"convert", "quantize", "modelfile"}
    raw["ollama"]["parameters"]["num_ctx"] = 262144
    assert any("above the model's max_position_embeddings 131072" in p for p in problems_of(tmp_path, raw))
