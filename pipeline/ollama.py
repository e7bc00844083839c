"""Stage 4, ollama: render the Modelfile, register the model, prove it answers.

`render_modelfile` joins `FROM <quantized gguf>`, the chat template and stop
tokens (the config's own, or `modelfiles/<family>.Modelfile`), the configured
parameters (num_ctx always) and the system prompt. `register` creates the
model through Ollama's REST API at OLLAMA_HOST (parsed as Ollama's
envconfig.Host does; the GGUF uploaded as a blob named by its sha256, skipped
when the server has it), on a host and in a container alike; there is no CLI
path, because `ollama create -f` parses a Modelfile and drops every rune that
is not strconv.IsPrint (parser/parser.go), U+3000 included. Then
one greedy Japanese chat request must come back non-empty, ended by a stop
token (done_reason "stop", not "length") and free of "<|": `ollama create`
reports success for models that then fail to load or never stop. Only then is
`ollama.json` written (model name, GGUF and Modelfile sha256, the server's
manifest digest), the stamp that tells Make the registration is current;
`stamp_follows_server` removes it when the server no longer has that model.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import httpx2

from .artifacts import atomic_write_text, sha256_file
from .chattext import without_bos
from .config import Config, modelfile_family
from .errors import BadInputError, OllamaError
from .formats import validate_gguf
from .goproxy import is_loopback, proxy_for
from .modelcard import card_path
from .modelfiles import family_spec
from .ollama_rules import MIN_OLLAMA_VERSION, connect_url, display_shortest, parse_host, typed_option, version_tuple


def chat_format(cfg: Config) -> tuple[str, list[str]]:
    """TEMPLATE and stops: the config's own, else the Modelfile of ollama.family or of the base's
    family (OllamaError when that Modelfile is missing or the base's family is not known yet)."""
    if cfg.ollama.template is not None:
        return cfg.ollama.template, list(cfg.ollama.stop or [])
    family = modelfile_family(cfg)
    if family is None:
        raise OllamaError("ollama.family: no config.json of the base is at hand to tell its family from; "
                          "set ollama.family (a name in modelfiles/) or fetch the base first")
    return family_spec(family)


def chat_format_source(cfg: Config) -> str:
    """Where chat_format takes the TEMPLATE from, as messages name it."""
    return "ollama.template" if cfg.ollama.template is not None else f"modelfiles/{modelfile_family(cfg)}.Modelfile"


def required_stops(model_dir: Path) -> set[str]:
    """Stop strings the model's own files call for: the special tokens its chat
    template writes, and the end-of-sequence tokens of its generation config."""
    def read(name):
        p = model_dir / name
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    by_id = {int(i): t["content"] for i, t in read("tokenizer_config.json").get("added_tokens_decoder", {}).items()}
    eos = read("generation_config.json").get("eos_token_id", [])
    needed = {by_id[i] for i in (eos if isinstance(eos, list) else [eos]) if i in by_id}
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        needed |= set(re.findall(r"<\|[A-Za-z0-9_]+\|>", template.read_text(encoding="utf-8")))
    return needed


def primary_quantization(cfg: Config) -> str:
    """The GGUF that Ollama serves: the first configured quantization."""
    return cfg.gguf.quantizations[0]


def check_served_gguf(cfg: Config) -> tuple[Path, str | None]:
    """The GGUF Ollama serves and its sha256 (None when it does not exist yet); when it exists it
    must be a complete GGUF (GGUFError, exit 2, names it) and what quantize wrote."""
    from .integrity import verify_file

    gguf = cfg.gguf_path(primary_quantization(cfg))
    if not gguf.exists():
        return gguf, None
    validate_gguf(gguf)  # a file that is no GGUF at all is named as such (GGUFError, exit 2)
    return gguf, verify_file(gguf)  # one that is not what quantize wrote is removed, to be rebuilt


def create_parameters(cfg: Config) -> dict:
    """The model's parameters as /api/create stores them and the Modelfile writes them: the
    configured ones with the JSON type Options.FromMap expects (api/types.go: a float for a
    float32 field), num_ctx always (cfg.served_context, so no server default decides the
    context), and the chat format's stops."""
    _, stops = chat_format(cfg)
    params = {key: typed_option(key, value) for key, value in cfg.ollama.parameters.items()}
    return {**params, "num_ctx": cfg.served_context, "stop": stops}


def _modelfile_value(value: object) -> str:
    """A parameter as the Modelfile parser reads it back (api/types.go FormatParams)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def model_card(cfg: Config) -> str | None:
    """The fused model's card (pipeline/modelcard.py), which registration sends as the model's
    license: Ollama keeps no other text beside a model (api/types.go CreateRequest: license, a
    string or a list; server/create.go setLicense stores each as a layer of its own, which
    `ollama show --license` prints and `ollama push` carries). None before fuse has written it."""
    path = card_path(cfg)
    return path.read_text(encoding="utf-8") if path.is_file() else None


def render_modelfile(cfg: Config) -> str:
    """The Modelfile text: a readable record of exactly what register sends to /api/create
    (TEMPLATE, stops, parameters, SYSTEM; the license, the model card, is named, not copied, so
    that the Modelfile follows the config alone); FROM is relative to the Modelfile's folder."""
    gguf = cfg.gguf_path(primary_quantization(cfg))
    template, _ = chat_format(cfg)
    params = create_parameters(cfg)
    source = chat_format_source(cfg)
    lines = [
        f"# Generated by `python -m pipeline modelfile` for run {cfg.run.name!r}; edit the config, not this file.",
        "# `make ollama` registers it through Ollama's REST API; `ollama create -f` would drop the",
        "# characters Ollama's Modelfile parser does not keep (U+3000, U+00A0, U+200B; parser/parser.go).",
        f"FROM ./{gguf.relative_to(cfg.modelfile_path.parent).as_posix()}",
        "",
        f"# Chat format from {source}",
        f'TEMPLATE """{template}"""',
        *(f'PARAMETER stop "{s}"' for s in params.pop("stop")),
        *(f"PARAMETER {key} {_modelfile_value(value)}" for key, value in params.items()),
    ]
    if cfg.ollama.system:
        lines.append(f'SYSTEM """{cfg.ollama.system}"""')
    card = card_path(cfg).relative_to(cfg.modelfile_path.parent).as_posix()
    lines.append(f"# LICENSE: `make ollama` sends the model card, {card}, as the model's license")
    return "\n".join(lines) + "\n"


def write_modelfile(cfg: Config) -> Path:
    """Render and write `<run>/Modelfile` atomically; returns its path.

    The stops are checked against the model's own files (the fused model, or
    a local base): every special token its chat template writes and every
    end-of-sequence token of its generation config must be a stop, or the
    model rambles on in Ollama. Raises OllamaError naming the missing ones.
    """
    model_dir = chat_source_dir(cfg)
    if model_dir is None:
        raise OllamaError(f"{cfg.fused_dir}: no fused model to read the chat format's tokens from; run `make fuse`")
    _, stops = chat_format(cfg)
    missing = sorted(required_stops(model_dir) - set(stops))
    if missing:
        raise OllamaError(f"the Modelfile's stops lack {missing}, which {model_dir} ends turns or text with "
                          "(chat_template.jinja, generation_config.json): add them to the chat format")
    check_served_gguf(cfg)  # never a Modelfile FROM a file that is not a GGUF
    text = render_modelfile(cfg)
    atomic_write_text(cfg.modelfile_path, text)
    print(f"[modelfile] wrote {cfg.modelfile_path}")
    return cfg.modelfile_path


def ollama_host() -> str:
    """The server URL, from OLLAMA_HOST exactly as Ollama's own client reads it (envconfig.Host)."""
    return parse_host(os.environ.get("OLLAMA_HOST", ""))


class NoServerError(OllamaError):
    """No Ollama answers at OLLAMA_HOST: refused, unknown host, an address no client can use, or
    something that is not Ollama (a web page where /api/version should be)."""


class OllamaTimeout(OllamaError):
    """A server answered before but then stayed silent longer than the client's timeout."""


class ModelNotFound(OllamaError):
    """The server does not have the model (HTTP 404 from chat or show, server/routes.go)."""


SILENCE_TIMEOUT = 600.0  # seconds a request may wait for the server's next bytes (not its total time)
CONNECT_TIMEOUT = 10.0
UPLOAD_CHUNK = 1 << 20


def ollama_backend() -> str:
    """Ollama's OpenAI-compatible /v1 at OLLAMA_HOST; BadInputError for a value naming no server."""
    try:
        return connect_url(ollama_host()) + "/v1"
    except ValueError as e:
        raise BadInputError(f"OLLAMA_HOST={os.environ.get('OLLAMA_HOST', '')!r} names no server ({e}): give "
                            "host:port, e.g. 127.0.0.1:11434, or --backend URL") from None


def _snippet(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return repr(text[:120] + ("..." if len(text) > 120 else ""))


class OllamaClient:
    """The few endpoints of Ollama's REST API this pipeline uses, reached as Ollama's own client
    reaches them.

    host: a URL as ollama_host gives it (default: OLLAMA_HOST); requests go to its connectable
    form (envconfig.ConnectableHost) with the host's path kept as a prefix, as api/client.go's
    JoinPath does, through the proxy Go would use (pipeline.goproxy: never for loopback).
    timeout: seconds of silence a request may wait for the server's next bytes. Long work
    (create, a first chat) streams NDJSON, as Ollama's CLI asks for it, so a slow server that
    reports progress never times out, and neither does a reverse proxy in front of it.
    Every failure is an OllamaError naming the host and what came back.
    """

    def __init__(self, host: str | None = None, timeout: float = SILENCE_TIMEOUT, say=print):
        self.host = host or ollama_host()
        try:
            self.base = connect_url(self.host)
        except ValueError as e:
            raise NoServerError(f"OLLAMA_HOST={os.environ.get('OLLAMA_HOST', '')!r} names no server: {e}. "
                                "Give host:port, e.g. 127.0.0.1:11434 or http://gpu-box:11434") from None
        self.timeout = timeout
        self.say = say

    @contextmanager
    def _exchange(self, method: str, path: str, *, body: dict | None = None, content=None,
                  headers: dict | None = None, timeout: float | None = None, doing: str = ""):
        """The response to one request, read inside the block; transport failures become
        NoServerError, or OllamaTimeout once the server has been silent for `timeout` seconds
        during `doing`."""
        url = f"{self.base}{path}"
        timeout = timeout or self.timeout
        headers = dict(headers or {})
        if body is not None:
            content = json.dumps(body, ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        limits = httpx2.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT))
        try:
            with httpx2.Client(trust_env=False, proxy=proxy_for(url), timeout=limits) as client:
                with client.stream(method, url, content=content, headers=headers) as response:
                    yield response
        except httpx2.TimeoutException as e:
            if doing and not isinstance(e, (httpx2.ConnectTimeout, httpx2.PoolTimeout)):
                raise OllamaTimeout(
                    f"Ollama at {self.host} sent nothing for {timeout:g} s while {doing}. It may still be "
                    "working (since v0.30 every create rewrites the GGUF with llama-quantize, "
                    "server/create.go; a first chat loads the model): watch the server's log or "
                    "`ollama ps`, then run `make ollama` again") from None
            raise NoServerError(f"no Ollama server answers at {self.host} ({type(e).__name__})") from None
        except (httpx2.HTTPError, httpx2.InvalidURL, OSError, ImportError) as e:  # ImportError: socks5 without socksio
            raise NoServerError(f"no Ollama server answers at {self.host} ({type(e).__name__}: {e})") from None

    def _json(self, response, path: str) -> dict:
        """A whole reply as a JSON object; an error status gives {"error": its message}. A 2xx
        reply that is no JSON object is an OllamaError: something else answers at OLLAMA_HOST."""
        raw = response.read()
        try:
            obj = json.loads(raw) if raw.strip() else {}
        except ValueError:
            obj = None
        if response.status_code >= 400:
            detail = obj.get("error") if isinstance(obj, dict) else None
            return {"error": detail or f"{response.reason_phrase} {_snippet(raw)}"}
        if not isinstance(obj, dict):
            kind = response.headers.get("content-type", "no content type")
            raise NoServerError(
                f"{self.host}{path} answered HTTP {response.status_code} with {kind} {_snippet(raw)}, not "
                f"Ollama's JSON: is OLLAMA_HOST an Ollama server? (an explicit http:// without a port "
                f"means port 80; Ollama listens on 11434)")
        return obj

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None,
              doing: str = "") -> tuple[int, dict]:
        with self._exchange(method, path, body=body, timeout=timeout, doing=doing) as response:
            return response.status_code, self._json(response, path)

    def _stream(self, path: str, body: dict, doing: str):
        """The NDJSON objects of a streamed reply (`stream: true`, Ollama's default). An error
        status, a line that is no JSON object, or an {"error"} line (how Ollama reports a failure
        after it has begun a 200 stream, server/routes.go streamResponse) is an OllamaError."""
        with self._exchange("POST", path, body={**body, "stream": True}, doing=doing) as response:
            if response.status_code != 200:
                yield {"status_code": response.status_code, **self._json(response, path)}
                return
            for line in response.iter_lines():
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    raise OllamaError(f"{self.host}{path} sent a line that is not Ollama's JSON while {doing}: "
                                      f"{_snippet(line.encode())}")
                if obj.get("error"):
                    raise OllamaError(f"Ollama at {self.host} failed while {doing}: {obj['error']}")
                yield obj

    def version(self) -> str:
        """The server's version (GET /api/version); OllamaError when it is older than the API used."""
        status, body = self._call("GET", "/api/version", timeout=5)
        if status != 200 or "version" not in body:
            raise NoServerError(f"{self.host}/api/version answered {status}: {body.get('error', body)} "
                                "(is OLLAMA_HOST an Ollama server?)")
        version = str(body.get("version", "?"))
        found = version_tuple(version)
        if found is not None and found < MIN_OLLAMA_VERSION:
            need = ".".join(map(str, MIN_OLLAMA_VERSION))
            raise OllamaError(f"Ollama {version} at {self.host} is too old: registration creates with blob "
                              f"files and checks the prompt Ollama renders (_debug_render_only), which need "
                              f"Ollama {need} or later. Upgrade it (https://ollama.com/download)")
        return version

    def has_blob(self, digest: str) -> bool:
        status, body = self._call("HEAD", f"/api/blobs/{digest}", timeout=30)
        if status not in (200, 404):
            raise OllamaError(f"{self.host} answered {status} when asked for blob {digest[:19]}...: "
                              f"{body.get('error')}")
        return status == 200

    def push_blob(self, path: Path, digest: str) -> None:
        def chunks():
            with open(path, "rb") as f:
                while chunk := f.read(UPLOAD_CHUNK):
                    yield chunk

        headers = {"Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"}
        with self._exchange("POST", f"/api/blobs/{digest}", content=chunks(), headers=headers,
                            doing=f"receiving {path.name}") as response:
            status, body = response.status_code, self._json(response, f"/api/blobs/{digest}")
        if status not in (200, 201):
            raise OllamaError(f"uploading {path.name} to {self.host} failed ({status}): {body.get('error')}")

    def create(self, model: str, files: dict[str, str], template: str, system: str, parameters: dict,
               license: str | None = None) -> None:
        """POST /api/create, streamed: each new status line is said as it comes (the GGUF rewrite
        with its percentage), and only a final "success" is success."""
        doing = f"creating {model}"
        last, shown, final = None, -1, {}
        body = {"model": model, "files": files, "template": template, "system": system or None,
                "parameters": parameters, **({"license": license} if license else {})}
        for line in self._stream("/api/create", body, doing):
            if "status_code" in line:
                raise OllamaError(f"creating {model} on {self.host} failed ({line['status_code']}): "
                                  f"{line.get('error')}")
            final = line
            status, total, done = line.get("status"), line.get("total"), line.get("completed")
            if status != last:
                last, shown = status, -1
                self.say(f"[ollama] {status}")
            elif isinstance(total, int) and isinstance(done, int) and total > 0 and done * 10 // total > shown:
                shown = done * 10 // total
                self.say(f"[ollama] {status}: {10 * shown}%")
        if final.get("status") != "success":
            raise OllamaError(f"creating {model} on {self.host} ended without success (last: {final or 'nothing'})")

    def chat(self, model: str, messages: list[dict], options: dict) -> dict:
        """One answer, streamed and joined: {"message": {"content"}, "done", "done_reason"}. A
        stream that ends without a done line is returned with done False (Ollama's repeat abort)."""
        content, reply = [], {"done": False}
        for line in self._stream("/api/chat", {"model": model, "messages": messages, "options": options},
                                 f"loading {model} and answering"):
            if "status_code" in line:
                self._chat_failed(model, line["status_code"], line)
            content.append((line.get("message") or {}).get("content") or "")
            reply = line
        return {**reply, "message": {"role": "assistant", "content": "".join(content)}}

    def _chat_failed(self, model: str, status: int, body: dict):
        if status == 404:
            raise ModelNotFound(f"{self.host} has no model {model} ({body.get('error')}): it was removed "
                                "(`ollama rm`) or OLLAMA_HOST points at another server; `make ollama` "
                                "registers it again")
        raise OllamaError(f"chat with {model} on {self.host} failed ({status}): {body.get('error')}")

    def rendered_prompt(self, model: str, messages: list[dict]) -> str:
        """The prompt Ollama renders for `messages` (/api/chat with `_debug_render_only`,
        server/routes.go ChatHandler): whichever template it really uses, without running the model."""
        status, body = self._call("POST", "/api/chat", {"model": model, "messages": messages, "stream": False,
                                                        "_debug_render_only": True},
                                  doing=f"rendering a prompt for {model}")
        if status != 200:
            self._chat_failed(model, status, body)
        rendered = (body.get("debug_info") or {}).get("rendered_template")
        if not isinstance(rendered, str):
            raise OllamaError(f"{self.host} answered a _debug_render_only chat without debug_info.rendered_template "
                              f"(Ollama {'.'.join(map(str, MIN_OLLAMA_VERSION))} or later returns it)")
        return rendered

    def show(self, model: str) -> dict:
        """POST /api/show: the stored template and the parameters text (server/routes.go GetModelInfo)."""
        status, body = self._call("POST", "/api/show", {"model": model}, timeout=30)
        if status != 200:
            self._chat_failed(model, status, body)
        return body

    def digest(self, model: str) -> str | None:
        """The manifest digest /api/tags lists for `model` (matched as Ollama matches names,
        case-insensitively on DisplayShortest), or None when the server does not have it."""
        status, body = self._call("GET", "/api/tags", timeout=5)
        if status != 200:
            raise OllamaError(f"{self.host}/api/tags answered {status}: {body.get('error')}")
        models = body.get("models")
        if not isinstance(models, list):
            raise OllamaError(f"{self.host}/api/tags answered a 'models' that is no list: is it an Ollama server?")
        want = display_shortest(model).lower()
        return next((m.get("digest") for m in models if isinstance(m, dict)
                     and str(m.get("name", "")).lower() == want), None)


def unavailable_reason() -> str | None:
    """None when an Ollama server answers at OLLAMA_HOST; else why not."""
    try:
        OllamaClient().version()
    except NoServerError as e:
        return str(e)
    return None


def how_to_get_ollama(reason: str, cfg: Config) -> str:
    return (
        f"Ollama is not available: {reason}.\n"
        "  Install it from https://ollama.com/download and start it with `ollama serve`,\n"
        "  or set OLLAMA_HOST to a running server (e.g. OLLAMA_HOST=http://host.docker.internal:11434).\n"
        f"  The Modelfile is ready: {cfg.modelfile_path}\n"
        "  Then run `make ollama`: it registers exactly that through Ollama's REST API\n"
        "  (`ollama create -f` would drop characters such as U+3000 from SYSTEM and TEMPLATE)."
    )


def sha256_digest(path: Path) -> str:
    return "sha256:" + sha256_file(path)


# Where a local Ollama keeps blobs (envconfig.Models: OLLAMA_MODELS, else ~/.ollama/models; the
# Linux install script runs it as user ollama with /usr/share/ollama/.ollama/models).
MODELS_FOLDERS = ("~/.ollama/models", "/usr/share/ollama/.ollama/models")


def local_models_folder(client: OllamaClient) -> Path | None:
    """The folder a server on this machine most likely stores blobs in, or None (a remote server,
    or none found): only used to warn about disk space, never to refuse."""
    if not is_loopback(httpx2.URL(client.base).host):
        return None
    candidates = [os.environ["OLLAMA_MODELS"]] if os.environ.get("OLLAMA_MODELS") else list(MODELS_FOLDERS)
    return next((Path(c).expanduser() for c in candidates if Path(c).expanduser().is_dir()), None)


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def say_disk_need(client: OllamaClient, gguf: Path, uploading: bool) -> None:
    """Say what create costs on the server's disk: the uploaded blob, and the rewrite.

    Since v0.30 Ollama rewrites every GGUF it creates from with `llama-quantize ... COPY`
    (server/create.go copyLayerWithLlamaQuantize), so the manifest references the rewrite, not
    the upload; the upload is then unreferenced and pruned at the server's next start
    (server/images.go PruneLayers, unless OLLAMA_NOPRUNE), and a later registration uploads it
    again. Create needs about twice the GGUF's size free (one if the blob is already there).
    """
    size = gguf.stat().st_size
    need = size * (2 if uploading else 1)
    line = (f"[ollama] create needs about {gigabytes(need)} free on the server: Ollama rewrites the "
            f"{gigabytes(size)} GGUF (llama-quantize COPY) and keeps the rewrite; the uploaded blob is "
            "pruned at its next start, so a later registration uploads it again")
    folder = local_models_folder(client)
    if folder is not None:
        free = shutil.disk_usage(folder).free
        line += f"; {folder} has {gigabytes(free)} free"
        if free < need:
            line += " -- NOT ENOUGH, create will likely fail: free some space there"
    client.say(line)


def create_with_api(cfg: Config, client: OllamaClient, gguf: Path, sha256: str | None = None) -> None:
    """Upload the GGUF as a blob (unless the server still has it) and create the model with the
    config's chat format (custom or family), system prompt and parameters; sha256: the GGUF's,
    when the caller has already computed it."""
    digest = "sha256:" + sha256 if sha256 else sha256_digest(gguf)
    uploading = not client.has_blob(digest)
    say_disk_need(client, gguf, uploading)
    if uploading:
        client.say(f"[ollama] uploading {gguf.name} to {client.host}")
        client.push_blob(gguf, digest)
    else:
        client.say(f"[ollama] {client.host} still has {gguf.name} ({digest[:19]}...): not uploaded again")
    template, _ = chat_format(cfg)
    client.create(cfg.ollama.model, {gguf.name: digest}, template, cfg.ollama.system, create_parameters(cfg),
                  license=model_card(cfg))


PROOF_PROMPT = "こんにちは。自己紹介を一文でしてください。"
SMOKE_TOKENS = 16  # below Ollama's repeat abort (more than 30 repeats of one token)
# What the rendered prompt is checked on: a reply and a second question, so that every role the
# chat format writes (the model's SYSTEM comes first, from Ollama) and the generation prompt show.
RENDER_CONVERSATION = [{"role": "user", "content": "富士山の高さは？"},
                       {"role": "assistant", "content": "3776メートルです。"},
                       {"role": "user", "content": PROOF_PROMPT}]


def chat_source_dir(cfg: Config) -> Path | None:
    """The folder whose tokenizer and chat template training used: the fused model, or a local base."""
    return next((d for d in (cfg.fused_dir, cfg.resolve(cfg.model.base))
                 if (d / "tokenizer_config.json").is_file()), None)


def training_prompt(model_dir: Path, messages: list[dict]) -> str:
    """The prompt text the model's own chat template renders for `messages`, as training and the
    fidelity gate render it (apply_chat_template with the generation prompt), without a leading
    BOS text (Llama-3's, Gemma's): the runtime adds BOS itself, so Ollama's render has none
    (a TEMPLATE never writes one; llama.cpp drops it from a chat template's render when the GGUF
    adds BOS, common/chat.cpp common_chat_template_direct_apply_impl)."""
    from transformers import AutoTokenizer  # heavy: only when a registration is proven

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **llama_cpp_extra_context())
    return without_bos(tokenizer, text)


def llama_cpp_extra_context(now: datetime.datetime | None = None) -> dict[str, str]:
    """What llama-server adds to every chat template's context (common/chat.cpp
    common_chat_extra_context at the pin): today's date. Llama-3.1/3.3's templates write it into
    their system header ("Today Date: ..."; without it, "26 Jul 2024"), so a prompt Ollama renders
    from such a GGUF's template carries the day it is rendered. The proof renders with the same day:
    the date line is a value of the template, not a difference of format. (Training rendered with
    the template's own default, or, for Llama-3.2, transformers' strftime_now: its day.)"""
    now = now or datetime.datetime.now()
    return {"date_string": now.strftime("%d %b %Y"), "datetime": now.strftime("%b %d %Y")}


# -- which template Ollama renders with: server/images.go at v0.33.0-rc2 (fb30760) ------------------

# What chatTemplateHasThinkingSupport looks for besides <think> and </think>.
_SPLIT_THINK = ("content.split('</think>')", 'content.split("</think>")')
_GO_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_GO_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`|\'(?:[^\'\\]|\\.)*\'')


def chat_template_capabilities(chat_template: str) -> list[str]:
    """server/images.go chatTemplateCapabilities: what a GGUF's Jinja chat template offers,
    judged by the words in it ("tools" or "tool_call"; <think> and </think>, or a split at
    </think> without reasoning_content)."""
    caps = []
    if "tools" in chat_template or "tool_call" in chat_template:
        caps.append("tools")
    if ("<think>" in chat_template and "</think>" in chat_template) or (
            any(s in chat_template for s in _SPLIT_THINK)
            and "reasoning_content" not in chat_template and "<SPECIAL_12>" not in chat_template):
        caps.append("thinking")
    return caps


def chat_template_has_tool_round_trip(chat_template: str) -> bool:
    """server/images.go chatTemplateHasToolRoundTrip: tool calls and tool results both written."""
    if "tools" not in chat_template and "tool_call" not in chat_template:
        return False
    results = ("tool_response", "tool_results", "role'] == 'tool'", "role'] == \"tool\"", "role\"] == 'tool'",
               "role\"] == \"tool\"", "message.role == 'tool'", "message.role == \"tool\"", "ipython")
    calls = "tool_calls" in chat_template or "assistant_tool_call" in chat_template
    return calls and any(r in chat_template for r in results)


def go_template_vars(template: str) -> set[str]:
    """template/template.go Vars, read from the text instead of Go's parse tree: the lower-cased
    names of the fields its actions use (.Messages, $.Tools, $m.Role), literals and comments
    left out."""
    names: set[str] = set()
    for action in _GO_ACTION.findall(template):
        if not action.strip("- \t\r\n").startswith("/*"):
            names |= {n.lower() for n in re.findall(r"\.([A-Za-z_]\w*)", _GO_LITERAL.sub("", action))}
    return names


def go_template_capabilities(template: str) -> list[str]:
    """server/images.go goTemplateCapabilities: tools (.Tools), insert (.Suffix), thinking. The
    last is thinking.InferTags there (the text around a .Thinking inside the range over
    .Messages); here any .Thinking counts, which none of modelfiles/ uses."""
    names = go_template_vars(template)
    return [cap for cap, name in (("tools", "tools"), ("insert", "suffix"), ("thinking", "thinking"))
            if name in names]


def go_template_has_tool_round_trip(template: str) -> bool:
    """server/images.go goTemplateHasToolRoundTrip."""
    names = go_template_vars(template)
    return "tools" in names and "toolcalls" in names and any(
        s in template for s in ('eq .Role "tool"', "tool_response", "TOOL_RESULTS"))


def prefers_chat_template(chat_template: str, template: str) -> bool:
    """Whether Ollama renders chats with the GGUF's `chat_template` rather than the Modelfile's
    `template` when the server leaves OLLAMA_GO_TEMPLATE unset (server/images.go GetModel and
    shouldPreferChatTemplate): when the chat template offers more capabilities (unless only the
    TEMPLATE completes a tool round trip), or the same ones with tools and only it completes one."""
    if not chat_template:
        return False
    chat, go = chat_template_capabilities(chat_template), go_template_capabilities(template)
    if len(chat) > len(go):
        return not go_template_has_tool_round_trip(template) or chat_template_has_tool_round_trip(chat_template)
    if set(chat) != set(go) or "tools" not in chat:  # sameCapabilities, both with tools
        return False
    return chat_template_has_tool_round_trip(chat_template) and not go_template_has_tool_round_trip(template)


def template_in_use(cfg: Config, gguf: Path) -> tuple[str, bool]:
    """Which template Ollama renders chats with for this model, by its own rules, and whether
    that is our TEMPLATE (Go mode) rather than the GGUF's Jinja chat template (native mode).

    server/routes.go chatModeForModel / shouldUseGoTemplate: OLLAMA_GO_TEMPLATE on the server
    decides when set; otherwise TEMPLATE loses to a GGUF chat template that offers capabilities it
    lacks (prefers_chat_template), and llama-server then renders that template natively.
    """
    chat_template = str(validate_gguf(gguf).metadata.get("tokenizer.chat_template") or "")
    template, _ = chat_format(cfg)
    source = chat_format_source(cfg)
    if prefers_chat_template(chat_template, template):
        markers = [m for m in ("tools", "tool_call", "<think>", "</think>", *_SPLIT_THINK) if m in chat_template]
        lacks = sorted(set(chat_template_capabilities(chat_template)) - set(go_template_capabilities(template)))
        return (f"{gguf.name}'s own chat template, natively: it mentions {', '.join(map(repr, markers))}, so it "
                f"offers {' and '.join(lacks) or 'a tool round trip'}, which TEMPLATE ({source}) does not, and Ollama "
                "prefers it (server/images.go shouldPreferChatTemplate) unless the server sets "
                "OLLAMA_GO_TEMPLATE=true"), False
    other = f", or {gguf.name}'s own chat template if the server sets OLLAMA_GO_TEMPLATE=false" if chat_template else ""
    return f"TEMPLATE from {source} (Go template mode{other}; server/routes.go shouldUseGoTemplate)", True


def first_difference(got: str, want: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"at character {i}: Ollama {got[max(0, i - 30):i + 40]!r}, training {want[max(0, i - 30):i + 40]!r}"


def prove_prompt(cfg: Config, client: OllamaClient, gguf: Path) -> None:
    """Ollama renders for a fixed conversation exactly the prompt training's chat template renders
    (Ollama adds the model's SYSTEM as the first message when a chat has none)."""
    model_dir = chat_source_dir(cfg)
    if model_dir is None:
        raise OllamaError(f"{cfg.fused_dir}: no fused model to render training's prompt with; run `make fuse`")
    asked = RENDER_CONVERSATION
    system = [{"role": "system", "content": cfg.ollama.system}] if cfg.ollama.system else []
    got = client.rendered_prompt(cfg.ollama.model, asked)
    want = training_prompt(model_dir, system + asked)
    used, ours = template_in_use(cfg, gguf)
    if got != want:
        fix = ("make the chat format render what the model's chat template renders (ollama.family, or "
               "ollama.template with ollama.stop)") if ours else \
            ("set OLLAMA_GO_TEMPLATE=true on the server, or train with the template that the GGUF carries; if the "
             f"server already sets OLLAMA_GO_TEMPLATE=true, it renders TEMPLATE ({chat_format_source(cfg)}) instead, "
             "which must then render what the model's chat template renders (ollama.template with ollama.stop)")
        raise OllamaError(f"{cfg.ollama.model} was created, but Ollama renders another prompt than training saw, "
                          f"{first_difference(got, want)}. Ollama most likely uses {used}: {fix}")
    client.say(f"[ollama] Ollama renders the prompt training saw; it uses {used}")


def registered_stops(parameters: str) -> list[str]:
    """The stops in /api/show's `parameters` text: one `stop <Go %#v of the string>` line each
    (server/routes.go GetModelInfo)."""
    stops = []
    for line in parameters.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "stop":
            try:
                stops.append(json.loads(value.strip()))
            except ValueError:
                stops.append(value.strip().strip('"'))
    return stops


def prove_stops(cfg: Config, client: OllamaClient) -> None:
    """The server stored our TEMPLATE, every stop of the chat format and the model card (as the
    license, joined by server/routes.go GetModelInfo: one license, so the card as sent)."""
    template, stops = chat_format(cfg)
    shown = client.show(cfg.ollama.model)
    missing = [s for s in stops if s not in registered_stops(str(shown.get("parameters") or ""))]
    if missing:
        raise OllamaError(f"{cfg.ollama.model} was created, but {client.host} stored no stop {missing} "
                          f"(/api/show parameters: {str(shown.get('parameters'))[:200]!r})")
    if shown.get("template") != template:
        raise OllamaError(f"{cfg.ollama.model} was created, but {client.host} stored another TEMPLATE than sent "
                          f"({first_difference(str(shown.get('template')), template)})")
    card = model_card(cfg)
    if card is not None and shown.get("license") != card:
        raise OllamaError(f"{cfg.ollama.model} was created, but {client.host} shows another license than the model "
                          f"card sent (/api/show license: {str(shown.get('license'))[:120]!r})")


def prove_it_answers(cfg: Config, client: OllamaClient) -> dict:
    """One greedy Japanese chat turn, held to what ollama.proof promises.

    strict: non-empty, ended by a stop token within 512 tokens, no "<|". smoke: a SMOKE_TOKENS
    answer that Ollama finishes (a stop token or the length limit). Both: not aborted.
    """
    smoke = cfg.ollama.proof == "smoke"
    reply = client.chat(cfg.ollama.model, [{"role": "user", "content": PROOF_PROMPT}],
                        {"temperature": 0, "num_predict": SMOKE_TOKENS if smoke else 512})
    text = (reply.get("message") or {}).get("content", "")
    reason = reply.get("done_reason")
    problems = []
    if not reply.get("done"):
        problems.append("Ollama cut the answer off without a done line: it aborts a generation that repeats "
                        "one token more than 30 times (llm/llama_server.go), so the model is stuck in a loop "
                        "(check the training, the chat template and the stops)")
    elif smoke:
        if reason not in ("stop", "length"):
            problems.append(f"it ended by {reason!r}, neither a stop token nor the length limit")
    else:
        if not text.strip():
            problems.append("the answer is empty")
        if reason != "stop":
            problems.append(f"it ended by {reason!r}, not by a stop token (check the template and stops)")
        if "<|" in text:
            problems.append("the answer contains a raw special token '<|' (the stop tokens are not set right)")
    if problems:
        raise OllamaError(f"{cfg.ollama.model} was created but does not answer properly ({cfg.ollama.proof} proof, "
                          f"ollama.proof): {'; '.join(problems)}. Answer: {text[:200]!r}")
    return {"mode": cfg.ollama.proof, "prompt": PROOF_PROMPT, "answer": text, "done_reason": reason}


PROOF_SAYS = {
    "strict": "a greedy answer ended by a stop token",
    "smoke": f"a {SMOKE_TOKENS}-token greedy answer arrived (a smoke proof: the model is not held to stop)",
}


def connect(cfg: Config) -> tuple[OllamaClient, str]:
    """A client for OLLAMA_HOST whose server answers and is recent enough, and its version;
    OllamaError with how to get Ollama when none answers."""
    try:
        client = OllamaClient()
        return client, client.version()
    except NoServerError as e:
        raise OllamaError(how_to_get_ollama(str(e), cfg)) from None


def register(cfg: Config) -> Path:
    """Create the Ollama model through the REST API, prove it, write the stamp.

    The proof: Ollama renders training's prompt (prove_prompt), stored every stop (prove_stops),
    and answers as ollama.proof asks (prove_it_answers). Output: `<run>/ollama.json`: model,
    host, GGUF and Modelfile sha256, the server's manifest digest of the model (what `plan`
    compares with /api/tags later) and the proof. Raises OllamaError (with how to install or
    point at an Ollama) when none is reachable, when the server is too old, when creation fails
    or stays silent, or when a proof fails; no stamp is written then. A GGUF that fails
    validation is never uploaded.
    """
    gguf, digest = check_served_gguf(cfg)  # a broken file is named whether or not a server runs
    client, version = connect(cfg)
    modelfile = cfg.modelfile_path
    for p in (modelfile, gguf):
        if not p.is_file():
            raise OllamaError(f"{p}: missing; run `make gguf` and `make modelfile` first")
    client.say(f"[ollama] Ollama {version} at {client.host}")
    cfg.ollama_stamp.unlink(missing_ok=True)  # the model is about to change: no stamp until it is proven again
    create_with_api(cfg, client, gguf, digest)
    prove_prompt(cfg, client, gguf)
    prove_stops(cfg, client)
    proof = prove_it_answers(cfg, client)
    stamp = {
        "model": cfg.ollama.model,
        "host": client.host,
        "gguf": gguf.name,
        "gguf_sha256": digest,
        "modelfile_sha256": sha256_file(modelfile),
        "card_sha256": sha256_file(card_path(cfg)) if card_path(cfg).is_file() else None,
        "server_digest": client.digest(cfg.ollama.model),
        "proof": proof,
    }
    atomic_write_text(cfg.ollama_stamp, json.dumps(stamp, indent=1, ensure_ascii=False) + "\n")
    client.say(f"[ollama] registered {cfg.ollama.model}. Proof (ollama.proof: {proof['mode']}): Ollama renders "
               f"training's prompt, stores every stop, and {PROOF_SAYS[proof['mode']]}: {proof['answer'][:80]!r}")
    client.say(f"[ollama] try: make ollama-run PROMPT=\"...\" (or ollama run {cfg.ollama.model})")
    return cfg.ollama_stamp


def stamp_follows_server(cfg: Config) -> str:
    """Keep `ollama.json` only while the server still has the model it records.

    Asks the server at OLLAMA_HOST (/api/tags, a short timeout) for the model's manifest digest.
    When it lacks the model (`ollama rm`, another OLLAMA_HOST) or lists another digest (the model
    was created again elsewhere), the stamp is removed so that Make registers again. When no
    server answers, or OLLAMA_HOST names none, or something else answers, the stamp is kept.
    Returns the line saying what happened ("" with no stamp). Never raises for the server's sake.
    """
    try:
        stamp = json.loads(cfg.ollama_stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if not isinstance(stamp, dict):
        return ""
    model, recorded = stamp.get("model", cfg.ollama.model), stamp.get("server_digest")
    try:
        client = OllamaClient(timeout=3)
        found = client.digest(model)
    except OllamaError as e:
        return f"==> [ollama] cannot ask whether {model} is still registered ({e}); keeping {cfg.ollama_stamp.name}"
    if found is not None and found == recorded:
        return ""
    why = f"{client.host} has no model {model}" if found is None else \
        f"{client.host} lists {model} with digest {str(found)[:12]}, not the registered {str(recorded)[:12]}"
    cfg.ollama_stamp.unlink(missing_ok=True)
    return f"==> [ollama] {why}; removed {cfg.ollama_stamp.name}, it will be registered again"


def ask(cfg: Config, prompt: str) -> str:
    """One chat turn with the registered model (make ollama-run)."""
    reply = OllamaClient().chat(cfg.ollama.model, [{"role": "user", "content": prompt}], {})
    return (reply.get("message") or {}).get("content", "")
