"""The pinned llama.cpp toolchain: where it is, and the GGUF steps that run it.

scripts/build-llama-cpp.sh builds the llama.cpp commit pinned in
scripts/llama-cpp.pin once per machine, into a cache shared by every checkout.
This module finds that build and runs its tools: the vendored
convert_hf_to_gguf.py (HF model folder -> f32/f16/bf16/q8_0 GGUF) and
llama-quantize (GGUF -> Q4_K_M and the other k-quants). Each output is written
under a temporary `.tmp-` name next to its target, checked with validate_gguf
and only then renamed into place, so a crash never leaves a file Make takes
as done.

Only the standard library (and pipeline.errors, pipeline.families) is imported here; the
converter runs in its own process, and validate_gguf imports the `gguf`
package only for its table of tensor block sizes.

Errors: ToolchainError (pipeline.errors) when the build is missing;
ToolRunError, a ToolchainError, when a tool fails; GGUFError, a BadInputError,
for a file that is not a complete GGUF. The CLI reports all three without a
traceback.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .artifacts import atomic_file
from .constants import CONVERTER_OUTTYPES, QUANT_TYPES
from .errors import ToolchainError
from .families import UnsupportedBaseError, family_of, gguf_name
from .formats import GGUFError, GGUFInfo, validate_gguf  # noqa: F401 (GGUFInfo: part of this module's API)
from .integrity import write_sidecar

REPO_ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = REPO_ROOT / "scripts" / "llama-cpp.pin"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-llama-cpp.sh"

# GGML_CUDA values that select the CUDA build; scripts/build-llama-cpp.sh has the same list.
_CUDA_ON = frozenset({"ON", "on", "On", "1", "TRUE", "true", "YES", "yes"})

# How many lines of a failed tool's output an error message carries.
_TAIL_LINES = 30


class ToolRunError(ToolchainError):
    """A llama.cpp tool failed, or exited 0 without writing a valid GGUF."""


def read_pin() -> dict[str, str]:
    """Read scripts/llama-cpp.pin.

    Inputs: none (the pin file of this checkout).
    Outputs: its KEY=value pairs, e.g. {"LLAMA_CPP_COMMIT": "0c1e570...", ...}.
    Errors: OSError when the file cannot be read; ToolchainError when a line is
    neither a comment, blank, nor KEY=value.
    """
    pin: dict[str, str] = {}
    for number, line in enumerate(PIN_FILE.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise ToolchainError(f"{PIN_FILE}:{number}: expected KEY=value, got {line!r}")
        pin[key] = value
    return pin


def _variant() -> str:
    return "cuda" if os.environ.get("GGML_CUDA", "OFF") in _CUDA_ON else "cpu"


def install_dir() -> Path:
    """Where the pinned llama.cpp build lives (or will live) on this machine.

    Inputs: environment. LLAMA_CPP_DIR, when set, is taken as is. Otherwise the
    path is computed exactly like `scripts/build-llama-cpp.sh --print-dir`:
    ${AGIASI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/agiasi-soul-fusion}/llama.cpp/<commit>-<variant>,
    variant "cuda" when GGML_CUDA=ON, else "cpu" (the script's --cuda flag has no
    counterpart here: set GGML_CUDA=ON).
    Outputs: an absolute path; it need not exist.
    Errors: OSError when the pin file cannot be read.
    """
    override = os.environ.get("LLAMA_CPP_DIR")
    if override:
        return Path(override).absolute()
    cache = os.environ.get("AGIASI_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agiasi-soul-fusion"
    )
    commit = read_pin()["LLAMA_CPP_COMMIT"]
    return Path(cache).absolute() / "llama.cpp" / f"{commit}-{_variant()}"


def require_install() -> Path:
    """The install dir of a finished build.

    Inputs: environment, as for install_dir().
    Outputs: the install dir, which holds a `.complete` marker.
    Errors: ToolchainError, saying how to build it, when the marker is missing.
    """
    path = install_dir()
    if not (path / ".complete").is_file():
        raise ToolchainError(
            f"llama.cpp is not built at {path} (no .complete marker). "
            "Run `make llama-cpp` or scripts/build-llama-cpp.sh"
            + (" (with GGML_CUDA=ON)" if _variant() == "cuda" else "")
            + ("; or unset LLAMA_CPP_DIR to use the cache" if os.environ.get("LLAMA_CPP_DIR") else "")
            + "."
        )
    return path


def tool(name: str) -> Path:
    """Path of a built llama.cpp program.

    Inputs: name, e.g. "llama-quantize", "llama-perplexity", "llama-tokenize".
    Outputs: the executable in <install>/build/bin.
    Errors: ToolchainError when the build is missing or did not produce `name`.
    """
    path = require_install() / "build" / "bin" / name
    if not os.access(path, os.X_OK):
        raise ToolchainError(f"{name} is not in the llama.cpp build ({path}); rebuild it with scripts/build-llama-cpp.sh")
    return path


def converter() -> Path:
    """Path of the vendored convert_hf_to_gguf.py (next to its own gguf-py/ and conversion/).

    Inputs: none. Outputs: <install>/src/convert_hf_to_gguf.py.
    Errors: ToolchainError when the build is missing.
    """
    path = require_install() / "src" / "convert_hf_to_gguf.py"
    if not path.is_file():
        raise ToolchainError(f"the llama.cpp install has no {path}; rebuild it with scripts/build-llama-cpp.sh")
    return path


def library_dir() -> Path:
    """The folder holding libllama and libggml*, for LLAMA_CPP_LIB_PATH of the Python bindings.

    Inputs: none. Outputs: <install>/build/bin.
    Errors: ToolchainError when the build is missing or has no libllama.
    """
    path = require_install() / "build" / "bin"
    if not any(path.glob("libllama.*")):
        raise ToolchainError(f"no libllama in {path}; rebuild it with scripts/build-llama-cpp.sh")
    return path


def load_bindings():
    """Import the llama-cpp-python bindings, bound to the pinned build's libllama.

    The bindings are installed without a library of their own (scripts/build-llama-cpp.sh
    --bindings) and read LLAMA_CPP_LIB_PATH once, at their first import; this sets it first.

    Inputs: none. Outputs: the `llama_cpp` module.
    Errors: ToolchainError when llama.cpp is not built, the bindings are not installed in this
    interpreter, or they were already imported with another library.
    """
    lib_dir = library_dir()
    if "llama_cpp" not in sys.modules:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    try:
        import llama_cpp
    except ImportError as err:
        raise ToolchainError(
            f"the llama_cpp bindings do not import ({err}); install them with "
            f"scripts/build-llama-cpp.sh --bindings {sys.executable}"
        ) from err
    loaded = Path(llama_cpp.llama_cpp._lib._name).parent
    if loaded != lib_dir:
        raise ToolchainError(f"llama_cpp was already imported with the library in {loaded}, not {lib_dir}")
    return llama_cpp


def _run_tool(cmd: list[str], *, what: str, env: dict[str, str] | None = None) -> None:
    """Run cmd; on failure raise ToolRunError with the tail of its output.

    The tools' per-tensor chatter is shown only with PIPELINE_VERBOSE=1 (make VERBOSE=1):
    a stage's own output is the one line saying what it builds.
    """
    verbose = os.environ.get("PIPELINE_VERBOSE", "") not in ("", "0")
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, text=True, errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if verbose:
                sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
    if proc.returncode != 0:
        raise ToolRunError(
            f"{what} failed with exit status {proc.returncode}: {' '.join(cmd)}\n"
            f"--- last {len(tail)} lines of its output ---\n" + "\n".join(tail)
        )


@contextlib.contextmanager
def _gguf_output(out_path: Path, what: str, check: Callable[[Path], dict | None] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to out_path; when the block succeeds, the file there is a
    valid GGUF and `check` (if given) accepts it, rename it to out_path. What check returns (the
    fidelity gate's entries) is recorded in the file's sidecar. On any failure the temporary
    file is removed."""
    with atomic_file(out_path, suffix=".gguf") as tmp:
        yield tmp
        try:
            validate_gguf(tmp)
        except GGUFError as err:
            raise ToolRunError(f"{what} exited 0 but its output for {out_path} is not a valid GGUF: {err}") from err
        figures = check(tmp) if check is not None else None
        write_sidecar(out_path, tmp, fidelity=figures)  # before the rename: a kill in between leaves a record the old file fails


def _gguf_model_name(model_dir: Path, model_name: str | None) -> str:
    """general.name for the GGUF: model_name, else the folder's name, as the family's rule wants it
    (families.gguf_name: a Phi-3 GGUF's name must say phi3)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    try:
        family = family_of(config)
    except UnsupportedBaseError:
        return model_name or model_dir.name
    return gguf_name(family, model_dir.name, model_name)


def convert_hf_to_gguf(model_dir: Path, out_path: Path, outtype: str, *, model_name: str | None = None,
                       check: Callable[[Path], dict | None] | None = None) -> Path:
    """Convert a Hugging Face model folder to one GGUF file with the pinned, vendored converter.

    The converter runs in a child process of this interpreter (sys.executable, which must have
    torch, numpy, safetensors, sentencepiece), with the vendored gguf-py first on its path: the
    PyPI `gguf` package is older than the converter and fails on it.

    Inputs: model_dir, an unquantized HF folder (config.json, safetensors, tokenizer.model, ...);
    out_path, the .gguf to write (its folder is created; an existing file is replaced only on
    success); outtype, one of CONVERTER_OUTTYPES (use quantize() for k-quants); model_name, the
    GGUF's general.name (default: the folder's name). For a Phi-3 model the name must contain
    "phi3" or "phi-3", and "-phi3" is appended to a default name that lacks it: llama.cpp gives
    Phi-3's special tokens the right-strip they have in tokenizer.json only when general.name
    says Phi-3, and without it "<|user|>\n..." tokenizes differently from transformers.
    check, called with the finished temporary file before it is renamed: an exception from
    it (a fidelity gate, say) leaves out_path as it was; what it returns goes into the sidecar.
    Outputs: out_path, a validated GGUF.
    Errors: ValueError for an unknown outtype or a Phi-3 model_name without "phi3";
    FileNotFoundError when model_dir is not a folder with a config.json; ToolchainError when
    llama.cpp is not built; ToolRunError when the converter fails (the message ends with the
    tail of its output) or writes an invalid file. On any error out_path is left as it was and
    no temporary file remains.
    """
    if outtype not in CONVERTER_OUTTYPES:
        raise ValueError(
            f"outtype {outtype!r} is not one the converter accepts ({', '.join(CONVERTER_OUTTYPES)}); "
            "quantize to k-quants such as Q4_K_M with quantize() after converting"
        )
    model_dir, out_path = Path(model_dir), Path(out_path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    name = _gguf_model_name(model_dir, model_name)
    script = converter()
    env = dict(os.environ)
    # NO_LOCAL_GGUF would make the converter skip its own gguf-py; PYTHONPATH puts it first
    # even for the modules the converter imports before it touches sys.path.
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(script.parent / "gguf-py")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    with _gguf_output(out_path, "convert_hf_to_gguf.py", check) as tmp:
        _run_tool(
            [sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype,
             "--model-name", name],
            what=f"convert_hf_to_gguf.py ({model_dir} -> {outtype})",
            env=env,
        )
    return out_path


def _canonical_qtype(qtype: str) -> str:
    by_upper = {name.upper(): name for name in QUANT_TYPES}
    try:
        return by_upper[qtype.upper()]
    except KeyError:
        raise ValueError(f"unknown quantization type {qtype!r}; llama-quantize accepts: {', '.join(QUANT_TYPES)}") from None


def quantize(src: Path, out_path: Path, qtype: str, *, threads: int | None = None,
             output_tensor_type: str | None = None, imatrix: Path | None = None,
             check: Callable[[Path], dict | None] | None = None) -> Path:
    """Quantize a GGUF with the pinned llama-quantize.

    Note: k-quants need tensor rows divisible by 256 and every quant needs multiples of 32;
    llama-quantize silently falls back (q5_0/q8_0, or f16) for tensors that are not, exits 0
    and only warns. Check the tensor types in validate_gguf()'s result where it matters.

    Inputs: src, an f32/f16/bf16 GGUF (validated first); out_path, the .gguf to write (its folder
    is created; an existing file is replaced only on success); qtype, a name from QUANT_TYPES,
    in any case ("q4_k_m" works); threads, llama-quantize's thread count (default: its own);
    output_tensor_type, a ggml type name (f16, q8_0, q6_K, ...) for output.weight, the LM
    head (which carries the folded soul); imatrix, an importance matrix from compute_imatrix()
    that weights the quantization error by how much each weight is used; check, called with
    the finished temporary file before it is renamed (what it returns goes into the sidecar).
    Outputs: out_path, a validated GGUF.
    Errors: ValueError for an unknown qtype or threads < 1; GGUFError when src is not a valid
    GGUF; ToolchainError when llama.cpp is not built; ToolRunError when llama-quantize fails
    (the message ends with the tail of its output) or writes an invalid file. On any error
    out_path is left as it was and no temporary file remains.
    """
    name = _canonical_qtype(qtype)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    src, out_path = Path(src), Path(out_path)
    validate_gguf(src)
    cmd = [str(tool("llama-quantize"))]
    if output_tensor_type:
        cmd += ["--output-tensor-type", output_tensor_type]
    if imatrix is not None:
        validate_gguf(Path(imatrix))
        cmd += ["--imatrix", str(imatrix)]
    with _gguf_output(out_path, "llama-quantize", check) as tmp:
        args = [str(src), str(tmp), name] + ([str(threads)] if threads is not None else [])
        _run_tool(cmd + args, what=f"llama-quantize ({src} -> {name})")
    return out_path


def compute_imatrix(model: Path, calibration: Path, out_path: Path, *, ctx: int = 512,
                    chunks: int | None = None, threads: int | None = None) -> Path:
    """Compute an importance matrix with the pinned llama-imatrix, for quantize(imatrix=...).

    Inputs: model, an unquantized GGUF (validated first); calibration, a UTF-8 text file of at
    least 2 * ctx tokens (llama-imatrix refuses less); out_path, the imatrix to write (GGUF
    format; replaced only on success); ctx, tokens per chunk; chunks, the most chunks to use
    (default: all); threads (default: llama.cpp's).
    Outputs: out_path. The output weight is left out (llama-imatrix's default): the head
    carries the folded soul and is better quantized plainly.
    Errors: GGUFError for an invalid model; ToolchainError when llama.cpp is not built;
    ToolRunError when llama-imatrix fails or writes an invalid file.
    """
    model, out_path = Path(model), Path(out_path)
    validate_gguf(model)
    cmd = [str(tool("llama-imatrix")), "-m", str(model), "-f", str(calibration), "-c", str(ctx), "--no-ppl"]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    if threads is not None:
        cmd += ["-t", str(threads)]
    with _gguf_output(out_path, "llama-imatrix") as tmp:
        _run_tool(cmd + ["-o", str(tmp)], what=f"llama-imatrix ({model} on {calibration})")
    return out_path
