"""The thinking audit log, `<run>/audit/think.jsonl`: one line per request, hashes only.

Each line is a JSON object with exactly these fields:

    time          when the request came in, UTC, ISO 8601 ("2026-12-02T17:30:00.123Z")
    request_id    32 lower-case hex digits, the id the response carries (on /v1 the
                  completion id is "chatcmpl-" + request_id, and every answer's
                  x-request-id header)
    api           "think" (POST /think) or "v1" (POST /v1/chat/completions)
    backend_model the model name sent to the backend
    stream        whether the client asked for a stream
    outcome       "ok", a thinking-filter problem (pipeline.thinking.PROBLEMS: no_final, ...),
                  backend_unavailable, backend_timeout, backend_error, cancelled, or busy
                  (serve.max_concurrent requests were in flight: answered 429, never sent on)
    status        the HTTP status answered (a stream answers 200 and ends with its outcome)
    prompt        {"sha256": hex, "length": UTF-8 bytes} of the prompt: on /think the prompt,
                  on /v1 the conversation's non-system turns as compact JSON
                  ([{"role","content"}, ...], pipeline.openai_api.ChatRequest.conversation)
    system        the same of the system prompt (on /v1 the system turns joined by a blank
                  line), or null
    final         the same of the answer sent, or null when none was
    thinking      {section name: {"sha256", "length"}}, every thinking section of the reply
    guard         null without serve.guard; else {"prompt": v, "final": v}, each v null when that
                  text was not judged, or {"verdict": safe | unsafe | unavailable | unparseable,
                  "categories": [code, ...]} (pipeline.guard); outcome "refused" means the guard
                  stopped the prompt or the answer, and `final` is then serve.guard.refusal

It never holds text: not the prompt, the answer, the thinking, nor the backend's messages.
A stream that ended in an error records `final` null even when part of an answer went out.
Lines written before the `api` field existed (all from /think) have every field but it and
`guard`, and those before `guard` existed every field but it: both still verify.

`AuditLog.record` appends a line with one write() on a file opened O_APPEND, under a
thread lock and an flock, then fsyncs: concurrent requests and processes never interleave
lines, and a line that was answered is on disk. `verify` checks a log (`python -m pipeline
audit verify`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

from .errors import BadInputError
from .guard import VERDICTS
from .thinking import PROBLEMS, REASONING_FIELDS

BACKEND_OUTCOMES = ("backend_unavailable", "backend_timeout", "backend_error", "cancelled", "busy")
ANSWERED = ("ok", "refused")  # the outcomes that send a final
OUTCOMES = (*ANSWERED, *PROBLEMS, *BACKEND_OUTCOMES)
APIS = ("think", "v1")
FIELDS = ("time", "request_id", "api", "backend_model", "stream", "outcome", "status",
          "prompt", "system", "final", "thinking", "guard")
_FIELDS_BEFORE_GUARD = set(FIELDS) - {"guard"}
_FIELDS_BEFORE_API = _FIELDS_BEFORE_GUARD - {"api"}
_CATEGORY = re.compile(r"[A-Za-z0-9_-]{1,32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_SECTION = re.compile(rf"(?:think(?:-[a-z0-9_-]{{1,64}})?|{'|'.join(REASONING_FIELDS)})(?:#[1-9][0-9]*)?")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# How many bad lines `verify` lists before it only counts.
_SHOWN_PROBLEMS = 20


class AuditError(BadInputError):
    """An audit log that is not well-formed; the message names each bad line."""


def digest(text: str) -> dict:
    """{"sha256": hex digest, "length": bytes} of text's UTF-8 encoding."""
    data = text.encode("utf-8")
    return {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}


def now() -> str:
    """The current time as the log writes it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def entry(*, time: str, request_id: str, api: str, backend_model: str, stream: bool, outcome: str, status: int,
          prompt: str, system: str | None, final: str | None, sections: dict[str, str],
          guard: dict | None = None) -> dict:
    """One log line's object: the texts given here leave only as digests."""
    return {
        "time": time, "request_id": request_id, "api": api, "backend_model": backend_model, "stream": stream,
        "outcome": outcome, "status": status, "prompt": digest(prompt),
        "system": None if system is None else digest(system),
        "final": None if final is None else digest(final),
        "thinking": {name: digest(text) for name, text in sections.items()},
        "guard": guard,
    }


class AuditLog:
    """Appends entries to one log file; safe to share between threads and processes.

    path: the log (its folder is created). record(obj) raises OSError when the disk refuses;
    a line is either wholly in the file or not at all (one write of the encoded line).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def record(self, obj: dict) -> None:
        problems = entry_problems(obj)
        if problems:
            raise ValueError(f"not an audit entry: {'; '.join(problems)}")
        line = (json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
                os.fsync(fd)
            finally:
                os.close(fd)  # closing releases the flock


def _digest_problems(value, key: str) -> list[str]:
    if not isinstance(value, dict) or set(value) != {"sha256", "length"}:
        return [f"{key}: expected {{\"sha256\", \"length\"}}"]
    problems = []
    sha, length = value["sha256"], value["length"]
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        problems.append(f"{key}.sha256: expected 64 lower-case hex digits")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        problems.append(f"{key}.length: expected a byte count")
    elif (length == 0) != (sha == _EMPTY_SHA256):
        problems.append(f"{key}: length {length} does not fit its sha256")
    return problems


def entry_problems(obj) -> list[str]:
    """What makes obj no audit entry ([] when it is one): fields, types, digests, no text."""
    if not isinstance(obj, dict):
        return ["not a JSON object"]
    expected = set(FIELDS) if "guard" in obj else _FIELDS_BEFORE_GUARD if "api" in obj else _FIELDS_BEFORE_API
    if set(obj) != expected:
        missing, extra = sorted(expected - set(obj)), sorted(set(obj) - expected)
        return [("missing " + ", ".join(missing) if missing else "") +
                ("; " if missing and extra else "") + ("unknown fields " + ", ".join(extra) if extra else "")]
    problems = []
    checks = [
        ("time", isinstance(obj["time"], str) and _TIME.fullmatch(obj["time"]), "an ISO 8601 UTC time"),
        ("request_id", isinstance(obj["request_id"], str) and _REQUEST_ID.fullmatch(obj["request_id"]),
         "32 lower-case hex digits"),
        ("api", obj.get("api", "think") in APIS, "one of " + ", ".join(APIS)),
        ("backend_model", isinstance(obj["backend_model"], str) and obj["backend_model"], "a model name"),
        ("stream", isinstance(obj["stream"], bool), "true or false"),
        ("outcome", obj["outcome"] in OUTCOMES, "one of " + ", ".join(OUTCOMES)),
        ("status", isinstance(obj["status"], int) and not isinstance(obj["status"], bool)
         and 100 <= obj["status"] <= 599, "an HTTP status"),
    ]
    problems += [f"{key}: expected {what}" for key, ok, what in checks if not ok]
    problems += _digest_problems(obj["prompt"], "prompt")
    for key in ("system", "final"):
        if obj[key] is not None:
            problems += _digest_problems(obj[key], key)
    if obj["outcome"] in ANSWERED and obj["final"] is None:
        problems.append(f"final: null, but the outcome is {obj['outcome']}")
    if obj["outcome"] not in ANSWERED and obj["final"] is not None:
        problems.append(f"final: present, but the outcome is {obj['outcome']}")
    if not isinstance(obj["thinking"], dict):
        problems.append("thinking: expected {section name: {\"sha256\", \"length\"}}")
    else:
        for name, value in obj["thinking"].items():
            if not _SECTION.fullmatch(name):
                problems.append(f"thinking: {name[:80]!r} is no section name")
            problems += _digest_problems(value, f"thinking[{name[:80]!r}]")
    problems += _guard_problems(obj.get("guard"), obj["outcome"])
    return problems


def _guard_problems(guard, outcome: str) -> list[str]:
    if guard is None:
        return ["guard: null, but the outcome is refused"] if outcome == "refused" else []
    if not isinstance(guard, dict) or set(guard) != {"prompt", "final"}:
        return ['guard: expected null or {"prompt", "final"}']
    problems = []
    for key, v in guard.items():
        if v is None:
            continue
        if not (isinstance(v, dict) and set(v) == {"verdict", "categories"} and v["verdict"] in VERDICTS
                and isinstance(v["categories"], list)
                and all(isinstance(c, str) and _CATEGORY.fullmatch(c) for c in v["categories"])):
            problems.append(f"guard.{key}: expected null or {{\"verdict\": one of {', '.join(VERDICTS)}, "
                            "\"categories\": [code, ...]}")
    return problems


def verify(path: Path) -> int:
    """Check every line of a log; returns how many entries it holds.

    Raises AuditError naming each bad line (line number and what is wrong: not JSON, not
    terminated, a missing or unknown field, a wrong type, a digest that is not 64 hex
    digits), or when the file cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AuditError(f"{path}: cannot read the audit log ({e.strerror or e})") from None
    lines = data.split(b"\n")
    bad: list[str] = []
    if lines[-1]:
        bad.append(f"{path}:{len(lines)}: the last line is not terminated (a write cut short?)")
    for number, raw in enumerate(lines[:-1], 1):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            bad.append(f"{path}:{number}: not a JSON line")
            continue
        bad += [f"{path}:{number}: {p}" for p in entry_problems(obj)]
    if bad:
        shown = "\n".join(f"  - {b}" for b in bad[:_SHOWN_PROBLEMS])
        more = f"\n  ... and {len(bad) - _SHOWN_PROBLEMS} more" if len(bad) > _SHOWN_PROBLEMS else ""
        raise AuditError(f"{path}: the audit log is not well-formed:\n{shown}{more}")
    return len(lines) - 1

