"""A contract server for our REST client: the endpoints it uses, behaving as Ollama's source
(v0.33) says, each behaviour citing the file it follows. It rejects what Ollama rejects; it does
not run a model (the answer is set by the test).
"""
from __future__ import annotations

import hashlib
import http.server
import json

from gotemplate import render
from pipeline.ollama_rules import OPTIONS, display_shortest, name_is_valid, parse_name


def from_map(options: dict) -> str | None:
    """api/types.go Options.FromMap: the error a chat gets for a stored or requested option of
    the wrong JSON type; unknown keys are dropped (only logged)."""
    for key, value in options.items():
        if key not in OPTIONS or value is None:
            continue
        kind = OPTIONS[key][0]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "int" and not number:
            return f'option "{key}" must be of type integer'
        if kind == "float" and not number:
            return f'option "{key}" must be of type float32'
        if kind == "bool" and not isinstance(value, bool):
            return f'option "{key}" must be of type boolean'
        if kind == "list" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return f'option "{key}" must be of type array'
    return None


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
        if not name_is_valid(parse_name(req.get("model", ""))):
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
