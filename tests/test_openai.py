"""The OpenAI-compatible /v1 of `python -m pipeline serve`, through real clients.

The `openai` SDK and LangChain's ChatOpenAI (both pinned in requirements/test.txt) talk to a real
`python -m pipeline serve` process, whose backend is the crafted one (tests/crafted_backend.py:
hostile replies, slow streams, errors) or, in the slow group, a real llama-server running the
tiny model with a grammar that makes it write a thinking section and a final.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_openai import ChatOpenAI
from starlette.testclient import TestClient

from conftest import REPO
from crafted_backend import HOSTILE_PIECES, SECRET, Backend, free_port, tiny_llama_server
from metrics_fixture import fixture_config
from pipeline.audit import verify
from pipeline.config import load_config
from pipeline.serve import ServeSettings, create_app
from pipeline.thinking import filter_reply

TOKEN = "t0ken-for-tests-0123456789"
MODEL = "agiasi-demo"
KEEPALIVE = 0.2
MAX_CONCURRENT = 3


def start_serve(config, backend_url: str, backend_model: str = MODEL) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--config", str(config), "--port", str(port),
                             "--backend", backend_url, "--backend-model", backend_model], cwd=REPO,
                            env={**os.environ, "AGIASI_SERVE_TOKEN": TOKEN},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx2.get(base + "/healthz", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1).status_code == 200:
                return proc, base
        except httpx2.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("pipeline serve did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def backend():
    b = Backend().start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def served(backend, tmp_path_factory):
    """(base URL, audit log) of one `pipeline serve` for the module, its backend the crafted one."""
    root = tmp_path_factory.mktemp("v1")
    config = fixture_config(root, serve={"keepalive_interval": KEEPALIVE, "max_concurrent": MAX_CONCURRENT,
                                         "backend_timeout": 5})
    proc, base = start_serve(config, backend.url)
    yield base, load_config(config).audit_log
    stop(proc)


@pytest.fixture
def api(served, backend):
    backend.reset()
    base, _ = served
    return openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0, timeout=30)


def audit_line(served, request_id: str) -> dict:
    _, log = served
    for _ in range(50):  # the line is written as the exchange closes, just after the last byte
        lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        found = [x for x in lines if x["request_id"] == request_id]
        if found:
            assert len(found) == 1
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no audit line for {request_id}")


def no_secret(text: str) -> bool:
    return not set(SECRET) & set(text)


# -- the positive path ----------------------------------------------------------------------------

def test_models_lists_the_run_model(api):
    models = api.models.list()
    [model] = models.data
    assert model.id == MODEL and model.object == "model" and model.owned_by and model.created > 0


def test_a_completion_carries_the_final_only(api, backend, served):
    backend.content = f"<think-plan>{SECRET}</think-plan>\n<final> こんにちは </final>"
    backend.fields = {"reasoning_content": SECRET, "reasoning": SECRET}
    backend.usage = {"prompt_tokens": 7, "completion_tokens": 21, "total_tokens": 28}
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "丁寧に"}, {"role": "user", "content": "挨拶して"}],
        temperature=0.2, top_p=0.9, max_tokens=64, seed=3)
    done = raw.parse()
    assert done.object == "chat.completion" and done.model == MODEL and done.id.startswith("chatcmpl-")
    [choice] = done.choices
    assert choice.message.role == "assistant" and choice.message.content == "こんにちは"
    assert choice.finish_reason == "stop" and choice.index == 0
    body = json.loads(raw.http_response.text)
    assert no_secret(raw.http_response.text)
    assert not {"reasoning", "reasoning_content", "thinking"} & set(body["choices"][0]["message"])
    # usage is the backend's: completion_tokens counts the thinking it generated (README, Serving)
    assert done.usage.completion_tokens == 21 and done.usage.total_tokens == 28
    sent = backend.requests[-1]
    assert sent["messages"] == [{"role": "system", "content": "丁寧に"}, {"role": "user", "content": "挨拶して"}]
    assert (sent["model"], sent["temperature"], sent["top_p"], sent["max_tokens"], sent["seed"]) == \
        (MODEL, 0.2, 0.9, 64, 3)
    line = audit_line(served, done.id.removeprefix("chatcmpl-"))
    assert line["api"] == "v1" and line["outcome"] == "ok" and line["stream"] is False
    assert set(line["thinking"]) == {"think-plan", "reasoning_content", "reasoning"}
    assert raw.http_response.headers["x-request-id"] == line["request_id"]


def test_content_arrays_and_history_reach_the_backend_as_text(api, backend):
    api.chat.completions.create(model=MODEL, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "短く"}]},
        {"role": "user", "content": [{"type": "text", "text": "一、"}, {"type": "text", "text": "二"}]},
        {"role": "assistant", "content": "三"},
        {"role": "user", "content": "四", "name": "someone"}])
    assert backend.requests[-1]["messages"] == [
        {"role": "system", "content": "短く"}, {"role": "user", "content": "一、二"},
        {"role": "assistant", "content": "三"}, {"role": "user", "content": "四"}]


def test_a_stream_sends_role_then_final_deltas_then_done(api, backend, served):
    backend.content, backend.chunk = f"<think>{SECRET}</think><final>abc def ghi</final>", 2
    backend.usage = {"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35}
    stream = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "p"}], stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and {c.created for c in chunks} == {chunks[0].created}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "abc def ghi"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert backend.requests[-1]["stream_options"] == {"include_usage": True}
    line = audit_line(served, chunks[0].id.removeprefix("chatcmpl-"))
    assert line["api"] == "v1" and line["stream"] is True and line["outcome"] == "ok"


def test_keep_alive_lines_while_the_model_thinks(api, backend, served):
    """Nothing may be sent while the model thinks: comment lines keep the connection alive, and
    the SDK and LangChain read past them."""
    backend.content, backend.chunk, backend.stall = f"<think>{SECRET}{SECRET}</think><final>done</final>", 4, 0.3
    base, _ = served
    with httpx2.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "p"}], "stream": True},
                       timeout=30) as r:
        raw = r.read().decode()
    assert r.headers["content-type"].startswith("text/event-stream")
    assert raw.count(": keep-alive\n\n") >= 3 and raw.endswith("data: [DONE]\n\n") and no_secret(raw)
    chunks = list(api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "p"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "done"
    chat = ChatOpenAI(model=MODEL, base_url=base + "/v1", api_key=TOKEN, max_retries=0, streaming=True)
    assert "".join(part.content for part in chat.stream("p")) == "done"


def test_keep_alive_lines_while_the_model_streams_its_thinking(backend, served):
    """A model that thinks aloud streams steadily, faster than the interval, yet nothing of it may
    be sent: the client still hears a comment line every interval."""
    backend.content, backend.chunk, backend.stall = f"<think>{SECRET * 12}</think><final>done</final>", 2, KEEPALIVE / 4
    base, _ = served
    with httpx2.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "p"}], "stream": True},
                       timeout=30) as r:
        raw = r.read().decode()
    assert raw.count(": keep-alive\n\n") >= 3 and raw.endswith("data: [DONE]\n\n") and no_secret(raw)


def test_langchain_chat_openai(backend, served):
    backend.reset()
    backend.content = f"<think-logic>{SECRET}</think-logic><final>はい</final>"
    base, _ = served
    chat = ChatOpenAI(model=MODEL, base_url=base + "/v1", api_key=TOKEN, max_retries=0, temperature=0)
    reply = chat.invoke([("system", "丁寧に"), ("human", "元気?")])
    assert reply.content == "はい" and no_secret(json.dumps(reply.model_dump(), ensure_ascii=False))
    assert backend.requests[-1]["messages"][0] == {"role": "system", "content": "丁寧に"}


def test_stop_strings_cut_the_final_not_the_thinking(api, backend):
    backend.content, backend.chunk = "<think>one. two.</think><final>first. second.</final>", 3
    done = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "p"}], stop=". ")
    assert done.choices[0].message.content == "first"
    chunks = list(api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "p"}],
                                              stop=["sec", "zz"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "first. "
    assert "stop" not in backend.requests[-1]


# -- no thinking leaves, whatever the reply --------------------------------------------------------

hostile = st.lists(st.sampled_from(HOSTILE_PIECES), max_size=8).map("".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=hostile, chunk=st.integers(1, 7), stream=st.booleans())
def test_no_thinking_in_any_answer_error_or_log(api, backend, served, reply, chunk, stream):
    backend.reset()
    backend.content, backend.chunk, backend.fields = reply, chunk, {"reasoning": SECRET}
    seen = []
    try:
        if stream:
            for c in api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "p"}], stream=True):
                seen.append(c.model_dump_json())
        else:
            seen.append(api.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "p"}]).http_response.text)
    except openai.APIError as err:
        seen += [str(err), json.dumps(err.body, ensure_ascii=False)]
    assert all(no_secret(s) for s in seen), seen
    _, log = served
    assert no_secret(log.read_text()) and "\\u" not in log.read_text()


def test_no_final_raises_the_sdks_error_plain_and_streamed(api, backend, served):
    backend.content = f"<think>{SECRET}</think> no final here"
    with pytest.raises(openai.InternalServerError) as err:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "p"}])
    assert err.value.status_code == 502 and "no <final>" in err.value.message and "here" not in str(err.value.body)
    assert err.value.body["type"] == "server_error" and err.value.body["code"] == "no_final"
    rid = err.value.response.headers["x-request-id"]
    assert audit_line(served, rid)["outcome"] == "no_final"
    stream = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "p"}], stream=True)
    with pytest.raises(openai.APIError, match="no <final>"):
        list(stream)
    line = audit_line(served, stream.response.headers["x-request-id"])
    assert line["outcome"] == "no_final" and line["final"] is None


# -- refusals and limits -----------------------------------------------------------------------------

def test_a_wrong_token_raises_authentication_error(served):
    base, _ = served
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong-token-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.body["code"] == "invalid_api_key"


UNSUPPORTED = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"n": 2}, "n"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 5, "max_completion_tokens": 5}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"extra_body_field": 1}, "extra_body_field"),
]


@pytest.mark.reliability("untrusted-input")
@pytest.mark.parametrize("extra,param", UNSUPPORTED, ids=[p for _, p in UNSUPPORTED])
def test_what_is_not_supported_is_a_400_naming_the_field(api, backend, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "p"}], **extra}
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(**{k: body[k] for k in ("model", "messages")},
                                    extra_body={k: v for k, v in body.items() if k not in ("model", "messages")})
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert backend.requests == []


def test_the_limits_of_think_hold_on_v1_in_openai_shape(backend, tmp_path):
    """Body limit, backend down, backend timeout (before and during a stream), bad JSON: the
    statuses of /think, in OpenAI's error body, each leaving its audit line."""
    backend.reset()
    log = tmp_path / "think.jsonl"
    settings = dict(backend_url=backend.url, backend_model=MODEL, audit_path=log, max_body_bytes=2048,
                    backend_timeout=0.3)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "p"}]}
    with TestClient(create_app(ServeSettings(**settings))) as client:
        r = client.post("/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": "x" * 4000}]})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        backend.delay = 1.0
        r = client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 504 and "sent nothing for 0.3 s" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        backend.reset()
        backend.content, backend.chunk, backend.stall = "<final>abc</final>", 8, 1.0
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
            raw = s.read().decode()
        events = [json.loads(x[len("data: "):]) for x in raw.split("\n\n") if x.startswith("data: ")]
        assert "sent nothing for 0.3 s" in events[-1]["error"]["message"] and "[DONE]" not in raw
    with TestClient(create_app(ServeSettings(**{**settings, "backend_url": f"http://127.0.0.1:{free_port()}/v1"}))) as c:
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 503 and "not reachable" in r.json()["error"]["message"]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["api"], x["outcome"]) for x in lines] == [
        ("v1", "backend_timeout"), ("v1", "backend_timeout"), ("v1", "backend_unavailable")]


def test_another_model_is_404_and_neutral_defaults_pass(api, backend):
    with pytest.raises(openai.NotFoundError) as err:
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "p"}])
    assert err.value.body["code"] == "model_not_found"
    done = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "p"}], n=1, user="u1",
                                       tools=[], tool_choice="none", response_format={"type": "text"})
    assert done.choices[0].message.content == "ok" and "user" not in backend.requests[-1]


def test_past_max_concurrent_is_429_with_retry_after(backend, served):
    """serve.max_concurrent (3 here) requests reach the backend; the others get 429 at once."""
    backend.reset()
    backend.delay = 1.0
    base, _ = served

    async def many():
        async with httpx2.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "p"}]}
            return await asyncio.gather(*[c.post("/v1/chat/completions", json={**body, "stream": i % 2 == 0})
                                          for i in range(MAX_CONCURRENT + 4)])
    responses = asyncio.run(many())
    busy = [r for r in responses if r.status_code == 429]
    assert sorted(r.status_code for r in responses) == [200] * MAX_CONCURRENT + [429] * 4
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error" for r in busy)
    assert len(backend.requests) == MAX_CONCURRENT
    assert [audit_line(served, r.headers["x-request-id"])["outcome"] for r in busy] == ["busy"] * 4
    with openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0) as client:  # the slots are free again
        assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "p"}])


def test_a_client_that_leaves_mid_stream_cancels_the_backend(backend, served):
    backend.content, backend.chunk, backend.stall = "<final>" + "x" * 60 + "</final>", 2, 0.1
    base, log = served
    with httpx2.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "p"}], "stream": True},
                       timeout=30) as r:
        rid = r.headers["x-request-id"]
        for line in r.iter_lines():
            if '"x' in line:
                break  # leave after the first piece of the answer
    line = audit_line(served, rid)
    assert line["outcome"] == "cancelled" and line["final"] is None and line["api"] == "v1"
    for _ in range(50):
        if backend.cut:
            break
        time.sleep(0.05)
    assert backend.cut == 1
    assert verify(log) >= 1


# -- a real llama-server ----------------------------------------------------------------------------

# The tiny model is random: a grammar makes it write a thinking section and a final, as a trained
# model does, so the real server's own words are what the filter must keep or withhold.
GRAMMAR = 'root ::= "<think-logic>" [a-z]{6,12} "</think-logic><final>" [a-z]{3,8} "</final>"'


@pytest.fixture(scope="module")
def grammar_server(tiny_phi3_dir, tmp_path_factory):
    with tiny_llama_server(tiny_phi3_dir, tmp_path_factory.mktemp("gguf"), "-n", "80", "--grammar", GRAMMAR) as url:
        yield url


@pytest.mark.slow
def test_the_sdk_against_a_real_llama_server(grammar_server, tmp_path):
    messages = [{"role": "user", "content": "こんにちは"}]
    direct = httpx2.post(grammar_server + "/chat/completions", json={"model": "tiny", "messages": messages},
                         timeout=120).json()["choices"][0]["message"]["content"]
    expected = filter_reply(direct)
    assert expected.final and expected.sections["think-logic"]  # the model wrote both
    config = fixture_config(tmp_path, serve={"keepalive_interval": 0.05})
    proc, base = start_serve(config, grammar_server, "tiny")
    try:
        api = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
        done = api.chat.completions.create(model="tiny", messages=messages)
        assert done.choices[0].message.content == expected.final
        chunks = list(api.chat.completions.create(model="tiny", messages=messages, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.final
        assert expected.sections["think-logic"] not in done.model_dump_json() + "".join(
            c.model_dump_json() for c in chunks)
        with pytest.raises(openai.APIError, match="no <final>"):  # cut off inside the thinking: no answer
            api.chat.completions.create(model="tiny", messages=messages, max_tokens=3)
    finally:
        stop(proc)
    log = load_config(config).audit_log
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert verify(log) == 3 and [x["outcome"] for x in lines] == ["ok", "ok", "no_final"]
    assert all(x["api"] == "v1" for x in lines)
