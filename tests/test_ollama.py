"""The Modelfile and registration (the ollama CLI itself is stood in for by a script
here: these tests check what we hand to Ollama, not Ollama)."""
from __future__ import annotations

import http.server
import json
import os
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


class _Version(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = json.dumps({"version": "0.0.0-test"}).encode()
        self.send_response(200 if self.path == "/api/version" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_ollama(tmp_path, monkeypatch):
    """A local /api/version endpoint and an `ollama` script that logs its call."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Version)
    threading.Thread(target=server.serve_forever, daemon=True).start()
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
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{server.server_port}")
    yield log
    server.shutdown()


def test_register_runs_ollama_create_and_writes_the_stamp(cfg, stand_in_ollama):
    gguf = cfg.gguf_path("Q4_K_M")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_bytes(b"GGUF stand-in")
    write_modelfile(cfg)
    stamp = json.loads(register(cfg).read_text())
    call = json.loads(stand_in_ollama.read_text().splitlines()[0])
    assert call["argv"] == ["create", cfg.ollama.model, "-f", "Modelfile"]
    assert Path(call["cwd"]) == cfg.modelfile_path.parent and call["from_exists"]
    assert call["host"].startswith("http://127.0.0.1:")
    assert stamp["model"] == cfg.ollama.model and len(stamp["gguf_sha256"]) == 64
