"""`python -m pipeline serve`: POST /think answers with only the model's <final> text.

The backend is any OpenAI-compatible chat API (`backend_url` is its /v1 base): by default the
run's registered Ollama model at OLLAMA_HOST (Ollama's /v1), or llama.cpp's llama-server.
Every reply goes through pipeline.thinking's filter; every /think request that reaches the
backend leaves one line in the audit log (pipeline.audit, hashes only). The dashboard
(pipeline.dashboard) is served by the same app.

    POST /think {"prompt": str, "system": str (optional), "stream": bool (optional)}
      200 {"final", "request_id"}; 502 {"error", "request_id"} (no well-formed final, or a
      backend error); 503 backend down; 504 backend silent past backend_timeout;
      413 body over max_body_bytes; 400/422 a bad body (the error names the field only).
      stream: application/x-ndjson lines {"type": "delta", "text"}, then one
      {"type": "done", "request_id"} or {"type": "error", "error", "request_id"}.

Limits: binds 127.0.0.1 unless AGIASI_SERVE_TOKEN is set; with a token every request needs
`Authorization: Bearer <token>` or the cookie `agiasi_token`, which `GET /?token=<token>` sets.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .audit import AuditLog, entry, now
from .config import Config, backend_url_problem
from .dashboard import dashboard_router
from .errors import BadInputError
from .goproxy import proxy_for
from .ollama import ollama_host
from .ollama_rules import connect_url
from .thinking import REASONING_FIELDS, PROBLEMS, ThinkingFilter, filter_reply

TOKEN_ENV = "AGIASI_SERVE_TOKEN"
TOKEN_COOKIE = "agiasi_token"
MIN_TOKEN_LENGTH = 16
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class ServeSettings:
    """What create_app needs. backend_url: the backend's /v1 base; token: None for no check;
    allowed_hosts: Host header names accepted (None: any; serve() sets the loopback names when
    it binds loopback without a token, against DNS rebinding)."""
    backend_url: str
    backend_model: str
    audit_path: Path
    token: str | None = None
    max_body_bytes: int = 65536
    backend_timeout: float = 300.0
    allowed_hosts: tuple[str, ...] | None = None


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


def _json_error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


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
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed_hosts is not None:
            host = urlsplit("//" + headers.get("host", "")).hostname or ""
            if host not in self.allowed_hosts:
                return await _json_error(421, "this server answers only to its loopback address")(scope, receive, send)
        if self.token is None:
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope["path"] == "/" and scope["method"] == "GET" and "token" in query:
            if not self._matches(query["token"][0]):
                return await _json_error(401, "wrong token")(scope, receive, send)
            response = JSONResponse({"ok": True}, status_code=303, headers={"Location": "/"})
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict", path="/")
            return await response(scope, receive, send)
        if self._matches(_bearer(headers.get("authorization", ""))) or self._matches(
                _cookie(headers.get("cookie", ""), TOKEN_COOKIE)):
            return await self.app(scope, receive, send)
        response = _json_error(401, f"this server needs its token ({TOKEN_ENV}): send "
                                    "'Authorization: Bearer <token>', or open /?token=<token> once")
        response.headers["WWW-Authenticate"] = "Bearer"
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
        too_big = _json_error(413, f"the request body is larger than {self.max_bytes} bytes")
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


# -- the backend ----------------------------------------------------------------------------------


def _payload(settings: ServeSettings, body: ThinkRequest) -> dict:
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
        {"role": "user", "content": body.prompt}]
    return {"model": settings.backend_model, "messages": messages, "stream": body.stream}


def _transport_failure(settings: ServeSettings, err: Exception) -> BackendFailure:
    where = settings.backend_url
    if isinstance(err, httpx2.TimeoutException) and not isinstance(err, httpx2.ConnectTimeout):
        return BackendFailure("backend_timeout", 504,
                              f"the backend at {where} sent nothing for {settings.backend_timeout:g} s "
                              "(serve.backend_timeout)")
    return BackendFailure("backend_unavailable", 503,
                          f"the backend at {where} is not reachable ({type(err).__name__}); start it "
                          "(ollama serve, or llama-server) or point --backend at one")


def _status_failure(settings: ServeSettings, status: int) -> BackendFailure:
    hint = (f": it has no model {settings.backend_model!r} (make ollama registers it, or give --backend-model)"
            if status == 404 else "")
    return BackendFailure("backend_error", 502, f"the backend at {settings.backend_url} answered HTTP {status}{hint}")


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


def create_app(settings: ServeSettings, cfg: Config | None = None) -> FastAPI:
    """The service: /think, /healthz and (with cfg) the dashboard, behind the limits.

    settings: see ServeSettings; cfg: the run (for the dashboard; None serves the API alone).
    """
    app = FastAPI(title="AGIASI /think", docs_url=None, redoc_url=None, openapi_url=None)
    audit = AuditLog(settings.audit_path)
    timeout = httpx2.Timeout(settings.backend_timeout, connect=CONNECT_TIMEOUT)
    url = settings.backend_url.rstrip("/") + "/chat/completions"
    # The proxy Go's clients would use (pipeline.goproxy): never for loopback, NO_PROXY honoured;
    # httpx's own reading of the environment would send 127.0.0.1 through http_proxy.
    client_options = {"timeout": timeout, "trust_env": False, "proxy": proxy_for(url)}

    def record(request_id, started, body, outcome, status, final, sections):
        audit.record(entry(time=started, request_id=request_id, backend_model=settings.backend_model,
                           stream=body.stream, outcome=outcome, status=status, prompt=body.prompt,
                           system=body.system, final=final, sections=sections))
        print(f"[serve] {request_id} {outcome} {status}", flush=True)

    def refuse(request_id, started, body, failure: BackendFailure) -> JSONResponse:
        """A backend failure, logged and answered with its status and message."""
        record(request_id, started, body, failure.outcome, failure.status, None, {})
        return _json_error(failure.status, str(failure), request_id=request_id)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _json_error(400, "the body is not valid JSON")
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
        return _json_error(422, f"invalid request ({where})")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "backend": settings.backend_url, "backend_model": settings.backend_model}

    @app.post("/think")
    async def think(body: ThinkRequest):
        request_id, started = uuid.uuid4().hex, now()
        if body.stream:
            return await _stream(body, request_id, started)
        try:
            async with httpx2.AsyncClient(**client_options) as client:
                reply = await client.post(url, json=_payload(settings, body))
            if reply.status_code != 200:
                raise _status_failure(settings, reply.status_code)
            try:
                content, fields = _message_parts(_first_choice(reply.json(), "message"))
            except ValueError:
                raise BackendFailure("backend_error", 502,
                                     f"the backend at {settings.backend_url} sent no chat completion") from None
        except httpx2.TransportError as err:
            return refuse(request_id, started, body, _transport_failure(settings, err))
        except BackendFailure as failure:
            return refuse(request_id, started, body, failure)
        result = filter_reply(content, fields)
        if result.final is None:
            record(request_id, started, body, result.outcome, 502, None, result.sections)
            return _json_error(502, f"no answer: {result.problem}", request_id=request_id)
        record(request_id, started, body, "ok", 200, result.final, result.sections)
        return {"final": result.final, "request_id": request_id}

    async def _stream(body: ThinkRequest, request_id: str, started: str):
        client = httpx2.AsyncClient(**client_options)
        try:
            response = await client.send(client.build_request("POST", url, json=_payload(settings, body)),
                                         stream=True)
        except httpx2.TransportError as err:
            await client.aclose()
            return refuse(request_id, started, body, _transport_failure(settings, err))
        if response.status_code != 200:
            await response.aclose()
            await client.aclose()
            return refuse(request_id, started, body, _status_failure(settings, response.status_code))
        return StreamingResponse(_lines(client, response, body, request_id, started),
                                 media_type="application/x-ndjson")

    async def _lines(client, response, body, request_id, started):
        filt, outcome, final = ThinkingFilter(), "cancelled", None  # cancelled: the client went away
        try:
            try:
                async for event in httpx2.EventSource(response):
                    if event.data.strip() == "[DONE]":
                        break
                    content, fields = _message_parts(_first_choice(json.loads(event.data), "delta"))
                    for name, text in fields.items():
                        filt.feed_field(name, text)
                    text = filt.feed(content)
                    if text:
                        yield _line({"type": "delta", "text": text})
            except httpx2.TimeoutException as err:
                outcome, message = "backend_timeout", str(_transport_failure(settings, err))
            except httpx2.TransportError as err:
                outcome, message = "backend_error", f"the backend's stream broke off ({type(err).__name__})"
            except ValueError:
                outcome, message = "backend_error", f"the backend at {settings.backend_url} sent a bad stream event"
            else:
                result = filt.finish()
                outcome = result.outcome
                if result.final is not None:
                    final = result.final
                    yield _line({"type": "done", "request_id": request_id})
                    return
                message = f"no answer: {PROBLEMS[outcome]}"
            yield _line({"type": "error", "error": message, "request_id": request_id})
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
                await client.aclose()
            record(request_id, started, body, outcome, 200, final, filt.finish().sections)

    if cfg is not None:
        app.include_router(dashboard_router(cfg, settings.audit_path))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(TokenGate, token=settings.token, allowed_hosts=settings.allowed_hosts)
    return app


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


# -- the command ------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def ollama_backend() -> str:
    """Ollama's OpenAI-compatible /v1 at OLLAMA_HOST; BadInputError for a value naming no server."""
    try:
        return connect_url(ollama_host()) + "/v1"
    except ValueError as e:
        raise BadInputError(f"OLLAMA_HOST={os.environ.get('OLLAMA_HOST', '')!r} names no server ({e}): give "
                            "host:port, e.g. 127.0.0.1:11434, or --backend URL") from None


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
        backend_url=backend.rstrip("/"),
        backend_model=backend_model or cfg.serve.backend_model or cfg.ollama.model,
        audit_path=cfg.audit_log, token=token, max_body_bytes=cfg.serve.max_body_bytes,
        backend_timeout=cfg.serve.backend_timeout,
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
    if settings.token:
        print(f"[serve] token required; a browser opens http://{shown}:{port}/?token=<{TOKEN_ENV}> once", flush=True)
    # No access log: it would print /?token=... to the terminal; /think logs one line per request.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
