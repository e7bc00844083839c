"""A contract server for our REST client: the endpoints it uses, behaving as Ollama's source
(v0.33.0-rc2, fb30760) says, each behaviour citing the file it follows. It rejects what Ollama
rejects; it does not run a model (the answer is set by the test).

Its rules (names, options) are its own copies, taken from Ollama's Go source, not the
project's pipeline/ollama_rules.py: a stand-in that shared the client's rules would only test
the project against itself.
"""
from __future__ import annotations

import hashlib
import http.server
import json

from gotemplate import render

# -- api/types.go: Options (with Runner embedded), each json key and its Go field's type ------------
OPTION_TYPES = {
    "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "*int", "use_mmap": "*bool",
    "num_thread": "int", "draft_num_predict": "int",
    "num_keep": "int", "seed": "int", "num_predict": "int", "top_k": "int", "top_p": "float32",
    "min_p": "float32", "typical_p": "float32", "repeat_last_n": "int", "temperature": "float32",
    "repeat_penalty": "float32", "presence_penalty": "float32", "frequency_penalty": "float32",
    "stop": "[]string",
}


def from_map(options: dict) -> str | None:
    """api/types.go Options.FromMap on JSON-decoded values (numbers are float64): the error a chat
    gets for a stored or requested option of the wrong type; unknown keys and nulls are skipped."""
    for key, value in options.items():
        kind = OPTION_TYPES.get(key)
        if kind is None or value is None:
            continue  # slog.Warn("invalid option provided"); a nil value is left alone
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind in ("int", "*int") and not number:
            return f'option "{key}" must be of type integer'
        if kind == "*bool" and not isinstance(value, bool):
            return f'option "{key}" must be of type boolean'
        if kind == "float32" and not number:
            return f'option "{key}" must be of type float32'
        if kind == "[]string":
            if not isinstance(value, list):
                return f'option "{key}" must be of type array'
            if not all(isinstance(v, str) for v in value):
                return f'option "{key}" must be of an array of strings'
    return None


# -- types/model/name.go: ParseName, IsValid, DisplayShortest -----------------------------------------
MISSING_PART = "!MISSING!"
DEFAULT_NAME = {"host": "registry.ollama.ai", "namespace": "library", "tag": "latest"}


def cut_promised(s: str, sep: str) -> tuple[str, str, bool]:
    """cutPromised: cut at the last sep; an empty side becomes MissingPart (never valid)."""
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i] or MISSING_PART, s[i + len(sep):] or MISSING_PART, True


def parse_name(s: str) -> dict[str, str]:
    """ParseName: ParseNameBare, then Merge with DefaultName (empty host, namespace, tag filled)."""
    n = {"host": "", "namespace": "", "model": "", "tag": ""}
    if s.rfind(":") > s.rfind("/"):  # "/" is an illegal tag character
        s, n["tag"], _ = cut_promised(s, ":")
    s, n["model"], promised = cut_promised(s, "/")
    if not promised:
        n["model"] = s
    else:
        s, n["namespace"], promised = cut_promised(s, "/")
        if not promised:
            n["namespace"] = s
        else:
            scheme, sep, host = s.partition("://")
            n["host"] = host if sep else scheme
    return {k: v or DEFAULT_NAME.get(k, "") for k, v in n.items()}


def is_valid_part(kind: str, s: str) -> bool:
    """isValidPart with isValidLen: a host 1-350 bytes, the rest 1-80; the first byte alphanumeric
    or "_", then also "_" "-", "." except in a namespace, ":" only in a host. Go's `for i := range s`
    visits the first byte of each rune, and a multi-byte rune's first byte is never allowed."""
    if not 1 <= len(s.encode()) <= (350 if kind == "host" else 80):
        return False
    for i, ch in enumerate(s):
        plain = ch.isascii() and (ch.isalnum() or ch == "_")
        if i == 0:
            if not plain:
                return False
        elif not (plain or ch in "_-" or (ch == "." and kind != "namespace") or (ch == ":" and kind == "host")):
            return False
    return True


def name_is_valid(name: str) -> bool:
    """ParseName(name).IsValid(): IsFullyQualified, every part present and valid."""
    n = parse_name(name)
    return all(is_valid_part(kind, n[kind]) for kind in ("host", "namespace", "model", "tag"))


def display_shortest(name: str) -> str:
    """Name.DisplayShortest: host/namespace/ unless the default host, namespace/ unless the default
    namespace (both compared with EqualFold), then always model:tag."""
    n = parse_name(name)
    if n["host"].lower() != DEFAULT_NAME["host"]:
        return f"{n['host']}/{n['namespace']}/{n['model']}:{n['tag']}"
    if n["namespace"].lower() != DEFAULT_NAME["namespace"]:
        return f"{n['namespace']}/{n['model']}:{n['tag']}"
    return f"{n['model']}:{n['tag']}"


def valid_path(name: str) -> bool:
    """Go's io/fs.ValidPath, which CreateHandler applies to every `files` name (server/create.go):
    unrooted, slash-separated, no empty, "." or ".." element ("." alone is the root)."""
    return name == "." or (bool(name) and all(e not in ("", ".", "..") for e in name.split("/")))


def template_error(template: str) -> str | None:
    """template/template.go Parse (text/template): unbalanced {{ }} or range/if without end fail."""
    if template.count("{{") != template.count("}}"):
        return "template: unclosed action"
    try:
        render(template, {"Messages": [], "System": "", "Prompt": "", "Response": ""})
    except (IndexError, KeyError, ValueError, TypeError, AttributeError) as e:
        return f"template: {e}"
    return None


class FakeOllama(http.server.BaseHTTPRequestHandler):
    """Class attributes hold the server's state; `reset()` restores a fresh one."""

    blobs: dict[str, bytes] = {}
    models: dict[str, dict] = {}  # DisplayShortest name (lower case) -> create request + digest
    calls: list[str] = []
    done_reason = "stop"
    answer = "こんにちは。私はアシスタントです。"
    version = "0.33.0"
    repeat_abort = False  # answer as Ollama does after its token-repeat abort
    last_prompt = ""  # the prompt the stored TEMPLATE rendered for the last chat

    @classmethod
    def reset(cls) -> None:
        cls.blobs, cls.models, cls.calls = {}, {}, []
        cls.done_reason, cls.answer, cls.version = "stop", "こんにちは。私はアシスタントです。", "0.33.0"
        cls.repeat_abort, cls.last_prompt = False, ""

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

    def _model(self, name: str) -> dict | None:
        # server/images.go getExistingName: names match case-insensitively
        return self.models.get(display_shortest(name).lower())

    def do_GET(self):  # noqa: N802
        self.calls.append(f"GET {self.path}")
        if self.path == "/api/version":  # server/routes.go: {"version": version.Version}
            return self._reply(200, {"version": self.version})
        if self.path == "/api/tags":  # server/model_list_cache.go: DisplayShortest name, manifest digest
            return self._reply(200, {"models": [
                {"name": display_shortest(m["model"]), "model": display_shortest(m["model"]), "digest": m["digest"]}
                for m in self.models.values()]})
        self._reply(404)

    def do_HEAD(self):  # noqa: N802
        self.calls.append(f"HEAD {self.path}")
        digest = self.path.rsplit("/", 1)[-1]
        self._reply(200 if digest in self.blobs else 404)  # server/routes.go HeadBlobHandler

    def do_DELETE(self):  # noqa: N802
        self.calls.append(f"DELETE {self.path}")
        req = json.loads(self._body())
        key = display_shortest(req["model"]).lower()
        if key not in self.models:  # server/routes.go DeleteHandler
            return self._reply(404, {"error": f"model '{req['model']}' not found"})
        del self.models[key]
        self._reply(200)

    def do_POST(self):  # noqa: N802
        self.calls.append(f"POST {self.path}")
        body = self._body()
        if self.path.startswith("/api/blobs/"):  # server/routes.go CreateBlobHandler
            digest = self.path.rsplit("/", 1)[-1]
            if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                return self._reply(400, {"error": "digest mismatch"})
            self.blobs[digest] = body
            return self._reply(201)
        req = json.loads(body)
        if self.path == "/api/create":
            return self._create(req)
        if self.path == "/api/chat":
            return self._chat(req)
        self._reply(404)

    def _create(self, req: dict):
        """server/create.go CreateHandler: file names and digests, name check, blobs, template
        parse; parameters stored as given."""
        for path, digest in (req.get("files") or {}).items():
            if not valid_path(path):
                return self._reply(400, {"error": "file path must be relative"})  # errFilePath
            if not digest:
                return self._reply(400, {"error": "invalid digest format"})  # manifest/paths.go
        if not name_is_valid(req.get("model", "")):
            return self._reply(400, {"error": "invalid model name"})  # types/errtypes/errtypes.go
        if not req.get("files"):
            return self._reply(400, {"error": "neither 'from' or 'files' was specified"})
        missing = [d for d in req["files"].values() if d not in self.blobs]
        if missing:
            return self._reply(400, {"error": f"blob not found: {missing[0]}"})
        error = template_error(req.get("template") or "")
        if error:
            return self._reply(400, {"error": f"template error: {error}"})  # errBadTemplate
        stored = {k: req.get(k) for k in ("model", "files", "template", "system", "parameters")}
        stored["digest"] = hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()
        self.models[display_shortest(req["model"]).lower()] = stored
        self._reply(200, {"status": "success"})

    def _chat(self, req: dict):
        """server/routes.go ChatHandler: 404 for an unknown model, FromMap of the stored parameters
        and the request's options (handleScheduleError: 500), the system prompt first, then the
        answer; llm/llama_server.go returns no done response after its token-repeat abort."""
        model = self._model(req["model"])
        if model is None:
            return self._reply(404, {"error": f"model '{req['model']}' not found"})
        error = from_map(model["parameters"] or {}) or from_map(req.get("options") or {})
        if error:
            return self._reply(500, {"error": error})
        messages = req["messages"]
        if model["system"] and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": model["system"]}, *messages]
        type(self).last_prompt = render(model["template"] or "", {
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
        if self.repeat_abort:
            return self._reply(200, {"message": {"role": "assistant", "content": "はい" * 31}, "done": False})
        self._reply(200, {"message": {"role": "assistant", "content": self.answer},
                          "done": True, "done_reason": self.done_reason})

    def log_message(self, *args):
        pass
