"""The Modelfile and registration (the ollama CLI itself is stood in for by a script
here: these tests check what we hand to Ollama, not Ollama)."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, small_config, write_config
from pipeline.config import load_config
from pipeline.errors import OllamaError
from pipeline.ollama import register, render_modelfile, write_modelfile

STOPS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"]


@pytest.fixture
def cfg(tiny_phi3_dir, tmp_path):
    return load_config(write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "b")))


def test_modelfile_has_template_stops_system_and_parameters(cfg):
    text = render_modelfile(cfg)
    lines = text.splitlines()
    assert "FROM ./gguf/t-q4_k_m.gguf" in lines
    assert (cfg.modelfile_path.parent / "gguf" / "t-q4_k_m.gguf") == cfg.gguf_path("Q4_K_M")
    for stop in STOPS:
        assert f'PARAMETER stop "{stop}"' in lines
    assert f'SYSTEM """{cfg.ollama.system}"""' in lines
    assert "PARAMETER num_ctx 2048" in lines and "PARAMETER temperature 0.7" in lines
    assert 'TEMPLATE """' in text and "<|{{ .Role }}|>" in text and "<|assistant|>" in text


def test_unknown_family_and_bad_system_prompt(cfg):
    with pytest.raises(OllamaError, match="ollama.family: no template gemma.Modelfile"):
        render_modelfile(cfg.model_copy(update={"ollama": cfg.ollama.model_copy(update={"family": "gemma"})}))
    with pytest.raises(OllamaError, match='ollama.system: must not contain """'):
        render_modelfile(cfg.model_copy(update={"ollama": cfg.ollama.model_copy(update={"system": 'a"""b'})}))


def without_ollama_env(tmp_path) -> dict:
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not (Path(p) / "ollama").exists())
    return {**os.environ, "PATH": path, "OLLAMA_HOST": "127.0.0.1:9"}


def test_register_without_ollama_says_how_to_get_it(cfg, tmp_path):
    write_modelfile(cfg)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "register", "--config", str(cfg.source)],
                          cwd=REPO, capture_output=True, text=True, env=without_ollama_env(tmp_path))
    assert proc.returncode == 1
    assert "Ollama is not available" in proc.stderr and "https://ollama.com/download" in proc.stderr
    assert "OLLAMA_HOST" in proc.stderr
    assert not cfg.ollama_stamp.exists()
    status = subprocess.run([sys.executable, "-m", "pipeline", "ollama-status", "--config", str(cfg.source)],
                            cwd=REPO, capture_output=True, text=True, env=without_ollama_env(tmp_path))
    assert status.returncode == 3 and "Ollama is not available" in status.stdout


class FakeOllama(http.server.BaseHTTPRequestHandler):
    """A contract test of our REST client, not of Ollama: the endpoints as Ollama
    documents them, and the blob digest check Ollama makes on upload."""

    blobs: dict[str, bytes] = {}
    models: dict[str, dict] = {}
    calls: list[str] = []
    done_reason = "stop"
    answer = "こんにちは。私はアシスタントです。"

    def _reply(self, status: int, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self):  # noqa: N802
        self.calls.append(f"GET {self.path}")
        self._reply(200, {"version": "0.0.0-contract"}) if self.path == "/api/version" else self._reply(404)

    def do_HEAD(self):  # noqa: N802
        self.calls.append(f"HEAD {self.path}")
        digest = self.path.rsplit("/", 1)[-1]
        self._reply(200 if digest in self.blobs else 404)

    def do_POST(self):  # noqa: N802
        self.calls.append(f"POST {self.path}")
        body = self._body()
        if self.path.startswith("/api/blobs/"):
            digest = self.path.rsplit("/", 1)[-1]
            if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                return self._reply(400, {"error": "digest mismatch"})
            self.blobs[digest] = body
            return self._reply(201)
        req = json.loads(body)
        if self.path == "/api/create":
            missing = [d for d in req["files"].values() if d not in self.blobs]
            if missing:
                return self._reply(400, {"error": f"blob not found: {missing[0]}"})
            self.models[req["model"]] = req
            return self._reply(200, {"status": "success"})
        if self.path == "/api/chat":
            if req["model"] not in self.models and not shutil.which("ollama"):
                return self._reply(404, {"error": "model not found"})
            return self._reply(200, {"message": {"role": "assistant", "content": self.answer},
                                     "done": True, "done_reason": self.done_reason})
        self._reply(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_ollama(monkeypatch):
    FakeOllama.blobs, FakeOllama.models, FakeOllama.calls = {}, {}, []
    FakeOllama.done_reason, FakeOllama.answer = "stop", "こんにちは。私はアシスタントです。"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{server.server_port}")
    yield FakeOllama
    server.shutdown()


@pytest.fixture
def no_ollama_cli(monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "ollama").exists()))


@pytest.fixture
def built(cfg, tiny_phi3_dir):
    """A real (tiny) quantized GGUF and its Modelfile, as make would leave them."""
    from pipeline import llamacpp

    try:
        llamacpp.require_install()
    except llamacpp.ToolchainError as e:
        pytest.skip(f"pinned llama.cpp not built ({e})")
    gguf = cfg.gguf_path("Q4_K_M")
    llamacpp.convert_hf_to_gguf(tiny_phi3_dir, gguf, "q8_0", model_name="t-phi3")
    write_modelfile(cfg)
    return cfg


def test_register_through_the_rest_api_uploads_once_and_proves_the_model(built, fake_ollama, no_ollama_cli):
    stamp = json.loads(register(built).read_text())
    digest = "sha256:" + stamp["gguf_sha256"]
    assert list(fake_ollama.blobs) == [digest]
    req = fake_ollama.models[built.ollama.model]
    assert req["files"] == {"t-q4_k_m.gguf": digest}
    assert req["template"].startswith("{{- range $i, $_ := .Messages }}")
    assert req["parameters"]["stop"] == STOPS and req["parameters"]["num_ctx"] == 2048
    assert req["system"] == built.ollama.system
    assert stamp["proof"]["answer"] == fake_ollama.answer
    # a second registration finds the blob on the server and does not upload it again
    fake_ollama.calls.clear()
    register(built)
    assert not any(c.startswith("POST /api/blobs") for c in fake_ollama.calls)


def test_client_digest_matches_what_the_server_checks(built, fake_ollama, tmp_path):
    from pipeline.ollama import OllamaClient

    gguf = built.gguf_path("Q4_K_M")
    with pytest.raises(OllamaError, match="digest mismatch"):
        OllamaClient().push_blob(gguf, "sha256:" + "0" * 64)


@pytest.mark.parametrize("done_reason,answer,message", [
    ("length", "ずっと話し続けます", "not by a stop token"),
    ("stop", "", "the answer is empty"),
    ("stop", "はい<|end|>", "raw special token"),
])
def test_a_model_that_does_not_answer_properly_gets_no_stamp(built, fake_ollama, no_ollama_cli,
                                                             done_reason, answer, message):
    fake_ollama.done_reason, fake_ollama.answer = done_reason, answer
    with pytest.raises(OllamaError, match=message):
        register(built)
    assert not built.ollama_stamp.exists()


def test_a_broken_gguf_is_never_uploaded(built, fake_ollama, no_ollama_cli):
    gguf = built.gguf_path("Q4_K_M")
    gguf.write_bytes(b"GGUX" + gguf.read_bytes()[4:])
    with pytest.raises(Exception, match="t-q4_k_m.gguf"):
        register(built)
    assert not fake_ollama.blobs and not built.ollama_stamp.exists()


def test_family_spec_matches_the_modelfile(cfg):
    from pipeline.ollama import family_spec

    template, stops = family_spec("phi3")
    assert stops == STOPS and f'TEMPLATE """{template}"""' in render_modelfile(cfg)


@pytest.fixture
def stand_in_cli(tmp_path, monkeypatch, fake_ollama):
    """An `ollama` script that logs its call (the server side is fake_ollama)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "ollama-calls.jsonl"
    script = bindir / "ollama"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "mf = open(sys.argv[-1]).read()\n"
        "src = [l.split(' ', 1)[1] for l in mf.splitlines() if l.startswith('FROM ')][0]\n"
        f"open({str(log)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
        "    'from_exists': os.path.isfile(src), 'host': os.environ.get('OLLAMA_HOST')}) + '\\n')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_register_uses_the_ollama_cli_when_installed(built, stand_in_cli):
    stamp = json.loads(register(built).read_text())
    call = json.loads(stand_in_cli.read_text().splitlines()[0])
    assert call["argv"] == ["create", built.ollama.model, "-f", "Modelfile"]
    assert Path(call["cwd"]) == built.modelfile_path.parent and call["from_exists"]
    assert call["host"].startswith("http://127.0.0.1:")
    assert stamp["model"] == built.ollama.model and len(stamp["gguf_sha256"]) == 64


@pytest.mark.skipif(shutil.which("ollama") is None, reason="no `ollama` on PATH: the real end-to-end test needs one")
def test_real_ollama_registers_answers_and_stops(built):
    """Against a real Ollama (OLLAMA_HOST or the default): create, chat, stop."""
    from pipeline.ollama import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    stamp = json.loads(register(built).read_text())
    assert stamp["proof"]["answer"]


CONVERSATIONS = [
    [{"role": "user", "content": "こんにちは"}],
    [{"role": "system", "content": "丁寧に答えてください。"}, {"role": "user", "content": "富士山の高さは？"}],
    [{"role": "user", "content": "おすすめの本は？"}, {"role": "assistant", "content": "『坊っちゃん』です。"},
     {"role": "user", "content": "作者は？"}],
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "黄金比は？\n改行も。"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system", "multi-turn", "mixed"])
def test_ollama_template_renders_what_the_tokenizer_renders(tiny_phi3_dir, messages):
    """Ollama's TEMPLATE (rendered by tests/gotemplate.py, a subset of Go's
    text/template) gives the same prompt text as the model's own chat template."""
    from gotemplate import render
    from transformers import AutoTokenizer

    from pipeline.ollama import family_spec

    template, _ = family_spec("phi3")
    want = AutoTokenizer.from_pretrained(str(tiny_phi3_dir)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    got = render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    assert got == want


def test_the_oracle_can_tell_a_wrong_template():
    from gotemplate import render

    wrong = '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}\n{{ end }}<|assistant|>\n'
    got = render(wrong, {"Messages": [{"Role": "user", "Content": "hi"}]})
    assert got == "<|user|>\nhi\n<|assistant|>\n"  # no <|end|>: the Phi-3 check would fail it


def test_stops_are_checked_against_the_models_own_files(cfg, tmp_path):
    from pipeline.ollama import required_stops

    base = cfg.resolve(cfg.model.base)
    assert required_stops(base) == set(STOPS)
    custom = cfg.model_copy(update={"ollama": cfg.ollama.model_copy(
        update={"template": "{{ .Prompt }}", "stop": ["<|end|>", "<|user|>"]})})
    with pytest.raises(OllamaError, match=r"stops lack \['<\|assistant\|>', '<\|endoftext\|>', '<\|system\|>'\]"):
        write_modelfile(custom)
    assert not custom.modelfile_path.exists()
    full = cfg.model_copy(update={"ollama": cfg.ollama.model_copy(update={"template": "{{ .Prompt }}", "stop": STOPS})})
    text = write_modelfile(full).read_text(encoding="utf-8")
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and "# Chat format from ollama.template" in text


def test_custom_template_needs_its_stops(tiny_phi3_dir, tmp_path):
    from pipeline.config import ConfigError

    bad = small_config(tiny_phi3_dir, tmp_path / "b", ollama={"template": "{{ .Prompt }}"})
    with pytest.raises(ConfigError, match="ollama.template and ollama.stop go together"):
        load_config(write_config(tmp_path / "c.yaml", bad))
