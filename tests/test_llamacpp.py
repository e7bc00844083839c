"""The pinned llama.cpp toolchain (scripts/build-llama-cpp.sh) and the GGUF steps in pipeline/llamacpp.py.

Tests marked by the `toolchain` fixture need the build (`make llama-cpp`, or the script) and
skip without it; `make test` builds it first. Conversion tests use pipeline.tiny's model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from makeutil import needs_llama_cpp
from pipeline import llamacpp
from pipeline.llamacpp import GGUFError, ToolchainError, ToolRunError

SCRIPT = llamacpp.BUILD_SCRIPT
PIN = llamacpp.read_pin()
ENV_KEYS = ("AGIASI_CACHE_DIR", "XDG_CACHE_HOME", "GGML_CUDA", "LLAMA_CPP_DIR")


def run_script(*args: str, cwd: Path | None = None, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


@pytest.fixture(scope="module")
def toolchain() -> Path:
    return needs_llama_cpp()


@pytest.fixture(scope="module")
def tiny_model(tiny_phi3_dir) -> Path:
    return tiny_phi3_dir


@pytest.fixture(scope="module")
def tiny_f16(toolchain, tiny_model, tmp_path_factory) -> Path:
    return llamacpp.convert_hf_to_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", "f16")


@pytest.fixture
def small_gguf(tmp_path) -> Path:
    """A valid GGUF without a model in it (two tensors), written with the PyPI gguf package."""
    import gguf

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.count", 7)
    writer.add_array("test.words", ["a", "bb"])
    writer.add_tensor("t0", np.arange(100, dtype=np.float32))
    writer.add_tensor("t1", np.ones((4, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- the pin and the script ----------------------------------------------------------------


def test_pin_has_the_three_pinned_values():
    assert re.fullmatch(r"[0-9a-f]{40}", PIN["LLAMA_CPP_COMMIT"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", PIN["LLAMA_CPP_PYTHON_VERSION"])
    assert re.fullmatch(r"[0-9a-f]{64}", PIN["LLAMA_CPP_PYTHON_SHA256"])


def test_script_takes_its_pin_from_the_pin_file(tmp_path, monkeypatch):
    # No second copy of a commit or hash in the script...
    assert not re.search(r"\b[0-9a-f]{40,64}\b", SCRIPT.read_text())
    # ...and a changed pin moves the script's install dir.
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / SCRIPT.name
    shutil.copy(SCRIPT, script)
    other = "1" * 40
    pin_text = llamacpp.PIN_FILE.read_text().replace(PIN["LLAMA_CPP_COMMIT"], other)
    (tmp_path / "scripts" / llamacpp.PIN_FILE.name).write_text(pin_text)
    monkeypatch.setenv("AGIASI_CACHE_DIR", str(tmp_path / "cache"))
    out = run_script("--print-dir", script=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{tmp_path}/cache/llama.cpp/{other}-cpu\n"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"XDG_CACHE_HOME": "{tmp}/xdg"},
        {"AGIASI_CACHE_DIR": "{tmp}/agiasi", "XDG_CACHE_HOME": "{tmp}/xdg"},
        {"AGIASI_CACHE_DIR": "relative/cache"},
        {"GGML_CUDA": "ON"},
        {"GGML_CUDA": "OFF", "AGIASI_CACHE_DIR": ""},
    ],
    ids=["default", "xdg", "agiasi-wins", "relative", "cuda", "cuda-off-empty-cache"],
)
def test_install_dir_matches_the_script(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    out = run_script("--print-dir", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == llamacpp.install_dir()
    assert llamacpp.install_dir().name == f"{PIN['LLAMA_CPP_COMMIT']}-{'cuda' if env.get('GGML_CUDA') == 'ON' else 'cpu'}"


def test_llama_cpp_dir_overrides_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "prebuilt"))
    assert llamacpp.install_dir() == tmp_path / "prebuilt"


def test_missing_build_says_how_to_build_it(tmp_path, monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AGIASI_CACHE_DIR", str(tmp_path))
    with pytest.raises(ToolchainError, match=r"make llama-cpp.*build-llama-cpp\.sh"):
        llamacpp.require_install()
    with pytest.raises(ToolchainError):
        llamacpp.tool("llama-quantize")


def test_script_rejects_unknown_arguments():
    out = run_script("--no-such-flag")
    assert out.returncode != 0 and "unknown argument" in out.stderr and out.stdout == ""


# --- the built toolchain --------------------------------------------------------------------


def test_complete_marker_records_the_pin(toolchain):
    marker = dict(
        line.split("=", 1) for line in (toolchain / ".complete").read_text().splitlines()
    )
    assert marker["commit"] == PIN["LLAMA_CPP_COMMIT"]
    assert marker["variant"] == toolchain.name.rsplit("-", 1)[1]
    assert marker["sdist"] == f"llama-cpp-python=={PIN['LLAMA_CPP_PYTHON_VERSION']}"


# What a build runs (download, check, unpack, configure, compile): none of it on the cached path.
BUILD_TOOLS = ("python3", "pip", "pip3", "curl", "wget", "git", "sha256sum", "tar", "cmake", "ninja", "make",
               "cc", "c++", "gcc", "g++", "clang", "clang++", "nvcc")


def test_script_builds_nothing_when_built(toolchain, tmp_path):
    """Each build tool is a shim first on PATH that records its call and fails. With the cache built,
    the script prints the install dir and calls none; with an empty cache (the negative control) the
    shims see the download start."""
    shims, calls = tmp_path / "bin", tmp_path / "calls"
    shims.mkdir()
    for name in BUILD_TOOLS:
        (shims / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 97\n')
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(shims / "python3")}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{toolchain}\n"
    assert not calls.exists(), f"the cached path ran: {calls.read_text()}"

    empty = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                           env={**env, "AGIASI_CACHE_DIR": str(tmp_path / "cache")})
    assert empty.returncode != 0 and empty.stdout == ""
    assert calls.read_text().startswith("python3 -m pip "), calls.read_text()


def test_tools_run_from_the_install(toolchain):
    for name in ("llama-quantize", "llama-perplexity", "llama-tokenize"):
        assert os.access(llamacpp.tool(name), os.X_OK)
    # The tree was built elsewhere and renamed: the binaries must still find their libraries.
    version = subprocess.run([llamacpp.tool("llama-perplexity"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0, version.stderr
    assert PIN["LLAMA_CPP_COMMIT"][:7] in version.stdout + version.stderr
    assert any(llamacpp.library_dir().glob("libllama.*"))
    assert llamacpp.converter().is_file()


def test_quant_types_match_the_built_llama_quantize(toolchain):
    # llama-quantize prints its type table with --help and exits 1.
    out = subprocess.run([llamacpp.tool("llama-quantize"), "--help"], capture_output=True, text=True)
    assert out.returncode == 1 and "usage:" in out.stdout
    listed = re.findall(r"^\s+(?:\d+\s+or\s+)?([A-Z0-9_]+)\s+:", out.stdout, flags=re.M)
    assert tuple(listed) == llamacpp.QUANT_TYPES


def test_quant_types_match_the_vendored_source(toolchain):
    source = (toolchain / "src" / "tools" / "quantize" / "quantize.cpp").read_text()
    table = source.split("QUANT_OPTIONS = {", 1)[1].split("};", 1)[0]
    assert tuple(re.findall(r'\{\s*"([A-Z0-9_]+)"', table)) == llamacpp.QUANT_TYPES


# --- argument checks (no toolchain needed) --------------------------------------------------


def test_convert_rejects_an_outtype_the_converter_lacks(tmp_path):
    with pytest.raises(ValueError, match=r"Q4_K_M.*f32, f16, bf16, q8_0, tq1_0, tq2_0, auto"):
        llamacpp.convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf", "Q4_K_M")


def test_phi3_model_name_must_say_phi3(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["Phi3ForCausalLM"]}')
    with pytest.raises(ValueError, match="must match 'phi-\\?3'"):
        llamacpp.convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf", "f16", model_name="soul-fusion")


def test_quantize_rejects_unknown_types_and_thread_counts(tmp_path, small_gguf):
    with pytest.raises(ValueError, match=r"unknown quantization type 'Q4_K_X'.*Q4_K_M"):
        llamacpp.quantize(small_gguf, tmp_path / "x.gguf", "Q4_K_X")
    with pytest.raises(ValueError, match="threads"):
        llamacpp.quantize(small_gguf, tmp_path / "x.gguf", "Q8_0", threads=0)


# --- validate_gguf --------------------------------------------------------------------------


def test_validate_reads_a_valid_file(small_gguf):
    info = llamacpp.validate_gguf(small_gguf)
    assert info.version == 3
    assert info.metadata["general.architecture"] == "llama"
    assert info.metadata["test.count"] == 7
    assert info.metadata["test.words"] == ["a", "bb"]
    assert info.tensor_types == {"t0": "F32", "t1": "F16"}


def test_validate_rejects_bad_magic(tmp_path, small_gguf):
    bad = tmp_path / "bad-magic.gguf"
    bad.write_bytes(b"GGML" + small_gguf.read_bytes()[4:])
    with pytest.raises(GGUFError, match=rf"{re.escape(str(bad))}.*bad magic"):
        llamacpp.validate_gguf(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="bad magic"):
        llamacpp.validate_gguf(empty)


def test_validate_rejects_unsupported_versions(tmp_path, small_gguf):
    data = bytearray(small_gguf.read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    old = tmp_path / "v1.gguf"
    old.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="unsupported GGUF version 1"):
        llamacpp.validate_gguf(old)


@pytest.mark.parametrize("keep", [6, 16, 40, 200, -300], ids=["in-version", "in-counts", "in-metadata", "in-tensors", "in-data"])
def test_validate_rejects_truncated_files(tmp_path, small_gguf, keep):
    data = small_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(GGUFError, match=rf"{re.escape(str(cut))}: truncated GGUF"):
        llamacpp.validate_gguf(cut)


# --- conversion and quantization of a tiny Phi-3 --------------------------------------------


def test_convert_writes_a_valid_phi3_gguf(tiny_f16):
    info = llamacpp.validate_gguf(tiny_f16)
    assert info.metadata["general.architecture"] == "phi3"
    assert info.metadata["general.file_type"] == 1  # MOSTLY_F16
    assert info.tensor_types["blk.0.attn_qkv.weight"] == "F16"
    assert leftovers(tiny_f16.parent) == []


def test_phi3_gguf_tokenizes_like_hf_from_any_folder_name(bindings, tiny_model, tmp_path):
    # A folder named "fused" would give general.name "fused": llama.cpp would then not right-strip
    # after Phi-3's special tokens and "<|user|>\n" would keep a newline token that HF drops.
    from transformers import AutoTokenizer

    fused = tmp_path / "fused"
    shutil.copytree(tiny_model, fused)
    out = llamacpp.convert_hf_to_gguf(fused, tmp_path / "fused.gguf", "f16")
    assert llamacpp.validate_gguf(out).metadata["general.name"] == "fused-phi3"
    tok = AutoTokenizer.from_pretrained(fused)
    vocab = bindings.Llama(str(out), vocab_only=True, verbose=False)
    text = "<|system|>\nあなたは魂。<|end|>\n<|user|>\nこんにちは <|end|>\n<|assistant|>\n"
    assert vocab.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"]


def test_convert_uses_the_vendored_gguf_even_when_told_not_to(toolchain, tiny_model, tmp_path, monkeypatch):
    # NO_LOCAL_GGUF makes the converter import the PyPI gguf, which is too old for it.
    monkeypatch.setenv("NO_LOCAL_GGUF", "1")
    out = llamacpp.convert_hf_to_gguf(tiny_model, tmp_path / "tiny-f32.gguf", "f32")
    assert llamacpp.validate_gguf(out).metadata["general.file_type"] == 0  # ALL_F32


def test_convert_failure_keeps_the_old_output_and_reports_the_tail(toolchain, tiny_model, tmp_path):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model, broken)
    (broken / "tokenizer.model").unlink()
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    with pytest.raises(ToolRunError, match=r"(?s)convert_hf_to_gguf\.py .* failed .*last \d+ lines") as err:
        llamacpp.convert_hf_to_gguf(broken, out, "f16")
    assert "tokenizer" in str(err.value).split("lines of its output ---", 1)[1].lower()
    assert out.read_bytes() == b"previous"
    assert leftovers(out.parent) == []


def test_quantize_q4_k_m_makes_real_k_quants(tiny_f16, tmp_path):
    out = llamacpp.quantize(tiny_f16, tmp_path / "tiny-Q4_K_M.gguf", "q4_k_m", threads=2)
    info = llamacpp.validate_gguf(out)
    assert info.metadata["general.file_type"] == 15  # MOSTLY_Q4_K_M
    types = set(info.tensor_types.values())
    assert {"Q4_K", "Q6_K"} <= types, types  # hidden 256 / intermediate 512: no fallback
    assert out.stat().st_size < tiny_f16.stat().st_size
    assert leftovers(tmp_path) == []


def test_quantize_failure_keeps_the_old_output(toolchain, small_gguf, tmp_path):
    # A GGUF with no model in it: llama-quantize cannot load it.
    out = tmp_path / "q.gguf"
    out.write_bytes(b"previous")
    with pytest.raises(ToolRunError, match=r"llama-quantize .* failed with exit status"):
        llamacpp.quantize(small_gguf, out, "Q8_0")
    assert out.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_quantize_validates_its_input(toolchain, tmp_path):
    src = tmp_path / "not.gguf"
    src.write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFError, match="bad magic"):
        llamacpp.quantize(src, tmp_path / "q.gguf", "Q8_0")
    assert not (tmp_path / "q.gguf").exists()


# --- the Python bindings --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bindings(toolchain):
    return llamacpp.load_bindings()  # not installed, or another library: a ToolchainError, never a skip


def test_bindings_load_the_pinned_library(bindings):
    assert bindings.__version__ == PIN["LLAMA_CPP_PYTHON_VERSION"]
    assert Path(bindings.llama_cpp._lib._name).parent == llamacpp.library_dir()
    assert bindings.llama_supports_mmap()  # a call into libllama


def test_bindings_install_is_skipped_when_present(bindings, toolchain):
    out = run_script("--bindings", sys.executable)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{toolchain}\n"
    assert "already works" in out.stderr


def test_f32_gguf_logits_match_transformers(bindings, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = llamacpp.convert_hf_to_gguf(tiny_model, tmp_path / "tiny-f32.gguf", "f32")
    ids = AutoTokenizer.from_pretrained(tiny_model)("Hello, world. こんにちは、世界。")["input_ids"]
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(torch.tensor([ids])).logits[0].numpy()
    # F32 KV cache (type 0): the default F16 cache alone costs ~1e-3.
    llm = bindings.Llama(str(gguf_path), n_ctx=64, logits_all=True, type_k=0, type_v=0, verbose=False)
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    assert ours.shape == hf.shape
    assert np.abs(ours - hf).max() < 1e-3
    assert hf.std() > 1.0  # the comparison is not between two flat rows
