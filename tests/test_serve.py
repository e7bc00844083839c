"""POST /think (pipeline/serve.py): only <final> goes out, in JSON and NDJSON, behind the limits.

An in-process app talks over real HTTP to a crafted OpenAI-compatible backend (uvicorn in a
thread) for the positive path, the errors and the limits; the slow group runs `pipeline serve`
against a real llama-server on a GGUF of the tiny model, which emits no tags: the 502 path
and streaming end to end.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from conftest import REPO
from crafted_backend import HOSTILE_PIECES, SECRET, Backend, free_port, tiny_llama_server, wait_http
from metrics_fixture import fixture_config
from pipeline.audit import verify
from pipeline.config import load_config
from pipeline.errors import BadInputError
from pipeline.serve import ServeSettings, create_app, serve_settings

TOKEN = "t0ken-for-tests-0123456789"


@pytest.fixture(scope="module")
def backend():
    b = Backend().start()
    yield b
    b.stop()


@pytest.fixture
def make_client(backend, tmp_path):
    backend.reset()
    made = []

    def make(**overrides) -> TestClient:
        opts = dict(backend_url=backend.url, backend_model="agiasi-demo", audit_path=tmp_path / "audit" / "think.jsonl")
        client = TestClient(create_app(ServeSettings(**{**opts, **overrides})))
        made.append(client)
        return client
    yield make
    for c in made:
        c.close()


def audit_lines(tmp_path) -> list[dict]:
    path = tmp_path / "audit" / "think.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def ndjson(response) -> list[dict]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


# -- the positive path ----------------------------------------------------------------------------

def test_think_answers_the_final_only(make_client, backend, tmp_path):
    backend.content = f"<think-plan>{SECRET}</think-plan>\n<final> こんにちは </final>"
    backend.fields = {"reasoning_content": SECRET}
    r = make_client().post("/think", json={"prompt": "挨拶して", "system": "丁寧に"})
    assert r.status_code == 200 and r.json()["final"] == "こんにちは"
    assert backend.requests[-1]["messages"] == [{"role": "system", "content": "丁寧に"},
                                                {"role": "user", "content": "挨拶して"}]
    [line] = audit_lines(tmp_path)
    assert line["request_id"] == r.json()["request_id"] and line["outcome"] == "ok"
    assert set(line["thinking"]) == {"think-plan", "reasoning_content"}
    assert verify(tmp_path / "audit" / "think.jsonl") == 1


def test_stream_sends_only_final_deltas_then_done(make_client, backend, tmp_path):
    backend.content, backend.chunk = f"<think>{SECRET}</think><final>abc def</final>", 2
    with make_client().stream("POST", "/think", json={"prompt": "p", "stream": True}) as r:
        r.read()
    lines = ndjson(r)
    assert "".join(x["text"] for x in lines if x["type"] == "delta") == "abc def"
    assert all(set(x) == {"type", "text"} for x in lines[:-1])
    assert lines[-1] == {"type": "done", "request_id": audit_lines(tmp_path)[0]["request_id"]}
    assert backend.requests[-1]["stream"] is True


# -- no thinking leaves, whatever the reply --------------------------------------------------------

hostile = st.lists(st.sampled_from(HOSTILE_PIECES), max_size=8).map("".join)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=hostile, chunk=st.integers(1, 7), stream=st.booleans())
def test_no_thinking_in_responses_streams_errors_or_the_log(make_client, backend, tmp_path, reply, chunk, stream):
    backend.content, backend.chunk, backend.fields = reply, chunk, {"thinking": SECRET}
    with make_client().stream("POST", "/think", json={"prompt": "p", "stream": stream}) as r:
        body = r.read().decode()
    assert not set(SECRET) & set(body), body
    assert r.status_code in (200, 502)
    log = (tmp_path / "audit" / "think.jsonl").read_text()
    assert not set(SECRET) & set(json.loads(json.dumps(log))) and "\\u" not in log


def test_no_final_is_502_without_quoting_the_reply(make_client, backend, tmp_path):
    backend.content = f"<think>{SECRET}</think> no final here"
    r = make_client().post("/think", json={"prompt": "p"})
    assert r.status_code == 502 and set(r.json()) == {"error", "request_id"}
    assert "no <final>" in r.json()["error"] and "here" not in r.text
    assert audit_lines(tmp_path)[0]["outcome"] == "no_final"
    with make_client().stream("POST", "/think", json={"prompt": "p", "stream": True}) as r:
        r.read()
    last = ndjson(r)[-1]
    assert last["type"] == "error" and "no <final>" in last["error"] and set(last) == {"type", "error", "request_id"}


# -- the backend's failures ---------------------------------------------------------------------------

def test_backend_down_is_a_clear_503(make_client, tmp_path):
    client = make_client(backend_url=f"http://127.0.0.1:{free_port()}/v1")
    for stream in (False, True):
        r = client.post("/think", json={"prompt": "p", "stream": stream})
        assert r.status_code == 503 and "not reachable" in r.json()["error"]
    assert [x["outcome"] for x in audit_lines(tmp_path)] == ["backend_unavailable"] * 2


def test_backend_timeout_is_504(make_client, backend, tmp_path):
    backend.delay = 2
    r = make_client(backend_timeout=0.3).post("/think", json={"prompt": "p"})
    assert r.status_code == 504 and "sent nothing for 0.3 s" in r.json()["error"]


def test_a_stream_that_goes_silent_ends_with_an_error_line(make_client, backend, tmp_path):
    backend.content, backend.chunk, backend.stall = "<final>abc</final>", 8, 2
    with make_client(backend_timeout=0.3).stream("POST", "/think", json={"prompt": "p", "stream": True}) as r:
        r.read()
    lines = ndjson(r)
    assert lines[0] == {"type": "delta", "text": "a"} and lines[-1]["type"] == "error"
    assert "sent nothing for 0.3 s" in lines[-1]["error"]
    assert audit_lines(tmp_path)[0]["outcome"] == "backend_timeout" and audit_lines(tmp_path)[0]["final"] is None


def test_backend_error_status_is_502_naming_it_not_its_body(make_client, backend):
    backend.status = 404
    r = make_client().post("/think", json={"prompt": "p"})
    assert r.status_code == 502 and "HTTP 404" in r.json()["error"] and "no model 'agiasi-demo'" in r.json()["error"]
    assert SECRET not in r.text


# -- limits -------------------------------------------------------------------------------------------

@pytest.mark.reliability("untrusted-input")
def test_request_limits(make_client, backend, tmp_path):
    client = make_client(max_body_bytes=2048)
    assert client.post("/think", json={"prompt": "x" * 4000}).status_code == 413
    chunked = client.post("/think", content=iter([b'{"prompt": "', b"x" * 4000, b'"}']),
                          headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert client.post("/think", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    r = client.post("/think", json={"prompt": "", "extra": SECRET})
    assert r.status_code == 422 and "prompt" in r.json()["error"] and SECRET not in r.text
    assert client.post("/think", json={"prompt": 5}).status_code == 422
    # a cross-site form cannot post JSON: any other content type is refused
    assert client.post("/think", content=b'{"prompt": "p"}', headers={"content-type": "text/plain"}).status_code == 422
    assert audit_lines(tmp_path) == []  # refused before the backend: no line


@pytest.mark.reliability("untrusted-input")
def test_token_guards_every_request(make_client):
    client = make_client(token=TOKEN)
    assert client.post("/think", json={"prompt": "p"}).status_code == 401
    assert client.get("/healthz").status_code == 401
    assert client.get("/healthz", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert client.get("/healthz", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/?token=nope", follow_redirects=False).status_code == 401
    r = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "agiasi_token=" in cookie
    assert client.post("/think", json={"prompt": "p"}).status_code == 200  # the cookie now


def test_loopback_without_token_checks_the_host_header(make_client):
    client = make_client(allowed_hosts=("127.0.0.1", "localhost"))
    assert client.get("/healthz").status_code == 421  # "testserver": a rebound DNS name
    assert client.get("/healthz", headers={"host": "127.0.0.1:8642"}).status_code == 200


@pytest.mark.reliability("untrusted-input")
def test_binding_elsewhere_needs_a_token(tmp_path):
    cfg = load_config(fixture_config(tmp_path))
    with pytest.raises(BadInputError, match="refusing to listen on 0.0.0.0 without a token"):
        serve_settings(cfg, host="0.0.0.0")
    with pytest.raises(BadInputError, match="shorter than 16"):
        serve_settings(cfg, host="0.0.0.0", token="short")
    host, s = serve_settings(cfg, host="0.0.0.0", token=TOKEN)
    assert s.token == TOKEN and s.allowed_hosts is None
    _, s = serve_settings(cfg)
    assert s.token is None and "127.0.0.1" in s.allowed_hosts
    assert s.backend_model == cfg.ollama.model and s.backend_url.endswith("/v1") and s.audit_path == cfg.audit_log
    with pytest.raises(BadInputError, match="--backend"):
        serve_settings(cfg, backend="ftp://x")
    out = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--config", str(fixture_config(tmp_path)),
                          "--host", "0.0.0.0"], capture_output=True, text=True, cwd=REPO,
                         env={k: v for k, v in os.environ.items() if k != "AGIASI_SERVE_TOKEN"})
    assert out.returncode == 2 and "AGIASI_SERVE_TOKEN" in out.stderr and "Traceback" not in out.stderr


# -- concurrency ----------------------------------------------------------------------------------

@pytest.mark.reliability("concurrency")
def test_concurrent_requests_each_leave_one_whole_line(backend, tmp_path):
    backend.content, backend.delay, backend.status, backend.fields = f"<think>{SECRET}</think><final>ok</final>", 0.05, 200, {}
    backend.stall = 0
    app = create_app(ServeSettings(backend_url=backend.url, backend_model="m", audit_path=tmp_path / "think.jsonl",
                                   max_concurrent=40))

    async def many():
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t") as client:
            return await asyncio.gather(*[client.post("/think", json={"prompt": f"p{i}", "stream": i % 2 == 1})
                                          for i in range(40)])
    responses = asyncio.run(many())
    assert all(r.status_code == 200 for r in responses)
    assert verify(tmp_path / "think.jsonl") == 40
    ids = {json.loads(x)["request_id"] for x in (tmp_path / "think.jsonl").read_text().splitlines()}
    assert len(ids) == 40


# -- a real llama-server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_server(tiny_phi3_dir, tmp_path_factory):
    with tiny_llama_server(tiny_phi3_dir, tmp_path_factory.mktemp("gguf"), "-n", "24") as url:
        yield url


@pytest.mark.slow
def test_serve_against_a_real_llama_server(llama_server, tmp_path):
    config = fixture_config(tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--config", str(config), "--port", str(port),
                             "--backend", llama_server, "--backend-model", "tiny"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", proc)
        r = httpx2.post(base + "/think", json={"prompt": "こんにちは"}, timeout=120)
        assert r.status_code == 502 and "no <final>" in r.json()["error"]  # the tiny model emits no tags
        with httpx2.stream("POST", base + "/think", json={"prompt": "こんにちは", "stream": True}, timeout=120) as s:
            lines = [json.loads(x) for x in s.iter_lines() if x]
        assert s.headers["content-type"].startswith("application/x-ndjson")
        assert lines[-1]["type"] == "error" and "no <final>" in lines[-1]["error"]
        assert all(x["type"] == "delta" for x in lines[:-1])
    finally:
        proc.terminate()
        proc.wait(10)
    log = load_config(config).audit_log
    assert verify(log) == 2
    assert [json.loads(x)["stream"] for x in log.read_text().splitlines()] == [False, True]
    out = subprocess.run([sys.executable, "-m", "pipeline", "audit", "verify", "--config", str(config)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
