"""A contract server for our REST client: the endpoints it uses, behaving as Ollama's source
(v0.33.0-rc2, fb30760) says, each behaviour citing the file it follows. It rejects what Ollama
rejects, streams NDJSON unless asked not to, rewrites every GGUF it creates from (with the pinned
llama-quantize COPY, as Ollama's create does), and answers a chat either from a script set by
the test or, like Ollama since v0.30, from a real upstream llama-server on the model's GGUF; in
both cases through Ollama's token-repeat abort.

Its rules (names, options) are its own copies, taken from Ollama's Go source, not the
project's pipeline/ollama_rules.py: a stand-in that shared the client's rules would only test
the project against itself.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx2
from gguf import GGUFReader
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gotemplate import TemplateError, parse_error, render

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
    """server/create.go setTemplate: template/template.go Parse's error (Go's text/template, run
    by tests/gotemplate.py), or None."""
    return parse_error(template)


# -- manifest/paths.go BlobsPath: only sha256 digests ------------------------------------------------
DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")

# -- api/types.go DefaultOptions: what a chat runs with where neither the model nor the request sets it
DEFAULT_OPTIONS = {"num_predict": -1, "num_keep": 4, "temperature": 0.8, "top_k": 40, "top_p": 0.9,
                   "typical_p": 1.0, "repeat_last_n": 64, "repeat_penalty": 1.0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "seed": -1, "min_p": 0.0, "stop": []}
REPEAT_LIMIT = 30  # llm/llama_server.go Completion: abort once one trimmed token repeats more than 30 times


def chat_template_capabilities(chat_template: str) -> set[str]:
    """server/images.go chatTemplateHasToolSupport / chatTemplateHasThinkingSupport (the first
    rule of the latter; the split('</think>') variant is left out)."""
    caps = set()
    if "tools" in chat_template or "tool_call" in chat_template:
        caps.add("tools")
    if "<think>" in chat_template and "</think>" in chat_template:
        caps.add("thinking")
    return caps


def go_template_capabilities(template: str) -> set[str]:
    """server/images.go goTemplateCapabilities, approximated on the text: `.Tools` for tools
    (Vars contains "tools"), `.Suffix` for insert, `.Thinking` for thinking (thinking.InferTags
    takes the text around it as the tags; a literal <think> elsewhere gives no thinking)."""
    return {cap for cap, field in (("tools", ".Tools"), ("insert", ".Suffix"), ("thinking", ".Thinking"))
            if field in template}


def uses_go_template(template: str, chat_template: str, go_template_env: bool | None) -> bool:
    """server/routes.go shouldUseGoTemplate: OLLAMA_GO_TEMPLATE decides when set; else the Go
    TEMPLATE is used unless the GGUF's chat template offers more capabilities
    (server/images.go shouldPreferChatTemplate's hasMoreCapabilities, a count, without the tool
    round-trip refinements)."""
    if not template:
        return False
    if go_template_env is not None:
        return go_template_env
    return not (chat_template and len(chat_template_capabilities(chat_template)) > len(go_template_capabilities(template)))


def render_native(chat_template: str, messages: list[dict], bos: str, eos: str, adds_bos: bool) -> str:
    """What llama-server's /apply-template renders from the GGUF's Jinja chat template in native
    mode, for the body Ollama sends it (llm/llama_server.go llamaServerChatRequest: messages only).
    llama.cpp's own Jinja engine is stood in for by jinja2 with the settings transformers uses, fed
    as common/chat.cpp feeds it: bos_token, eos_token, enable_thinking (true, its default and what
    Ollama sends for a thinking model), strftime_now on local time (common/jinja/value.cpp), and
    the extra context of common_chat_extra_context (date_string "%d %b %Y", datetime "%b %d %Y"),
    which Llama-3.1's template takes instead of its own 26 Jul 2024. A final assistant message is
    continued, not answered (tools/server: prefill_assistant, on by default): llama.cpp appends
    its content to the render without it and a generation prompt inferred by comparing renders
    (common/chat-auto-parser-generator.cpp); here the whole render is cut after the content, the
    same for the templates whose native render Ollama prefers (not for one that writes eos_token
    where no generation prompt is asked for, such as Phi-3.5's). A leading BOS text is dropped
    when the GGUF's tokenizer adds BOS (common_chat_template_direct_apply_impl)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    now = datetime.now()
    prefill = bool(messages) and messages[-1]["role"] == "assistant"
    end = "\x00end of the continued message\x00"  # marks where the continued content ends
    if prefill:
        messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + end}]
    rendered = env.from_string(chat_template).render(
        messages=messages, add_generation_prompt=not prefill, bos_token=bos, eos_token=eos, enable_thinking=True,
        date_string=now.strftime("%d %b %Y"), datetime=now.strftime("%b %d %Y"))
    if prefill:
        rendered = rendered[:rendered.rindex(end)]
    return rendered[len(bos):] if adds_bos and bos and rendered.startswith(bos) else rendered


def gguf_chat_format(path: Path) -> tuple[str, str, str, bool]:
    """tokenizer.chat_template, the BOS and EOS token texts and tokenizer.ggml.add_bos_token of a
    GGUF (gguf-py's reader)."""
    reader = GGUFReader(str(path))

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    tokens = field("tokenizer.ggml.tokens") or []
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    return (field("tokenizer.chat_template") or "", tokens[bos] if bos is not None else "",
            tokens[eos] if eos is not None else "", bool(field("tokenizer.ggml.add_bos_token")))


def format_parameters(parameters: dict) -> str:
    """server/routes.go GetModelInfo: one `%-30s %#v` line per value, a list one line per item
    (Go's map order is random: sorted here). JSON numbers are float64 there: 2048 prints as 2048."""
    def go_value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    lines = []
    for key in sorted(parameters):
        values = parameters[key] if isinstance(parameters[key], list) else [parameters[key]]
        lines.extend(f"{key:<30} {go_value(v)}" for v in values)
    return "\n".join(lines)


class LlamaServers:
    """Upstream llama-server processes, one per model blob, as Ollama runs them since v0.30."""

    def __init__(self):
        self.running: dict[str, tuple[subprocess.Popen, int]] = {}

    def url(self, tool: str, blob: Path) -> str:
        if str(blob) not in self.running:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = subprocess.Popen([tool, "-m", str(blob), "--host", "127.0.0.1", "--port", str(port), "-c", "2048",
                                     "-t", "2", "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.running[str(blob)] = (proc, port)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert proc.poll() is None, f"llama-server exited with {proc.returncode}"
                try:
                    if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                time.sleep(0.2)
        return f"http://127.0.0.1:{self.running[str(blob)][1]}"

    def stop(self):
        for proc, _ in self.running.values():
            proc.terminate()
            proc.wait(10)
        self.running.clear()


class FakeOllama(http.server.BaseHTTPRequestHandler):
    """Class attributes hold the server's state; `reset()` restores a fresh one.

    A chat is answered by the real `llama_server` (a path) when set, else by the script: `pieces`
    (or the characters of `answer`), ended as `done_reason` says. Creating needs `quantize` (the
    path of llama-quantize), which rewrites the GGUF as Ollama does."""

    blob_dir: Path | None = None
    blobs: dict[str, bytes] = {}
    models: dict[str, dict] = {}  # DisplayShortest name (lower case) -> create request, blob, digest
    calls: list[str] = []
    done_reason = "stop"
    answer = "こんにちは。私はアシスタントです。"
    pieces: list[str] | None = None
    version = "0.33.0"
    go_template: bool | None = None  # OLLAMA_GO_TEMPLATE on the server (None: unset)
    create_pause = 0.0  # seconds between the progress lines of the GGUF rewrite
    quantize: str | None = None
    llama_server: str | None = None
    servers = LlamaServers()
    last_prompt = ""  # the prompt rendered for the last chat

    @classmethod
    def reset(cls) -> None:
        cls.servers.stop()
        cls.blobs, cls.models, cls.calls = {}, {}, []
        cls.done_reason, cls.answer, cls.pieces, cls.version = "stop", "こんにちは。私はアシスタントです。", None, "0.33.0"
        cls.go_template, cls.create_pause, cls.last_prompt = None, 0.0, ""

    @classmethod
    def restart(cls) -> None:
        """A server restart: server/images.go PruneLayers removes every blob no manifest references."""
        cls.servers.stop()
        referenced = {m["blob"] for m in cls.models.values()}
        cls.blobs = {d: b for d, b in cls.blobs.items() if d in referenced}

    # -- the wire ----------------------------------------------------------------------------------
    def _reply(self, status: int, body: dict | None = None):
        data = json.dumps(body or {}, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _answer(self, req: dict, events):
        """server/routes.go streamResponse (NDJSON, the default) or waitForStream / writeChatResponse
        (`"stream": false`): an {"error", "status"} event before anything was written is answered
        with its status (500 without one), after that as a line in the 200 stream."""
        if req.get("stream", True) is False:
            latest, content = {}, []
            for event in events:
                if "error" in event:
                    return self._reply(event.get("status", 500), {"error": event["error"]})
                content.append(((event.get("message") or {}).get("content")) or "")
                latest = event
            if "message" in latest:
                latest = {**latest, "message": {**latest["message"], "content": "".join(content)}}
            return self._reply(200, latest)
        written = False
        for event in events:
            if "error" in event and not written:
                return self._reply(event.get("status", 500), {"error": event["error"]})
            if not written:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                written = True
            self.wfile.write(json.dumps({"error": event["error"]} if "error" in event else event,
                                        ensure_ascii=False).encode() + b"\n")
            self.wfile.flush()
            if "error" in event:
                return

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
        self._reply(404, {"error": "404 page not found"})

    def do_HEAD(self):  # noqa: N802
        """server/routes.go HeadBlobHandler: 400 for a malformed digest, 404 when absent."""
        self.calls.append(f"HEAD {self.path}")
        digest = self.path.rsplit("/", 1)[-1]
        if not DIGEST.match(digest):
            return self._reply(400, {"error": "invalid digest format"})
        self._reply(200 if digest in self.blobs else 404)

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
            if not DIGEST.match(digest):
                return self._reply(400, {"error": "invalid digest format"})
            if digest in self.blobs:
                return self._reply(200)
            got = "sha256:" + hashlib.sha256(body).hexdigest()
            if got != digest:
                return self._reply(400, {"error": f"digest mismatch, expected {json.dumps(digest)}, got {json.dumps(got)}"})
            self.blobs[digest] = body
            return self._reply(201)
        try:
            req = json.loads(body)
        except ValueError as e:
            return self._reply(400, {"error": str(e)})
        if self.path == "/api/create":
            return self._create(req)
        if self.path == "/api/chat":
            return self._chat(req)
        if self.path == "/api/show":
            return self._show(req)
        self._reply(404, {"error": "404 page not found"})

    # -- create -------------------------------------------------------------------------------------
    def _create(self, req: dict):
        """server/create.go CreateHandler: file names and digests and the name are checked before
        anything streams (400); then the work streams: parsing GGUF (a missing blob, no GGUF magic),
        the template, the GGUF rewrite (copyLayerWithLlamaQuantize: a new blob), the manifest."""
        for path, digest in (req.get("files") or {}).items():
            if not valid_path(path):
                return self._reply(400, {"error": "file path must be relative"})  # errFilePath
            if not digest:
                return self._reply(400, {"error": "invalid digest format"})  # manifest.ErrInvalidDigestFormat
        if not name_is_valid(req.get("model", "")):
            return self._reply(400, {"error": "invalid model name"})  # types/errtypes/errtypes.go
        self._answer(req, self._create_events(req))

    def _create_events(self, req: dict):
        if not req.get("files"):
            yield {"error": "neither 'from' or 'files' was specified", "status": 400}
            return
        (name, digest), *_ = req["files"].items()
        yield {"status": "parsing GGUF"}  # ggufLayersWithMediaType
        if not DIGEST.match(digest):
            yield {"error": "invalid digest format"}
            return
        if digest not in self.blobs:  # os.Open of the blob path
            yield {"error": f"open {digest.replace(':', '-')}: no such file or directory"}
            return
        if self.blobs[digest][:4] != b"GGUF":  # detectContentType
            yield {"error": "supplied file was not in GGUF format", "status": 400}
            return
        error = template_error(req.get("template") or "")
        if error:
            yield {"error": f"template error: {error}", "status": 400}  # errBadTemplate
            return
        rewritten = yield from self._rewrite(digest)
        if rewritten is None:
            return
        new_digest, data = rewritten
        self.blobs[new_digest] = data
        yield {"status": f"creating new layer {new_digest}"}
        yield {"status": "writing manifest"}
        stored = {k: req.get(k) for k in ("model", "files", "template", "system", "parameters", "license")}
        stored["blob"] = new_digest
        stored["digest"] = hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()
        self.models[display_shortest(req["model"]).lower()] = stored
        yield {"status": "success"}

    def _rewrite(self, digest: str):
        """rewriteLayerWithLlamaQuantize with COPY: progress as "validating GGUF model", then
        "verifying conversion"; the result is a new blob with its own digest."""
        assert self.quantize, "the contract server needs FakeOllama.quantize (llama-quantize) to create"
        total = len(self.blobs[digest])
        with tempfile.TemporaryDirectory() as tmp:
            source, out = Path(tmp) / "in.gguf", Path(tmp) / "COPY"
            source.write_bytes(self.blobs[digest])
            for done in (0, total // 2, total):
                yield {"status": "validating GGUF model", "digest": "0000000000000000000", "total": total,
                       "completed": done}
                time.sleep(self.create_pause)
            proc = subprocess.run([self.quantize, "--allow-requantize", str(source), str(out), "COPY"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                yield {"error": f"failed to validate GGUF with llama-quantize: {proc.stderr[-300:]}"}
                return None
            data = out.read_bytes()
        yield {"status": "verifying conversion"}
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    # -- show ---------------------------------------------------------------------------------------
    def _show(self, req: dict):
        """server/routes.go ShowHandler / GetModelInfo: the template, system and parameters text, and
        the licenses joined by newlines (server/create.go: a license is a string or a list of them)."""
        model = self._model(req.get("model") or req.get("name") or "")
        if model is None:
            return self._reply(404, {"error": f"model '{req.get('model')}' not found"})
        licenses = model.get("license") or []
        licenses = [licenses] if isinstance(licenses, str) else licenses
        self._reply(200, {"template": model["template"] or "", "system": model["system"] or "",
                          "parameters": format_parameters(model["parameters"] or {}),
                          **({"license": "\n".join(licenses)} if licenses else {})})  # api/types.go: omitempty

    # -- chat ---------------------------------------------------------------------------------------
    def _blob_path(self, model: dict) -> Path:
        path = Path(self.blob_dir or tempfile.gettempdir()) / model["blob"].replace(":", "-")
        if not path.exists():
            path.write_bytes(self.blobs[model["blob"]])
        return path

    def _prompt(self, model: dict, messages: list[dict]) -> str:
        """The prompt: the Go TEMPLATE (template.Execute) or, in native mode, the GGUF's own
        chat template (server/routes.go chatModeForModel)."""
        chat_template, bos, eos, adds_bos = gguf_chat_format(self._blob_path(model))
        if uses_go_template(model["template"] or "", chat_template, self.go_template):
            return render(model["template"], messages)
        return render_native(chat_template, messages, bos, eos, adds_bos)

    def _chat(self, req: dict):
        """server/routes.go ChatHandler: 404 for an unknown model, FromMap of the stored parameters
        and the request's options (handleScheduleError: 500), the model's SYSTEM first when the chat
        has none, `_debug_render_only` answered with the prompt, else the answer streamed."""
        model = self._model(req.get("model", ""))
        if model is None:
            return self._reply(404, {"error": f"model '{req.get('model')}' not found"})
        error = from_map(model["parameters"] or {}) or from_map(req.get("options") or {})
        if error:
            return self._reply(500, {"error": error})
        messages = req.get("messages") or []
        if model["system"] and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": model["system"]}, *messages]
        try:
            prompt = self._prompt(model, messages)
        except TemplateError as e:  # server/routes.go ChatHandler: chatPrompt's error, 500
            return self._reply(500, {"error": str(e)})
        type(self).last_prompt = prompt
        if req.get("_debug_render_only"):
            return self._reply(200, {"model": req["model"], "created_at": now(),
                                     "debug_info": {"rendered_template": prompt, "image_count": 0}})
        options = {**DEFAULT_OPTIONS, **(model["parameters"] or {}), **(req.get("options") or {})}
        self._answer(req, self._chat_events(req["model"], model, prompt, options))

    def _chat_events(self, name: str, model: dict, prompt: str, options: dict):
        """llm/llama_server.go Completion: each llama-server event's content, with the token-repeat
        abort (the stream then ends without a done line); the last event says stop or length."""
        last, repeats = "", 0
        for content, stop_type in self._generate(model, prompt, options):
            if content.strip() == last:
                repeats += 1
            else:
                last, repeats = content.strip(), 0
            if repeats > REPEAT_LIMIT:
                return  # "prediction aborted, token repeat limit reached": no final response
            if stop_type is not None:
                yield {"model": name, "created_at": now(), "message": {"role": "assistant", "content": content},
                       "done": True, "done_reason": "length" if stop_type == "limit" else "stop"}
                return
            if content:
                yield {"model": name, "created_at": now(), "message": {"role": "assistant", "content": content},
                       "done": False}

    def _generate(self, model: dict, prompt: str, options: dict):
        """(content, stop_type) events as llama-server's /completion streams them: stop_type None
        until the last event ("eos", "word" or "limit")."""
        if self.llama_server is None:
            pieces = list(self.pieces if self.pieces is not None else self.answer)
            limit = options["num_predict"]
            if limit >= 0 and len(pieces) > limit:
                pieces, ending = pieces[:limit], "limit"
            else:
                ending = "limit" if self.done_reason == "length" else "eos"
            yield from ((p, None) for p in pieces)
            yield "", ending
            return
        url = self.servers.url(self.llama_server, self._blob_path(model))
        request = {"prompt": prompt, "stream": True, "cache_prompt": True, "n_predict": options["num_predict"],
                   "n_keep": options["num_keep"], "temperature": options["temperature"], "top_k": options["top_k"],
                   "top_p": options["top_p"], "min_p": options["min_p"], "stop": options["stop"],
                   "repeat_penalty": options["repeat_penalty"], "repeat_last_n": options["repeat_last_n"],
                   "frequency_penalty": options["frequency_penalty"], "presence_penalty": options["presence_penalty"],
                   "typical_p": options["typical_p"], "seed": options["seed"]}
        with httpx2.stream("POST", f"{url}/completion", json=request, timeout=120, trust_env=False) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: "):])
                yield event.get("content", ""), (event.get("stop_type") or "eos") if event.get("stop") else None

    def log_message(self, *args):
        pass


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


@contextmanager
def running(blob_dir: Path, quantize: str, llama_server: str | None = None):
    """A fresh FakeOllama on a free loopback port, its blobs in blob_dir, rewriting with `quantize`
    (llama-quantize) and answering chats with `llama_server` when given; yields its host:port."""
    FakeOllama.reset()
    FakeOllama.blob_dir, FakeOllama.quantize, FakeOllama.llama_server = blob_dir, quantize, llama_server
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        FakeOllama.reset()
        FakeOllama.llama_server = None
