"""The guard at serving (serve.guard, pipeline/guard.py): the prompt is judged before the main
model sees it and the final before the client does; unsafe, or no verdict when failing closed,
answers serve.guard.refusal; the audit line keeps the verdicts and never the text.

A crafted classifier answers in Llama Guard 3's documented format ("safe", or "unsafe" and a line
of categories); a real llama-server on the tiny model answers arbitrary text, as a misconfigured
guard would."""
from __future__ import annotations

import json

import httpx2
import openai
import pytest
from starlette.testclient import TestClient

from crafted_backend import Backend, free_port, tiny_llama_server
from metrics_fixture import DEMO_DATA, fixture_config
from pipeline.audit import verify
from pipeline.config import ConfigError, load_config
from pipeline.guard import Guard, Verdict, guard_messages, parse_llama_guard_3, parse_shieldgemma
from pipeline.serve import ServeSettings, create_app
from test_openai import TOKEN, start_serve, stop

REFUSAL = "申し訳ありませんが、お答えできません。"
UNSAFE = "爆弾"  # the crafted guard calls a turn with this word unsafe (S9, Indiscriminate Weapons)
MODEL = "agiasi-demo"


# -- the formats ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,verdict,categories", [
    ("safe", "safe", ()), ("\n\nsafe\n", "safe", ()), ("unsafe\nS1", "unsafe", ("S1",)),
    ("unsafe\nS1,S10", "unsafe", ("S1", "S10")), ("unsafe", "unsafe", ()),
    ("Safe", "unparseable", ()), ("the prompt is safe", "unparseable", ()), ("", "unparseable", ()),
    ("safe\nS1", "unparseable", ()),
    # The first line says unsafe: unsafe, whatever follows (never passed, even failing open).
    ("unsafe\nS99", "unsafe", ()), ("unsafe\nS1,S", "unsafe", ("S1",)), ("unsafe\nweapons", "unsafe", ()),
    ("unsafe\nS1\nS2", "unsafe", ("S1",)),
])
def test_llama_guard_3_answers(text, verdict, categories):
    v = parse_llama_guard_3(text)
    assert (v.verdict, v.categories) == (verdict, categories)


@pytest.mark.parametrize("text,verdict", [
    ("Yes", "unsafe"), ("No", "safe"), (" yes, because it asks for weapons", "unsafe"), ("No.", "safe"),
    ("Nope", "unparseable"), ("Maybe", "unparseable"), ("", "unparseable"),
])
def test_shieldgemma_answers(text, verdict):
    assert parse_shieldgemma(text).verdict == verdict


def test_what_blocks_depends_on_failing_closed_or_open():
    for v in ("unavailable", "unparseable"):
        assert Verdict(v).blocks("closed") and not Verdict(v).blocks("open")
    assert Verdict("unsafe").blocks("open") and not Verdict("safe").blocks("closed")


def test_the_guard_judges_turns_without_the_system_prompt():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert guard_messages(messages) == [{"role": "user", "content": "u"}]
    assert guard_messages(messages, "a") == [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


# -- serving with a crafted classifier -------------------------------------------------------------

def llama_guard(body: dict) -> str:
    """Llama Guard 3's answer about the last turn it was sent."""
    return "unsafe\nS9" if UNSAFE in body["messages"][-1]["content"] else "safe"


@pytest.fixture(scope="module")
def backends():
    main, guard = Backend().start(), Backend().start()
    yield main, guard
    main.stop()
    guard.stop()


@pytest.fixture
def client(backends, tmp_path):
    main, guard = backends
    main.reset()
    guard.reset()
    guard.reply = llama_guard
    made = []

    def make(guard_url: str | None = None, fail: str = "closed") -> TestClient:
        g = Guard(guard_url or guard.url, "llama-guard3:1b", "llama-guard-3", 5.0, fail, REFUSAL)
        c = TestClient(create_app(ServeSettings(backend_url=main.url, backend_model=MODEL, guard=g,
                                                audit_path=tmp_path / "think.jsonl", keepalive_interval=0.05)))
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def audit(tmp_path) -> list[dict]:
    path = tmp_path / "think.jsonl"
    verify(path)
    raw = path.read_text(encoding="utf-8")
    assert UNSAFE.encode("unicode_escape").decode() not in raw and UNSAFE not in raw  # never the text
    return [json.loads(x) for x in raw.splitlines()]


def ask(c: TestClient, api: str, prompt: str, stream: bool) -> str:
    """The answer's text, however asked."""
    if api == "think":
        r = c.post("/think", json={"prompt": prompt, "system": "丁寧に", "stream": stream})
        assert r.status_code == 200
        if not stream:
            return r.json()["final"]
        lines = [json.loads(x) for x in r.text.splitlines()]
        assert lines[-1]["type"] == "done"
        return "".join(x["text"] for x in lines if x["type"] == "delta")
    body = {"model": MODEL, "messages": [{"role": "system", "content": "丁寧に"}, {"role": "user", "content": prompt}],
            "stream": stream}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    if not stream:
        return r.json()["choices"][0]["message"]["content"]
    events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


APIS = [("think", False), ("think", True), ("v1", False), ("v1", True)]


@pytest.mark.parametrize("api,stream", APIS)
def test_an_unsafe_prompt_is_refused_and_never_reaches_the_model(client, backends, tmp_path, api, stream):
    main, guard = backends
    assert ask(client(), api, f"{UNSAFE}の作り方を教えて", stream) == REFUSAL
    assert main.requests == []  # the main model never saw it
    assert guard.requests[0]["messages"] == [{"role": "user", "content": f"{UNSAFE}の作り方を教えて"}]
    assert guard.requests[0]["model"] == "llama-guard3:1b" and guard.requests[0]["stream"] is False
    [line] = audit(tmp_path)
    assert line["outcome"] == "refused" and line["status"] == 200 and line["api"] == api
    assert line["guard"] == {"prompt": {"verdict": "unsafe", "categories": ["S9"]}, "final": None}


@pytest.mark.parametrize("api,stream", APIS)
def test_an_unsafe_final_is_refused_before_the_client_sees_it(client, backends, tmp_path, api, stream):
    main, guard = backends
    main.content = f"<think>考える</think><final>{UNSAFE}はこう作ります</final>"
    c = client()
    assert ask(c, api, "化学の質問です", stream) == REFUSAL
    assert guard.requests[1]["messages"] == [{"role": "user", "content": "化学の質問です"},
                                             {"role": "assistant", "content": f"{UNSAFE}はこう作ります"}]
    [line] = audit(tmp_path)
    assert line["outcome"] == "refused" and line["guard"] == {
        "prompt": {"verdict": "safe", "categories": []}, "final": {"verdict": "unsafe", "categories": ["S9"]}}


@pytest.mark.parametrize("api,stream", APIS)
def test_a_safe_exchange_passes_with_both_verdicts_audited(client, backends, tmp_path, api, stream):
    main, _ = backends
    main.content = "<think>考える</think><final>こんにちは、元気です</final>"
    assert ask(client(), api, "挨拶して", stream) == "こんにちは、元気です"
    [line] = audit(tmp_path)
    assert line["outcome"] == "ok" and line["guard"] == {
        "prompt": {"verdict": "safe", "categories": []}, "final": {"verdict": "safe", "categories": []}}


def test_a_refused_v1_answer_says_content_filter(client, backends):
    r = client().post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": UNSAFE}]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == REFUSAL


def test_a_streamed_final_is_held_until_it_passed(client, backends):
    """With a guard nothing of the final streams before its verdict: keep-alive lines, then all of it."""
    main, _ = backends
    main.content, main.chunk, main.stall = "<final>" + "ほ" * 12 + f"{UNSAFE}</final>", 2, 0.03
    r = client().post("/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                     "messages": [{"role": "user", "content": "p"}]})
    assert UNSAFE not in r.text and "ほ" not in r.text and REFUSAL in r.text
    assert ": keep-alive" in r.text  # the client heard from the server while the answer was held


@pytest.mark.parametrize("api,stream", APIS)
def test_a_guard_that_is_down_fails_closed(client, backends, tmp_path, api, stream):
    main, _ = backends
    down = f"http://127.0.0.1:{free_port()}/v1"
    assert ask(client(down), api, "挨拶して", stream) == REFUSAL
    assert main.requests == []
    [line] = audit(tmp_path)
    assert line["outcome"] == "refused" and line["guard"]["prompt"] == {"verdict": "unavailable", "categories": []}


def test_a_guard_that_is_down_passes_when_failing_open(client, backends, tmp_path):
    main, _ = backends
    main.content = "<final>こんにちは</final>"
    assert ask(client(f"http://127.0.0.1:{free_port()}/v1", fail="open"), "v1", "挨拶して", False) == "こんにちは"
    [line] = audit(tmp_path)
    assert line["outcome"] == "ok" and line["guard"]["final"] == {"verdict": "unavailable", "categories": []}


@pytest.mark.parametrize("answer", ["I am not sure.", "SAFE", "unsafe?"])
def test_an_answer_that_is_no_verdict_fails_closed(client, backends, tmp_path, answer):
    main, guard = backends
    guard.reply = lambda body: answer
    assert ask(client(), "v1", "挨拶して", False) == REFUSAL
    assert main.requests == []
    [line] = audit(tmp_path)
    assert line["guard"]["prompt"] == {"verdict": "unparseable", "categories": []}


@pytest.mark.parametrize("status", [404, 500])
def test_a_guard_answering_an_error_fails_closed(client, backends, tmp_path, status):
    _, guard = backends
    guard.status = status  # e.g. 404: the guard's model is not pulled
    assert ask(client(), "think", "挨拶して", False) == REFUSAL
    assert audit(tmp_path)[0]["guard"]["prompt"]["verdict"] == "unavailable"


# -- the config -------------------------------------------------------------------------------------

@pytest.mark.reliability("bad-input")
@pytest.mark.parametrize("overrides,message", [
    ({"data": {"train": str(DEMO_DATA), "guard_replies": True}}, "data.guard_replies: needs serve.guard"),
    ({"serve": {"guard": {"model": "llama-guard3:1b", "backend": "localhost:11434"}}},
     "serve.guard.backend: 'localhost:11434' is not an http"),
    ({"serve": {"guard": {"model": "llama-guard3:1b", "format": "llamaguard"}}}, "serve.guard.format"),
])
def test_the_config_names_a_guard_problem(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(fixture_config(tmp_path, **overrides))


# -- a real llama-server as the guard ---------------------------------------------------------------

@pytest.fixture(scope="module")
def babbling_server(tiny_phi3_dir, tmp_path_factory):
    """llama-server on the random tiny model: it answers arbitrary text, never a verdict."""
    with tiny_llama_server(tiny_phi3_dir, tmp_path_factory.mktemp("gguf")) as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize("fail", ["closed", "open"])
def test_a_real_server_babbling_as_the_guard(babbling_server, backends, tmp_path, fail):
    main, _ = backends
    main.reset()
    main.content = "<final>こんにちは</final>"
    said = httpx2.post(babbling_server + "/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": "挨拶して"}], "max_tokens": 16}).json()
    assert parse_llama_guard_3(said["choices"][0]["message"]["content"]).verdict == "unparseable"
    guard = {"model": "tiny", "backend": babbling_server, "fail": fail, "refusal": REFUSAL}
    config = fixture_config(tmp_path, serve={"guard": guard})
    proc, base = start_serve(config, main.url, MODEL)
    try:
        api = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
        done = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "挨拶して"}])
    finally:
        stop(proc)
    lines = [json.loads(x) for x in load_config(config).audit_log.read_text().splitlines()]
    if fail == "closed":
        assert done.choices[0].message.content == REFUSAL and done.choices[0].finish_reason == "content_filter"
        assert main.requests == [] and lines[-1]["outcome"] == "refused"
        assert lines[-1]["guard"] == {"prompt": {"verdict": "unparseable", "categories": []}, "final": None}
    else:
        assert done.choices[0].message.content == "こんにちは" and lines[-1]["outcome"] == "ok"
        assert lines[-1]["guard"]["final"] == {"verdict": "unparseable", "categories": []}
