"""`python -m pipeline serve`: /think and an OpenAI-compatible /v1 answer with only the model's <final>.

The backend is any OpenAI-compatible chat API (`backend_url` is its /v1 base): by default the
run's registered Ollama model at OLLAMA_HOST (Ollama's /v1), or llama.cpp's llama-server.
Both APIs go through one path (`Service`): one slot of serve.max_concurrent, one request to the
backend, pipeline.thinking's filter, and one line in the audit log (pipeline.audit, hashes
only) however the request ends. The dashboard (pipeline.dashboard) is served by the same app.

    POST /think {"prompt": str, "system": str (optional), "stream": bool (optional)}
      200 {"final", "request_id"}; 502 {"error", "request_id"} (no well-formed final, or a
      backend error); 503 backend down; 504 backend silent past backend_timeout;
      429 serve.max_concurrent requests in flight (Retry-After); 413 body over max_body_bytes;
      400/422 a bad body (the error names the field only).
      stream: application/x-ndjson lines {"type": "delta", "text"}, then one
      {"type": "done", "request_id"} or {"type": "error", "error", "request_id"}.

    GET /v1/models, POST /v1/chat/completions: OpenAI's shapes (pipeline.openai_api), errors
      in OpenAI's error body with the same statuses; a stream is SSE chat.completion.chunk
      events ending in `data: [DONE]`, or in one `data: {"error": ...}` event when the reply has
      no well-formed final; `: keep-alive` comment lines every serve.keepalive_interval seconds
      while nothing may be sent.

Limits: binds 127.0.0.1 unless AGIASI_SERVE_TOKEN is set; with a token every request needs
`Authorization: Bearer <token>` or the cookie `agiasi_token`, which `GET /?token=<token>` sets.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .audit import AuditLog, entry, now
from .config import Config, backend_url_problem
from .dashboard import dashboard_router
from .errors import BadInputError
from .goproxy import proxy_for
from .guard import Guard, guard_from_config, guard_messages
from .ollama import ollama_backend
from .openai_api import (
    ApiError, ChatRequest, StopMatcher, chunk, completion, error_body, error_type, models_list, parse_chat_request,
    usage_of,
)
from .thinking import REASONING_FIELDS, FilterResult, ThinkingFilter

TOKEN_ENV = "AGIASI_SERVE_TOKEN"
TOKEN_COOKIE = "agiasi_token"
MIN_TOKEN_LENGTH = 16
CONNECT_TIMEOUT = 5.0
RETRY_AFTER_SECONDS = 1
V1 = "/v1"


@dataclass(frozen=True)
class ServeSettings:
    """What create_app needs. backend_url: the backend's /v1 base; backend_model: the model asked
    of it, and the id /v1/models lists; token: None for no check; allowed_hosts: Host header names
    accepted (None: any; serve() sets the loopback names when it binds loopback without a token,
    against DNS rebinding); max_concurrent: requests in flight to the backend, past it 429;
    keepalive_interval: seconds of silence after which a /v1 stream sends a comment line;
    guard: the classifier asked about each prompt and final, or None."""
    backend_url: str
    backend_model: str
    audit_path: Path
    token: str | None = None
    max_body_bytes: int = 65536
    backend_timeout: float = 300.0
    allowed_hosts: tuple[str, ...] | None = None
    max_concurrent: int = 4
    keepalive_interval: float = 15.0
    guard: Guard | None = None  # serve.guard: judges each prompt and each final (pipeline.guard)


class ThinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1)
    system: str | None = None
    stream: bool = False


class BackendFailure(Exception):
    """The backend could not give a reply: outcome (audit), HTTP status and a message that
    names the backend, never its reply."""

    def __init__(self, outcome: str, status: int, message: str):
        super().__init__(message)
        self.outcome, self.status = outcome, status


def error_response(path: str, status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    """An error in the shape of the API asked: OpenAI's body under /v1, {"error": message, ...} elsewhere."""
    if path == V1 or path.startswith(V1 + "/"):
        body = error_body(message, type=error_type(status), code=extra.get("code"), param=extra.get("param"))
    else:
        body = {"error": message, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


# -- limits: pure ASGI middleware, so they hold for every route ---------------------------------


class TokenGate:
    """With a token: every request must carry it (Bearer header or cookie, compared in constant
    time); `GET /?token=` with the right token sets the cookie and redirects to /. Without one:
    only the Host header check (allowed_hosts)."""

    def __init__(self, app, token: str | None, allowed_hosts: tuple[str, ...] | None):
        self.app, self.token, self.allowed_hosts = app, token, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed_hosts is not None:
            host = urlsplit("//" + headers.get("host", "")).hostname or ""
            if host not in self.allowed_hosts:
                return await error_response(path, 421, "this server answers only to its loopback address")(
                    scope, receive, send)
        if self.token is None:
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if path == "/" and scope["method"] == "GET" and "token" in query:
            if not self._matches(query["token"][0]):
                return await error_response(path, 401, "wrong token")(scope, receive, send)
            response = JSONResponse({"ok": True}, status_code=303, headers={"Location": "/"})
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict", path="/")
            return await response(scope, receive, send)
        if self._matches(_bearer(headers.get("authorization", ""))) or self._matches(
                _cookie(headers.get("cookie", ""), TOKEN_COOKIE)):
            return await self.app(scope, receive, send)
        response = error_response(path, 401, f"this server needs its token ({TOKEN_ENV}): send "
                                             "'Authorization: Bearer <token>', or open /?token=<token> once",
                                  headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key")
        return await response(scope, receive, send)

    def _matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())


def _bearer(value: str) -> str | None:
    scheme, _, credential = value.partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else None


def _cookie(value: str, name: str) -> str | None:
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        if key == name:
            return val
    return None


class BodyLimit:
    """Refuses (413) a request body over max_bytes, by Content-Length or as it arrives;
    the body read is handed on to the app, then the client's later messages (disconnect)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(scope["path"], 413, f"the request body is larger than {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_big(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


# -- one path to the backend, for both APIs --------------------------------------------------------

TICK = None  # Service.pieces' item when nothing could be sent for keepalive_interval seconds


class Exchange:
    """One request on its way through the backend, from its slot to its audit line.

    Its outcome is "cancelled" (the client went away) until the request ends otherwise (end());
    its filter sees the whole reply, so the audit line holds every thinking section however the
    request ended. close() closes the backend stream, frees the slot and writes the line, once.
    """

    def __init__(self, service: Service, api: str, stream: bool, prompt: str, system: str | None):
        self.service, self.api, self.stream, self.prompt, self.system = service, api, stream, prompt, system
        self.request_id, self.started = uuid.uuid4().hex, now()
        self.outcome, self.status, self.final = "cancelled", 200, None
        self.filter = ThinkingFilter()
        self.usage: dict | None = None
        # The guard's verdicts (the audit line's `guard`): None without a guard.
        self.verdicts: dict | None = None if service.guard is None else {"prompt": None, "final": None}
        self.failure: BackendFailure | None = None  # why a stream ended without a reply
        self.admitted = False
        self.client: httpx2.AsyncClient | None = None
        self.response: httpx2.Response | None = None
        self._closed = False

    def end(self, outcome: str, status: int, final: str | None = None) -> None:
        self.outcome, self.status, self.final = outcome, status, final

    def result(self) -> FilterResult:
        return self.filter.finish()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self.response is not None:
                await self.response.aclose()
            if self.client is not None:
                await self.client.aclose()
            await self.service.release(self)


class Service:
    """The backend behind both APIs: slots, requests, the filter's input, the audit log."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.audit = AuditLog(settings.audit_path)
        self.url = settings.backend_url.rstrip("/") + "/chat/completions"
        timeout = httpx2.Timeout(settings.backend_timeout, connect=CONNECT_TIMEOUT)
        # The proxy Go's clients would use (pipeline.goproxy): never for loopback, NO_PROXY honoured;
        # httpx's own reading of the environment would send 127.0.0.1 through http_proxy.
        self.client_options = {"timeout": timeout, "trust_env": False, "proxy": proxy_for(self.url)}
        self.in_flight = 0
        self.guard = settings.guard

    def admit(self, api: str, stream: bool, prompt: str, system: str | None) -> Exchange:
        """An exchange that holds one of serve.max_concurrent slots, or (admitted False, outcome busy)
        none when all are taken; either way its close() writes its audit line."""
        ex = Exchange(self, api, stream, prompt, system)
        if self.in_flight < self.settings.max_concurrent:
            self.in_flight += 1
            ex.admitted = True
        else:
            ex.end("busy", 429)
        return ex

    async def release(self, ex: Exchange) -> None:
        if ex.admitted:
            self.in_flight -= 1
        obj = entry(time=ex.started, request_id=ex.request_id, api=ex.api, backend_model=self.settings.backend_model,
                    stream=ex.stream, outcome=ex.outcome, status=ex.status, prompt=ex.prompt, system=ex.system,
                    final=ex.final, sections=ex.result().sections, guard=ex.verdicts)
        await anyio.to_thread.run_sync(self.audit.record, obj)
        print(f"[serve] {ex.request_id} {ex.api} {ex.outcome} {ex.status}", flush=True)

    async def passes(self, ex: Exchange, which: str, messages: list[dict], answer: str | None = None) -> bool:
        """Whether the guard lets the prompt (which "prompt") or the answer ("final") through; its
        verdict goes into ex's audit line. True without a guard."""
        if self.guard is None:
            return True
        verdict = await self.guard.classify(guard_messages(messages, answer))
        ex.verdicts[which] = verdict.record()
        if verdict.why:
            print(f"[serve] {ex.request_id} guard {verdict.verdict}: {verdict.why}", flush=True)
        return not verdict.blocks(self.guard.fail)

    def payload(self, messages: list[dict], stream: bool, options: dict | None = None, usage: bool = False) -> dict:
        body = {"model": self.settings.backend_model, "messages": messages, "stream": stream, **(options or {})}
        if stream and usage:
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(self, ex: Exchange, payload: dict) -> FilterResult:
        """The whole reply, through ex's filter. Raises BackendFailure."""
        try:
            async with httpx2.AsyncClient(**self.client_options) as client:
                reply = await client.post(self.url, json=payload)
        except httpx2.TransportError as err:
            raise self._transport_failure(err) from None
        if reply.status_code != 200:
            raise self._status_failure(reply.status_code)
        try:
            obj = reply.json()
            content, fields = _message_parts(_first_choice(obj, "message"))
        except ValueError:
            raise BackendFailure("backend_error", 502,
                                 f"the backend at {self.settings.backend_url} sent no chat completion") from None
        ex.usage = usage_of(obj)
        for name, text in fields.items():
            ex.filter.feed_field(name, text)
        ex.filter.feed(content)
        return ex.result()

    async def open_stream(self, ex: Exchange, payload: dict) -> None:
        """Starts the backend's streamed reply (ex owns it from here). Raises BackendFailure."""
        ex.client = httpx2.AsyncClient(**self.client_options)
        try:
            ex.response = await ex.client.send(ex.client.build_request("POST", self.url, json=payload), stream=True)
        except httpx2.TransportError as err:
            raise self._transport_failure(err) from None
        if ex.response.status_code != 200:
            raise self._status_failure(ex.response.status_code)

    async def pieces(self, ex: Exchange, keepalive: float | None = None) -> AsyncIterator[str | None]:
        """The final's text as the streamed reply comes in: each piece that may be sent now, and
        TICK whenever none could be for `keepalive` seconds (None: never), whether the backend is
        silent or streams thinking. When the reply ends, ex.result() is the filter's verdict, or
        ex.failure says why the stream broke off."""
        last = time.monotonic()
        try:
            async for event in _ticking(self._deltas(ex), keepalive):
                text = None if event is TICK else _feed(ex.filter, *event)
                if text:
                    yield text
                elif event is TICK or (keepalive is not None and time.monotonic() - last >= keepalive):
                    yield TICK
                else:
                    continue
                last = time.monotonic()
        except BackendFailure as failure:
            ex.failure = failure

    async def _deltas(self, ex: Exchange) -> AsyncIterator[tuple[str, dict[str, str]]]:
        try:
            async for event in httpx2.EventSource(ex.response):
                if event.data.strip() == "[DONE]":
                    return
                obj = json.loads(event.data)
                ex.usage = usage_of(obj) or ex.usage
                if isinstance(obj, dict) and obj.get("choices") == [] and "error" not in obj:
                    continue  # the usage chunk
                yield _message_parts(_first_choice(obj, "delta"))
        except httpx2.TimeoutException as err:
            raise BackendFailure("backend_timeout", 504, str(self._transport_failure(err))) from None
        except httpx2.TransportError as err:
            raise BackendFailure("backend_error", 502,
                                 f"the backend's stream broke off ({type(err).__name__})") from None
        except ValueError:
            raise BackendFailure("backend_error", 502,
                                 f"the backend at {self.settings.backend_url} sent a bad stream event") from None

    def _transport_failure(self, err: Exception) -> BackendFailure:
        where = self.settings.backend_url
        if isinstance(err, httpx2.TimeoutException) and not isinstance(err, httpx2.ConnectTimeout):
            return BackendFailure("backend_timeout", 504,
                                  f"the backend at {where} sent nothing for {self.settings.backend_timeout:g} s "
                                  "(serve.backend_timeout)")
        return BackendFailure("backend_unavailable", 503,
                              f"the backend at {where} is not reachable ({type(err).__name__}); start it "
                              "(ollama serve, or llama-server) or point --backend at one")

    def _status_failure(self, status: int) -> BackendFailure:
        model = self.settings.backend_model
        hint = f": it has no model {model!r} (make ollama registers it, or give --backend-model)" if status == 404 else ""
        return BackendFailure("backend_error", 502,
                              f"the backend at {self.settings.backend_url} answered HTTP {status}{hint}")


async def _ticking(source: AsyncIterator, interval: float | None) -> AsyncIterator:
    """source's items as they come, and TICK whenever none came for `interval` seconds (None: never).
    Each wait is an asyncio task of its own, so that a tick never cancels a read half-way."""
    if interval is None:
        async for item in source:
            yield item
        return
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(source.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield TICK
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        with anyio.CancelScope(shield=True):
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            await source.aclose()


def _feed(thinking: ThinkingFilter, content: str, fields: dict[str, str]) -> str:
    """What of a delta may be sent now."""
    for name, text in fields.items():
        thinking.feed_field(name, text)
    return thinking.feed(content)


def _message_parts(message: dict) -> tuple[str, dict[str, str]]:
    """(content, {reasoning field: text}) of a choice's message or delta."""
    content = message.get("content") or ""
    fields = {f: message[f] for f in REASONING_FIELDS if isinstance(message.get(f), str)}
    if not isinstance(content, str):
        raise ValueError("content is not a string")
    return content, fields


def _first_choice(obj, key: str) -> dict:
    if not isinstance(obj, dict) or "error" in obj:
        raise ValueError("the backend sent an error or no object")
    choices = obj.get("choices") or [{}]
    part = choices[0].get(key) if isinstance(choices[0], dict) else None
    return part if isinstance(part, dict) else {}


class ExchangeStream(StreamingResponse):
    """A streamed answer whose exchange is closed however the response ends: finished, failed, or
    the client gone before or while it streamed (then its outcome stays "cancelled")."""

    def __init__(self, content, exchange: Exchange, media_type: str):
        super().__init__(content, media_type=media_type, headers={"x-request-id": exchange.request_id})
        self.exchange = exchange

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.exchange.close()


# -- the app ----------------------------------------------------------------------------------------


def create_app(settings: ServeSettings, cfg: Config | None = None) -> FastAPI:
    """The service: /think, /v1, /healthz and (with cfg) the dashboard, behind the limits.

    settings: see ServeSettings; cfg: the run (for the dashboard; None serves the APIs alone).
    """
    app = FastAPI(title="AGIASI /think", docs_url=None, redoc_url=None, openapi_url=None)
    service = Service(settings)
    model_id, started = settings.backend_model, int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(request.url.path, 400, "the body is not valid JSON")
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
        return error_response(request.url.path, 422, f"invalid request ({where})")

    def busy(ex: Exchange, path: str) -> JSONResponse:
        extra = {} if path.startswith(V1) else {"request_id": ex.request_id}
        return error_response(path, 429, f"{settings.max_concurrent} requests are in flight (serve.max_concurrent): "
                                          f"try again in {RETRY_AFTER_SECONDS} s",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS), "x-request-id": ex.request_id},
                              **extra)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "backend": settings.backend_url, "backend_model": settings.backend_model,
                "in_flight": service.in_flight, "max_concurrent": settings.max_concurrent,
                "guard": None if settings.guard is None else settings.guard.model}

    # -- /think --------------------------------------------------------------------------------

    @app.post("/think")
    async def think(body: ThinkRequest):
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": body.prompt}]
        ex = service.admit("think", body.stream, body.prompt, body.system)
        if not ex.admitted:
            await ex.close()
            return busy(ex, "/think")
        if not await prompt_passes(ex, messages):
            return think_refusal(ex)
        payload = service.payload(messages, body.stream)
        if body.stream:
            return await _streamed(ex, payload, think_lines(ex, messages), "application/x-ndjson", "/think")
        try:
            result = await service.complete(ex, payload)
        except BackendFailure as failure:
            ex.end(failure.outcome, failure.status)
            return error_response("/think", failure.status, str(failure), request_id=ex.request_id)
        else:
            if result.final is None:
                ex.end(result.outcome, 502)
                return error_response("/think", 502, f"no answer: {result.problem}", request_id=ex.request_id)
            if not await service.passes(ex, "final", messages, result.final):
                return think_refusal(ex)
            ex.end("ok", 200, result.final)
            return {"final": result.final, "request_id": ex.request_id}
        finally:
            await ex.close()

    async def prompt_passes(ex: Exchange, messages: list[dict]) -> bool:
        """The guard's check of the prompt, before the backend sees it; a refused exchange is
        ended and closed here."""
        try:
            passes = await service.passes(ex, "prompt", messages)
        except BaseException:
            await ex.close()
            raise
        if not passes:
            ex.end("refused", 200, settings.guard.refusal)
            await ex.close()
        return passes

    def think_refusal(ex: Exchange):
        """serve.guard.refusal as /think's answer, streamed when asked (ex is closed by the caller)."""
        ex.end("refused", 200, settings.guard.refusal)
        if not ex.stream:
            return {"final": settings.guard.refusal, "request_id": ex.request_id, "refused": True}
        return StreamingResponse(_lines_of(think_refused_lines(ex)), media_type="application/x-ndjson",
                                 headers={"x-request-id": ex.request_id})

    def think_refused_lines(ex: Exchange) -> list[dict]:
        return [{"type": "delta", "text": settings.guard.refusal},
                {"type": "done", "request_id": ex.request_id, "refused": True}]

    async def think_lines(ex: Exchange, messages: list[dict]):
        async for piece in service.pieces(ex):
            if service.guard is None:  # with a guard the final is held until it has passed
                yield _line({"type": "delta", "text": piece})
        result = ex.result()
        if ex.failure is None and result.final is not None:
            if not await service.passes(ex, "final", messages, result.final):
                ex.end("refused", 200, settings.guard.refusal)
                for line in think_refused_lines(ex):
                    yield _line(line)
                return
            if service.guard is not None:
                yield _line({"type": "delta", "text": result.final})
            ex.end("ok", 200, result.final)
            yield _line({"type": "done", "request_id": ex.request_id})
            return
        ex.end(ex.failure.outcome if ex.failure else result.outcome, 200)
        message = str(ex.failure) if ex.failure else f"no answer: {result.problem}"
        yield _line({"type": "error", "error": message, "request_id": ex.request_id})

    async def _streamed(ex: Exchange, payload: dict, content, media_type: str, path: str):
        """Opens the backend's stream; its failure is answered with its status, before any byte."""
        try:
            await service.open_stream(ex, payload)
        except BackendFailure as failure:
            ex.end(failure.outcome, failure.status)
            await content.aclose()
            await ex.close()
            extra = {} if path.startswith(V1) else {"request_id": ex.request_id}
            return error_response(path, failure.status, str(failure), headers={"x-request-id": ex.request_id},
                                  **extra)
        return ExchangeStream(content, ex, media_type)

    # -- /v1 -----------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def v1_models():
        return models_list(model_id, started)

    @app.post("/v1/chat/completions")
    async def v1_chat(request: Request):
        path = request.url.path
        try:
            req = parse_chat_request(json.loads(await request.body()), model_id)
        except ValueError:
            return error_response(path, 400, "the body is not valid JSON")
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        ex = service.admit("v1", req.stream, req.conversation, req.system)
        if not ex.admitted:
            await ex.close()
            return busy(ex, path)
        completion_id, created = "chatcmpl-" + ex.request_id, int(time.time())
        if not await prompt_passes(ex, req.messages):
            return v1_refusal(ex, req, completion_id, created)
        payload = service.payload(req.messages, req.stream, req.options, req.include_usage)
        if req.stream:
            return await _streamed(ex, payload, v1_events(ex, req, completion_id, created), "text/event-stream", path)
        headers = {"x-request-id": ex.request_id}
        try:
            result = await service.complete(ex, payload)
        except BackendFailure as failure:
            ex.end(failure.outcome, failure.status)
            return error_response(path, failure.status, str(failure), headers=headers)
        else:
            if result.final is None:
                ex.end(result.outcome, 502)
                return error_response(path, 502, f"no answer: {result.problem}", headers=headers, code=result.outcome)
            stops = StopMatcher(req.stops)
            final = stops.feed(result.final) + stops.flush()
            if not await service.passes(ex, "final", req.messages, final):
                return v1_refusal(ex, req, completion_id, created)
            ex.end("ok", 200, final)
            return JSONResponse(completion(completion_id, created, model_id, final, ex.usage), headers=headers)
        finally:
            await ex.close()

    def v1_refusal(ex: Exchange, req: ChatRequest, completion_id: str, created: int):
        """serve.guard.refusal as the answer, finish_reason content_filter (ex is closed by the caller)."""
        ex.end("refused", 200, settings.guard.refusal)
        headers = {"x-request-id": ex.request_id}
        if not req.stream:
            return JSONResponse(completion(completion_id, created, model_id, settings.guard.refusal, None,
                                           "content_filter"), headers=headers)
        events = [chunk(completion_id, created, model_id, {"role": "assistant", "content": ""}),
                  chunk(completion_id, created, model_id, {"content": settings.guard.refusal}),
                  chunk(completion_id, created, model_id, {}, "content_filter")]
        if req.include_usage:
            events.append(chunk(completion_id, created, model_id, None, usage=None))
        return StreamingResponse(_sse_of(events), media_type="text/event-stream", headers=headers)

    async def v1_events(ex: Exchange, req: ChatRequest, completion_id: str, created: int):
        def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> bytes:
            return _sse(chunk(completion_id, created, model_id, delta, finish, usage))

        yield event({"role": "assistant", "content": ""})
        held = service.guard is not None  # the final is sent only once the guard has passed it
        stops, sent, last_write = StopMatcher(req.stops), [], time.monotonic()
        pieces = service.pieces(ex, settings.keepalive_interval)
        try:
            async for piece in pieces:
                if piece is TICK or (held and time.monotonic() - last_write > settings.keepalive_interval):
                    yield b": keep-alive\n\n"
                    last_write = time.monotonic()
                    if piece is TICK:
                        continue
                text = stops.feed(piece)
                if text:
                    sent.append(text)
                    if not held:
                        yield event({"content": text})
                if stops.stopped:
                    break  # the backend's stream is closed with the exchange: it stops generating
        finally:
            await pieces.aclose()
        if not stops.stopped:
            result = ex.result()
            if ex.failure is not None or result.final is None:
                ex.end(ex.failure.outcome if ex.failure else result.outcome, 200)
                message = str(ex.failure) if ex.failure else f"no answer: {result.problem}"
                yield _sse(error_body(message, type="server_error", code=ex.outcome))
                return
            tail = stops.flush()
            if tail:
                sent.append(tail)
                if not held:
                    yield event({"content": tail})
        final, finish = "".join(sent), "stop"
        if held:
            if not await service.passes(ex, "final", req.messages, final):
                final, finish = settings.guard.refusal, "content_filter"
            if final:
                yield event({"content": final})
        ex.end("ok" if finish == "stop" else "refused", 200, final)
        yield event({}, finish)
        if req.include_usage:
            yield event(None, usage=ex.usage)
        yield b"data: [DONE]\n\n"

    if cfg is not None:
        app.include_router(dashboard_router(cfg, settings.audit_path))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(TokenGate, token=settings.token, allowed_hosts=settings.allowed_hosts)
    return app


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


async def _lines_of(objs: list[dict]) -> AsyncIterator[bytes]:
    for obj in objs:
        yield _line(obj)


async def _sse_of(objs: list[dict]) -> AsyncIterator[bytes]:
    for obj in objs:
        yield _sse(obj)
    yield b"data: [DONE]\n\n"


# -- the command ------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_settings(cfg: Config, host: str | None = None, backend: str | None = None,
                   backend_model: str | None = None, token: str | None = None) -> tuple[str, ServeSettings]:
    """The address to bind and the settings, from flags over cfg.serve over the defaults
    (Ollama's /v1 at OLLAMA_HOST, model ollama.model). Raises BadInputError for a backend URL
    that is none, a non-loopback address without a token, or a token that is too short."""
    host = host or cfg.serve.host
    backend = backend or cfg.serve.backend or ollama_backend()
    problem = backend_url_problem(backend)
    if problem:
        raise BadInputError(f"--backend: {backend!r} {problem}")
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise BadInputError(f"{TOKEN_ENV} is shorter than {MIN_TOKEN_LENGTH} characters: use a long random "
                            "one, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    if not is_loopback(host) and token is None:
        raise BadInputError(f"refusing to listen on {host} without a token: set {TOKEN_ENV} (every request "
                            "must then carry it), or bind 127.0.0.1")
    loopback_names = ("127.0.0.1", "localhost", "::1", host.strip("[]"))
    return host, ServeSettings(
        guard=guard_from_config(cfg, backend),
        backend_url=backend.rstrip("/"),
        backend_model=backend_model or cfg.serve.backend_model or cfg.ollama.model,
        audit_path=cfg.audit_log, token=token, max_body_bytes=cfg.serve.max_body_bytes,
        backend_timeout=cfg.serve.backend_timeout, max_concurrent=cfg.serve.max_concurrent,
        keepalive_interval=cfg.serve.keepalive_interval,
        allowed_hosts=loopback_names if token is None else None)


def serve(cfg: Config, host: str | None = None, port: int | None = None, backend: str | None = None,
          backend_model: str | None = None) -> None:
    """Run the service until interrupted (`make serve`). Errors: BadInputError (exit 2), see
    serve_settings; a port in use ends uvicorn with its own message (exit 1)."""
    host, settings = serve_settings(cfg, host, backend, backend_model, os.environ.get(TOKEN_ENV) or None)
    port = port or cfg.serve.port
    app = create_app(settings, cfg)
    shown = f"[{host}]" if ":" in host else host
    print(f"[serve] http://{shown}:{port}/ -> {settings.backend_url} model {settings.backend_model}; "
          f"audit log {settings.audit_path}", flush=True)
    print(f"[serve] OpenAI-compatible API: base URL http://{shown}:{port}/v1, model {settings.backend_model!r}",
          flush=True)
    if settings.guard is not None:
        g = settings.guard
        print(f"[serve] guard {g.model!r} ({g.format}) at {g.backend_url}, failing {g.fail}: it judges each "
              "prompt and each final", flush=True)
    if settings.token:
        print(f"[serve] token required; a browser opens http://{shown}:{port}/?token=<{TOKEN_ENV}> once", flush=True)
    # No access log: it would print /?token=... to the terminal; /think logs one line per request.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
