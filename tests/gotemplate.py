"""The test oracle for Ollama TEMPLATEs: Go's own text/template, run as Ollama runs it.

tests/gotmpl/main.go copies what Ollama v0.33.0-rc2 (fb30760) does to turn a chat into a
prompt (template/template.go Parse, Vars, Execute with collate, and the values it passes), so
a template renders here exactly as `ollama run` would render it (what it leaves out is listed
at its top). It is built once per machine with Debian's Go (`make go`) into
${AGIASI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/agiasi-soul-fusion}/gotmpl-<sha256 of its
sources>/gotmpl, then run once per render. Not used by the pipeline.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "gotmpl"
SOURCE_FILES = ("main.go", "go.mod")


class TemplateError(Exception):
    """Go's error for a template that does not parse or does not execute."""


def render(template: str, messages: list[dict], tools: list[dict] | None = None,
           think: bool | str | None = None) -> str:
    """The prompt Ollama's /api/chat renders from `template` for `messages`.

    Inputs: the TEMPLATE text; messages as Ollama's API takes them ({"role", "content"},
    optionally "thinking", "tool_calls", "tool_name", "tool_call_id"), the model's SYSTEM already
    first if it has one (ChatHandler does that before rendering); tools as in the API;
    think as the API's `think` (None: not set).
    Outputs: the rendered prompt.
    Errors: TemplateError with Go's message when the template does not parse or execute;
    RuntimeError when Go is missing or the request is malformed.
    """
    request = {"template": template, "messages": messages}
    if tools is not None:
        request["tools"] = tools
    if think is not None:
        request["think"] = think
    return _run(request)


def parse_error(template: str) -> str | None:
    """Go's error from Ollama's template.Parse (what CreateHandler answers as
    "template error: <err>"), or None when the template parses."""
    try:
        _run({"template": template, "messages": [], "parse_only": True})
    except TemplateError as e:
        return str(e)
    return None


def _run(request: dict) -> str:
    proc = subprocess.run([str(binary())], input=json.dumps(request), capture_output=True,
                          text=True, encoding="utf-8", timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"tests/gotmpl failed (exit {proc.returncode}): {proc.stderr.strip()}")
    answer = json.loads(proc.stdout)
    if "error" in answer:
        raise TemplateError(answer["error"])
    return answer["rendered"]


@functools.cache
def binary(name: str = "gotmpl") -> Path:
    """The built Go program tests/<name> (the oracle by default; tests/goproxy is the other),
    building it first if this version of its sources has no build yet.

    Two processes may build at once: each builds in its own temporary folder and renames its
    build into place, so either build wins whole.
    Errors: RuntimeError when `go` is missing (run `make go`) or the build fails.
    """
    source = SOURCE.parent / name
    digest = hashlib.sha256()
    for file in SOURCE_FILES:
        digest.update(file.encode() + b"\0" + (source / file).read_bytes() + b"\0")
    cache = os.environ.get("AGIASI_CACHE_DIR") or str(  # the cache root of pipeline/llamacpp.py
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agiasi-soul-fusion")
    target = Path(cache).absolute() / f"{name}-{digest.hexdigest()[:16]}" / name
    if target.exists():
        return target
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(f"Go is missing: run `make go` (Debian's golang-go), which tests/{name} needs")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{name}.", dir=target.parent))
    tmp = tmp_dir / name
    try:
        # Standard library only: no module download, no toolchain switch, go.mod left as it is.
        env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=readonly", "GOTOOLCHAIN": "local"}
        proc = subprocess.run([go, "build", "-o", tmp, "."], cwd=source, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building tests/{name} failed:\n{proc.stderr}")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target
