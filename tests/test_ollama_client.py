"""The Ollama client as a user's network meets it: proxies, odd OLLAMA_HOST values, servers that
answer something other than Ollama's JSON, and long work that streams.

Each case is a message naming the host and what came back, never a traceback; the plan's stamp
check keeps the stamp and never stops a make target.
"""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, small_config, write_config
from pipeline.config import load_config
from pipeline.errors import BadInputError, OllamaError
from pipeline.ollama import NoServerError, OllamaClient, OllamaTimeout, stamp_follows_server
from pipeline.serve import serve_settings


def start(handler_class, host: str = "127.0.0.1") -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer((host, 0), handler_class)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"{host}:{server.server_port}"


def send_json(handler: http.server.BaseHTTPRequestHandler, obj) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


# -- a proxy that records what it is asked ------------------------------------------------------

class RecordingProxy(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy: records each request line (absolute URI) and answers as Ollama's
    /api/version would, so a request that goes through it still succeeds."""

    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        self.seen.append(f"{self.command} {self.path}")
        send_json(self, {"version": "0.33.0"})

    def log_message(self, *args):
        pass


class Version(RecordingProxy):
    """The real server for the loopback cases: it answers /api/version (and records apart)."""

    seen: list[str] = []


@pytest.fixture
def proxy(monkeypatch):
    RecordingProxy.seen = []
    server, address = start(RecordingProxy)
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://{address}")
    monkeypatch.setenv("HTTP_PROXY", f"http://{address}")
    yield RecordingProxy.seen
    server.shutdown()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.0.0.2"])
def test_loopback_never_goes_through_the_proxy(proxy, monkeypatch, host):
    server, address = start(Version, "127.0.0.2" if host == "127.0.0.2" else "127.0.0.1")
    port = address.rsplit(":", 1)[1]
    monkeypatch.setenv("OLLAMA_HOST", f"{host}:{port}")
    Version.seen = []
    try:
        assert OllamaClient().version() == "0.33.0"
    finally:
        server.shutdown()
    assert proxy == [] and Version.seen == ["GET /api/version"]


def test_a_remote_host_goes_through_the_proxy_and_no_proxy_exempts_it(proxy, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "http://ollama.example.invalid:11434")
    assert OllamaClient().version() == "0.33.0"  # answered by the proxy: the name never resolves here
    assert proxy == ["GET http://ollama.example.invalid:11434/api/version"]
    monkeypatch.setenv("no_proxy", ".example.invalid")
    with pytest.raises(NoServerError, match="ollama.example.invalid"):
        OllamaClient().version()  # direct now: the name does not resolve
    assert len(proxy) == 1


def test_serves_backend_reaches_loopback_directly(proxy, tmp_path, tiny_phi3_dir):
    """make serve's backend client follows the same rule: /think reaches a loopback backend
    while http_proxy points at the recording proxy."""
    from starlette.testclient import TestClient

    from pipeline.serve import create_app

    class Backend(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            send_json(self, {"choices": [{"message": {"role": "assistant", "content": "<final>直接</final>"}}]})

        def log_message(self, *args):
            pass

    server, address = start(Backend)
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "b")))
    _, settings = serve_settings(cfg, backend=f"http://{address}/v1")
    try:
        reply = TestClient(create_app(settings), base_url="http://127.0.0.1").post("/think", json={"prompt": "こんにちは"})
    finally:
        server.shutdown()
    assert reply.status_code == 200, reply.text
    assert reply.json()["final"] == "直接" and proxy == []


# -- Go's proxy rules, case by case ---------------------------------------------------------------

@pytest.mark.parametrize("url,env,want", [
    ("http://127.0.0.1:11434", {"http_proxy": "p:3128"}, None),
    ("http://[::1]:11434", {"http_proxy": "p:3128"}, None),
    ("http://localhost:11434", {"http_proxy": "p:3128"}, None),
    ("http://LOCALHOST:11434", {"http_proxy": "p:3128"}, "http://p:3128"),  # Go compares case-sensitively
    ("http://gpu:11434", {"http_proxy": "p:3128"}, "http://p:3128"),  # no scheme: http://
    ("http://gpu:11434", {"HTTP_PROXY": "http://P:1", "http_proxy": "http://p:2"}, "http://P:1"),  # upper first
    ("https://gpu", {"http_proxy": "p:3128"}, None),  # https uses HTTPS_PROXY only
    ("https://gpu", {"https_proxy": "https://p:3128"}, "https://p:3128"),
    ("http://gpu:11434", {"http_proxy": "p:3128", "REQUEST_METHOD": "GET"}, None),  # CGI
    ("http://a.corp.com", {"http_proxy": "p", "no_proxy": "corp.com"}, None),
    ("http://corp.com", {"http_proxy": "p", "no_proxy": "corp.com"}, None),
    ("http://corp.com", {"http_proxy": "p", "no_proxy": ".corp.com"}, "http://p"),
    ("http://a.corp.com", {"http_proxy": "p", "no_proxy": "*.corp.com"}, None),
    ("http://10.1.2.3:11434", {"http_proxy": "p", "no_proxy": "10.0.0.0/8"}, None),
    ("http://11.1.2.3:11434", {"http_proxy": "p", "no_proxy": "10.0.0.0/8"}, "http://p"),
    ("http://gpu:8080", {"http_proxy": "p", "no_proxy": "gpu:8080"}, None),
    ("http://gpu:11434", {"http_proxy": "p", "no_proxy": "gpu:8080"}, "http://p"),
    ("http://gpu:11434", {"http_proxy": "p", "no_proxy": " * "}, None),
    ("http://gpu:11434", {"http_proxy": "p", "NO_PROXY": "gpu", "no_proxy": "x"}, None),
    ("http://[::ffff:127.0.0.1]:11434", {"http_proxy": "p"}, None),  # IPv4-mapped loopback
    ("http://[fd00::1]:11434", {"http_proxy": "p", "no_proxy": "fd00::/8"}, None),
    ("http://[fd00::1]:11434", {"http_proxy": "p", "no_proxy": "[fd00::1]:11434"}, None),
    ("http://[fd00::1]:80", {"http_proxy": "p", "no_proxy": "[fd00::1]:11434"}, "http://p"),
    ("http://gpu:11434", {"http_proxy": "socks5://s:1080"}, "socks5://s:1080"),
])
def test_proxy_rules_are_gos(url, env, want):
    """Each case as Go's own net/http.ProxyFromEnvironment answers it (tests/goproxy, built with
    Debian's Go), and as pipeline/goproxy.py does."""
    from gotemplate import binary

    from pipeline.goproxy import proxy_for

    clean = {k: v for k, v in os.environ.items() if k.upper() not in PROXY_VARIABLES}
    go = json.loads(subprocess.run([str(binary("goproxy")), url], env={**clean, **env}, capture_output=True,
                                   text=True, check=True).stdout)
    if "REQUEST_METHOD" in env:
        assert "CGI" in go["error"]  # Go refuses the request; we go direct, never through HTTP_PROXY
    else:
        assert go == {"proxy": want}
    assert proxy_for(url, env) == want


PROXY_VARIABLES = {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "REQUEST_METHOD"}


# -- OLLAMA_HOST values no client can use -----------------------------------------------------------

ODD_HOSTS = ["http://user:pass@proxy:8080", "h:+80", "[]", "http://ex ample:11434"]


@pytest.mark.parametrize("value", ODD_HOSTS)
def test_an_unusable_ollama_host_is_a_message(value, monkeypatch, tmp_path, tiny_phi3_dir):
    monkeypatch.setenv("OLLAMA_HOST", value)
    with pytest.raises(NoServerError, match="OLLAMA_HOST=.*names no server"):
        OllamaClient()
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "b")))
    with pytest.raises(BadInputError, match="OLLAMA_HOST="):
        serve_settings(cfg)
    keeps_the_stamp(cfg)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "ollama-status", "--config", str(cfg.source)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 3 and "Ollama is not available: OLLAMA_HOST=" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def keeps_the_stamp(cfg) -> str:
    """The stamp check keeps the stamp and says why; `plan`, which pipeline.mk runs before every
    target, still ends 0 without a traceback, so no make target is stopped by it."""
    cfg.ollama_stamp.parent.mkdir(parents=True, exist_ok=True)
    cfg.ollama_stamp.write_text(json.dumps({"model": cfg.ollama.model, "server_digest": "abc"}))
    line = stamp_follows_server(cfg)
    assert cfg.ollama_stamp.exists(), line
    assert "keeping ollama.json" in line
    plan = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--config", str(cfg.source)], cwd=REPO,
                          capture_output=True, text=True)
    assert plan.returncode == 0 and "keeping ollama.json" in plan.stderr, plan.stderr
    assert "Traceback" not in plan.stderr and cfg.ollama_stamp.exists()
    return line


# -- servers that answer something else ---------------------------------------------------------------

class Odd(http.server.BaseHTTPRequestHandler):
    """Answers every request with `reply`: (status, content type, body); a body that is a list is
    sent line by line without a length, `pause` seconds apart; None closes the connection."""

    reply: tuple[int, str, object] | None = None
    pause = 0.0

    def _answer(self):
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.reply is None:
            self.connection.close()
            return
        status, kind, body = self.reply
        self.send_response(status)
        self.send_header("Content-Type", kind)
        if isinstance(body, list):
            self.end_headers()
            for line in body:
                self.wfile.write(line)
                self.wfile.flush()
                time.sleep(self.pause)
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def odd(monkeypatch):
    Odd.reply, Odd.pause = None, 0.0
    server, address = start(Odd)
    monkeypatch.setenv("OLLAMA_HOST", address)
    yield Odd
    server.shutdown()


HTML = b"<html><body>It works!</body></html>"
ODD_ANSWERS = {
    "html page": ((200, "text/html", HTML), NoServerError, "text/html.*It works.*not Ollama's JSON"),
    "json array": ((200, "application/json", b"[1, 2]"), NoServerError, "not Ollama's JSON"),
    "empty 200": ((200, "application/json", b""), NoServerError, "answered 200"),
    "proxy 502": ((502, "text/html", b"<h1>Bad Gateway</h1>"), NoServerError, "answered 502.*Bad Gateway"),
    "closed": (None, NoServerError, "no Ollama server answers"),
}


@pytest.mark.parametrize("reply,error,message", ODD_ANSWERS.values(), ids=ODD_ANSWERS.keys())
def test_an_odd_answer_is_a_message(odd, reply, error, message, tmp_path, tiny_phi3_dir):
    odd.reply = reply
    with pytest.raises(error, match=message) as caught:
        OllamaClient().version()
    assert "127.0.0.1" in str(caught.value)
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "b")))
    keeps_the_stamp(cfg)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "ollama-status", "--config", str(cfg.source)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 3 and "Traceback" not in proc.stdout + proc.stderr


def test_the_stamp_check_survives_an_html_tags_answer(odd, tmp_path, tiny_phi3_dir):
    odd.reply = (200, "text/html", HTML)
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "b")))
    assert "text/html" in keeps_the_stamp(cfg)


STREAMS = {
    "error line": ([b'{"status":"parsing GGUF"}\n', b'{"error":"no space left on device"}\n'],
                   "failed while creating m: no space left on device"),
    "not json": ([b'{"status":"parsing GGUF"}\n', b"<html>\n"], "a line that is not Ollama's JSON"),
    "no success": ([b'{"status":"parsing GGUF"}\n'], "ended without success"),
}


@pytest.mark.parametrize("lines,message", STREAMS.values(), ids=STREAMS.keys())
def test_a_create_stream_that_fails_names_why(odd, lines, message):
    odd.reply = (200, "application/x-ndjson", lines)
    said = []
    with pytest.raises(OllamaError, match=message):
        OllamaClient(say=said.append).create("m", {}, "", "", {})
    assert said == ["[ollama] parsing GGUF"]


def test_a_long_create_that_streams_progress_outlives_the_read_timeout(odd):
    """Five progress lines 0.4 s apart: 2 s in all, against a client that gives up after 1 s of silence."""
    progress = [json.dumps({"status": "validating GGUF model", "total": 100, "completed": c}).encode() + b"\n"
                for c in (0, 25, 50, 75, 100)]
    odd.reply, odd.pause = (200, "application/x-ndjson", [*progress, b'{"status":"success"}\n']), 0.4
    said = []
    started = time.monotonic()
    OllamaClient(timeout=1.0, say=said.append).create("m", {}, "", "", {})
    assert time.monotonic() - started > 2.0
    assert said[0] == "[ollama] validating GGUF model" and "[ollama] validating GGUF model: 50%" in said
    assert said[-1] == "[ollama] success"


def test_silence_is_a_timeout_that_says_so(odd):
    odd.reply, odd.pause = (200, "application/x-ndjson", [b'{"status":"parsing GGUF"}\n', b""]), 1.5
    with pytest.raises(OllamaTimeout, match=r"sent nothing for 0.5 s while creating m.*make ollama"):
        OllamaClient(timeout=0.5, say=lambda _: None).create("m", {}, "", "", {})
