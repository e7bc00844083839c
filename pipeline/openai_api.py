"""OpenAI's chat API as `make serve` speaks it on /v1: requests read and checked, answers shaped.

Pure: no I/O. pipeline/serve.py routes `GET /v1/models` and `POST /v1/chat/completions`
through these functions and its one backend path (the thinking filter, the audit log, the
limits). The shapes follow OpenAI's API reference for Chat Completions (the `openai` Python
SDK's types: ChatCompletion, ChatCompletionChunk, Model, and its error body).

What a request may hold (anything else, or a value these do not allow, is refused with a 400
that names the field; a field sent as null counts as absent):

  model                  the id GET /v1/models lists (another id: 404 model_not_found)
  messages               system, developer (read as system), user and assistant turns; a turn's
                         content is a string or a list of text parts; `name` is accepted and not
                         used. Images, audio, tool calls and tool turns are refused.
  stream                 SSE chunks (chat.completion.chunk), ending in `data: [DONE]`
  stream_options         {"include_usage": bool}, with stream only
  temperature, top_p, seed, presence_penalty, frequency_penalty: passed to the backend
  max_tokens, max_completion_tokens: one of them, passed to the backend as max_tokens; it counts
                         the thinking the model writes before its final, as OpenAI's does for
                         reasoning models
  stop                   a string or up to 4; applied here to the final text, not to the reply
                         (a stop inside the thinking would cut the final off)
  n                      1 only; user: accepted and not used (never logged)
  tools, functions: an empty list only; tool_choice, function_call: "none" only;
  parallel_tool_calls: accepted; response_format: {"type": "text"} only; logprobs: false only;
  logit_bias: {} only; store: false only; metadata: accepted and not used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

OWNED_BY = "agiasi-soul-fusion"
MAX_STOPS = 4
# What the backend receives as is: OpenAI's name -> (its type check, what the check says).
_PASSED = {
    "temperature": (lambda v: _number(v) and 0 <= v <= 2, "a number from 0 to 2"),
    "top_p": (lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "seed": (lambda v: _integer(v), "an integer"),
    "presence_penalty": (lambda v: _number(v) and -2 <= v <= 2, "a number from -2 to 2"),
    "frequency_penalty": (lambda v: _number(v) and -2 <= v <= 2, "a number from -2 to 2"),
}
# Fields that change nothing at the value shown (OpenAI's default or an empty one): accepted.
_NEUTRAL = {
    "n": (1,), "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
    "response_format": ({"type": "text"},), "logprobs": (False,), "logit_bias": ({},), "store": (False,),
}
_IGNORED = ("user", "metadata", "parallel_tool_calls")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request answered with OpenAI's error body: status, message, type, param, code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        return error_body(str(self), type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


@dataclass(frozen=True)
class ChatRequest:
    """A checked /v1/chat/completions request.

    messages: {"role", "content"} with string content (developer turns as system);
    options: what the backend gets beside model, messages and stream;
    stops: applied to the final text (pipeline.serve).
    """
    messages: list[dict[str, str]]
    stream: bool = False
    include_usage: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    stops: tuple[str, ...] = ()

    @property
    def system(self) -> str | None:
        """The system turns' text, joined by a blank line (what the audit log hashes as `system`)."""
        texts = [m["content"] for m in self.messages if m["role"] == "system"]
        return "\n\n".join(texts) if texts else None

    @property
    def conversation(self) -> str:
        """The other turns as compact JSON, [{"role", "content"}, ...] (the audit log's `prompt`)."""
        turns = [m for m in self.messages if m["role"] != "system"]
        return json.dumps(turns, ensure_ascii=False, separators=(",", ":"))


def parse_chat_request(body: Any, model_id: str) -> ChatRequest:
    """A /v1/chat/completions body, checked. Raises ApiError (400, or 404 for another model)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}
    _check_model(body, model_id)
    messages = _messages(body.get("messages"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: expected true or false", param="stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    options = {}
    for key, (ok, what) in _PASSED.items():
        if key in body:
            if not ok(body[key]):
                raise ApiError(400, f"{key}: expected {what}", param=key)
            options[key] = body[key]
    limit = _max_tokens(body)
    if limit is not None:
        options["max_tokens"] = limit
    stops = _stops(body.get("stop"))
    known = {"model", "messages", "stream", "stream_options", "stop", "max_tokens", "max_completion_tokens",
             *_PASSED, *_IGNORED}
    for key, value in body.items():
        if key in known:
            continue
        if key in _NEUTRAL:
            if value not in _NEUTRAL[key]:
                raise ApiError(400, f"{key}: not supported here (only {json.dumps(_NEUTRAL[key][0])})", param=key)
            continue
        raise ApiError(400, f"{key}: not supported by this server", param=key)
    return ChatRequest(messages, stream, include_usage, options, stops)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: expected the model's id (GET /v1/models lists it)", param="model")
    if model != model_id:
        raise ApiError(404, f"model: this server serves {model_id!r} only (GET /v1/models)",
                       param="model", code="model_not_found")


def _messages(value) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages: expected a non-empty list of turns", param="messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(value)]


def _message(m, where: str) -> dict[str, str]:
    if not isinstance(m, dict):
        raise ApiError(400, f"{where}: expected an object with role and content", param=where)
    role = m.get("role")
    if role not in _ROLES:
        what = "tool turns are not supported here" if role in ("tool", "function") else \
            "expected system, developer, user or assistant"
        raise ApiError(400, f"{where}.role: {what}", param=f"{where}.role")
    for key, value in m.items():
        if key in ("role", "content", "name") or value is None:
            continue
        raise ApiError(400, f"{where}.{key}: not supported here", param=f"{where}.{key}")
    return {"role": _ROLES[role], "content": _content(m.get("content"), f"{where}.content")}


def _content(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ApiError(400, f"{where}: expected a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"{kind!r} parts are not supported here" if isinstance(kind, str) else "expected a text part"
            raise ApiError(400, f"{where}[{j}]: {what} (text only)", param=f"{where}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _stream_options(value, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options: only with stream: true", param="stream_options")
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise ApiError(400, "stream_options: expected {\"include_usage\": bool}", param="stream_options")
    usage = value.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(400, "stream_options.include_usage: expected true or false",
                       param="stream_options.include_usage")
    return usage


def _max_tokens(body: dict) -> int | None:
    given = [k for k in ("max_tokens", "max_completion_tokens") if k in body]
    if len(given) > 1:
        raise ApiError(400, "max_tokens and max_completion_tokens: give one", param="max_tokens")
    if not given:
        return None
    value = body[given[0]]
    if not _integer(value) or value < 1:
        raise ApiError(400, f"{given[0]}: expected a positive integer", param=given[0])
    return value


def _stops(value) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"stop: expected a non-empty string or a list of up to {MAX_STOPS}", param="stop")
    return tuple(stops)


# -- answers --------------------------------------------------------------------------------------


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": OWNED_BY}]}


def completion(completion_id: str, created: int, model: str, content: str, usage: dict | None,
               finish_reason: str = "stop") -> dict:
    """A non-streamed answer: chat.completion (finish_reason "content_filter" when the guard refused)."""
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


def chunk(completion_id: str, created: int, model: str, delta: dict | None,
          finish_reason: str | None = None, usage: dict | None = None) -> dict:
    """One streamed chat.completion.chunk: a delta, or (delta None) the usage chunk with no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "usage": usage}


def usage_of(obj) -> dict | None:
    """The backend's token counts, as OpenAI's usage object, or None when it sent none. The counts
    are the backend's: completion_tokens includes the thinking it generated."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    counts = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    if not all(_integer(v) and v >= 0 for v in counts.values()):
        return None
    return counts


class StopMatcher:
    """Applies stop strings to a text that arrives in pieces: feed(piece) -> the text that may go
    out now (a possible start of a stop is held back); `stopped` once a stop was met, after which
    nothing more goes out; flush() -> what was held back, at the end."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = ("" if self.stopped else self.held), ""
        return held
