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

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from .artifacts import atomic_write_text, sha256_file
from .config import Config
from .errors import OllamaError
from .ollama_rules import MIN_OLLAMA_VERSION, connect_url, display_shortest, parse_host, typed_option, version_tuple

MODELFILES = Path(__file__).resolve().parent.parent / "modelfiles"


def family_template(family: str) -> str:
    path = MODELFILES / f"{family}.Modelfile"
    if not path.is_file():
        known = sorted(p.stem for p in MODELFILES.glob("*.Modelfile"))
        raise OllamaError(f"ollama.family: no template {path.name} in modelfiles/ (known: {', '.join(known)})")
    return path.read_text(encoding="utf-8")


def family_spec(family: str) -> tuple[str, list[str]]:
    """The TEMPLATE text and the stop strings of a family's Modelfile fragment."""
    text = family_template(family)
    template = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M)
    if template is None:
        raise OllamaError(f"modelfiles/{family}.Modelfile: no TEMPLATE \"\"\"...\"\"\" block")
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return template.group(1), stops


def chat_format(cfg: Config) -> tuple[str, list[str]]:
    """TEMPLATE and stops: the config's own, else the family's (unknown family: error)."""
    if cfg.ollama.template is not None:
        return cfg.ollama.template, list(cfg.ollama.stop or [])
    return family_spec(cfg.ollama.family)


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
    from .llamacpp import validate_gguf

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


def render_modelfile(cfg: Config) -> str:
    """The Modelfile text: a readable record of exactly what register sends to /api/create
    (TEMPLATE, stops, parameters, SYSTEM); FROM is relative to the Modelfile's folder."""
    gguf = cfg.gguf_path(primary_quantization(cfg))
    template, _ = chat_format(cfg)
    params = create_parameters(cfg)
    source = "ollama.template" if cfg.ollama.template is not None else f"modelfiles/{cfg.ollama.family}.Modelfile"
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
    return "\n".join(lines) + "\n"


def write_modelfile(cfg: Config) -> Path:
    """Render and write `<run>/Modelfile` atomically; returns its path.

    The stops are checked against the model's own files (the fused model, or
    a local base): every special token its chat template writes and every
    end-of-sequence token of its generation config must be a stop, or the
    model rambles on in Ollama. Raises OllamaError naming the missing ones.
    """
    model_dir = next((d for d in (cfg.fused_dir, cfg.resolve(cfg.model.base))
                      if (d / "tokenizer_config.json").is_file()), None)
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
    """Nothing answers at OLLAMA_HOST (connection refused, unknown host, no answer to /api/version)."""


class OllamaTimeout(OllamaError):
    """A server answered before but did not finish a request within the client's timeout."""


class ModelNotFound(OllamaError):
    """The server does not have the model (HTTP 404 from chat or show, server/routes.go)."""


class OllamaClient:
    """The few endpoints of Ollama's REST API this pipeline uses.

    host: a URL as ollama_host gives it (default: OLLAMA_HOST); requests go to its connectable
    form (envconfig.ConnectableHost) with the host's path kept as a prefix, as api/client.go's
    JoinPath does. timeout: seconds a request may wait for the server's next bytes.
    """

    def __init__(self, host: str | None = None, timeout: float = 600):
        self.host = host or ollama_host()
        self.base = connect_url(self.host)
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None, data=None, headers=None,
              timeout: float | None = None, doing: str = "") -> tuple[int, dict]:
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(f"{self.base}{path}", data=data, method=method, headers=headers or {})
        timeout = timeout or self.timeout
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw.strip() else {})
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                detail = json.loads(raw).get("error", raw.decode(errors="replace"))
            except ValueError:
                detail = raw.decode(errors="replace")
            return e.code, {"error": detail}
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) and doing:
                raise OllamaTimeout(
                    f"Ollama at {self.host} did not finish {doing} within {timeout:.0f} s. It may still be "
                    "working (since v0.30 every create rewrites the GGUF with llama-quantize, "
                    "server/create.go; a first chat loads the model): watch the server's log or "
                    "`ollama ps`, then run `make ollama` again") from None
            raise NoServerError(f"no Ollama server answers at {self.host} ({reason})") from None

    def version(self) -> str:
        """The server's version (GET /api/version); OllamaError when it is older than the API used."""
        status, body = self._call("GET", "/api/version", timeout=3)
        if status != 200:
            raise NoServerError(f"{self.host}/api/version answered {status}: {body.get('error')} "
                                "(is OLLAMA_HOST an Ollama server?)")
        version = str(body.get("version", "?"))
        found = version_tuple(version)
        if found is not None and found < MIN_OLLAMA_VERSION:
            need = ".".join(map(str, MIN_OLLAMA_VERSION))
            raise OllamaError(f"Ollama {version} at {self.host} is too old: registration uses /api/create "
                              f"with blob files, which Ollama {need} introduced. Upgrade it "
                              "(https://ollama.com/download)")
        return version

    def has_blob(self, digest: str) -> bool:
        status, _ = self._call("HEAD", f"/api/blobs/{digest}")
        return status == 200

    def push_blob(self, path: Path, digest: str) -> None:
        with open(path, "rb") as f:
            status, body = self._call("POST", f"/api/blobs/{digest}", data=f, doing=f"receiving {path.name}",
                                      headers={"Content-Length": str(path.stat().st_size),
                                               "Content-Type": "application/octet-stream"})
        if status not in (200, 201):
            raise OllamaError(f"uploading {path.name} to {self.host} failed ({status}): {body.get('error')}")

    def create(self, model: str, files: dict[str, str], template: str, system: str, parameters: dict) -> None:
        status, body = self._call("POST", "/api/create", {
            "model": model, "files": files, "template": template, "system": system or None,
            "parameters": parameters, "stream": False}, doing=f"creating {model}")
        if status != 200 or body.get("status") != "success":
            raise OllamaError(f"creating {model} on {self.host} failed ({status}): {body.get('error', body)}")

    def chat(self, model: str, messages: list[dict], options: dict) -> dict:
        status, body = self._call("POST", "/api/chat", {
            "model": model, "messages": messages, "stream": False, "options": options},
            doing=f"loading {model} and answering")
        if status == 404:
            raise ModelNotFound(f"{self.host} has no model {model} ({body.get('error')}): it was removed "
                                "(`ollama rm`) or OLLAMA_HOST points at another server; `make ollama` "
                                "registers it again")
        if status != 200:
            raise OllamaError(f"chat with {model} on {self.host} failed ({status}): {body.get('error')}")
        return body

    def digest(self, model: str) -> str | None:
        """The manifest digest /api/tags lists for `model` (matched as Ollama matches names,
        case-insensitively on DisplayShortest), or None when the server does not have it."""
        status, body = self._call("GET", "/api/tags", timeout=5)
        if status != 200:
            raise OllamaError(f"{self.host}/api/tags answered {status}: {body.get('error')}")
        want = display_shortest(model).lower()
        return next((m.get("digest") for m in body.get("models") or []
                     if str(m.get("name", "")).lower() == want), None)


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


def create_with_api(cfg: Config, client: OllamaClient, gguf: Path, sha256: str | None = None) -> None:
    """Upload the GGUF as a blob (unless the server has it) and create the model with the
    config's chat format (custom or family), system prompt and parameters; sha256: the GGUF's,
    when the caller has already computed it."""
    digest = "sha256:" + sha256 if sha256 else sha256_digest(gguf)
    if client.has_blob(digest):
        print(f"[ollama] {client.host} already has {gguf.name} ({digest[:19]}...)")
    else:
        print(f"[ollama] uploading {gguf.name} to {client.host}")
        client.push_blob(gguf, digest)
    template, _ = chat_format(cfg)
    client.create(cfg.ollama.model, {gguf.name: digest}, template, cfg.ollama.system, create_parameters(cfg))


PROOF_PROMPT = "こんにちは。自己紹介を一文でしてください。"


def prove_it_answers(cfg: Config, client: OllamaClient) -> str:
    """One greedy Japanese chat turn: non-empty, ended by a stop token, no "<|"."""
    reply = client.chat(cfg.ollama.model, [{"role": "user", "content": PROOF_PROMPT}],
                        {"temperature": 0, "num_predict": 512})
    text = (reply.get("message") or {}).get("content", "")
    reason = reply.get("done_reason")
    problems = []
    if not text.strip():
        problems.append("the answer is empty")
    if not reply.get("done") and not reason:
        problems.append("Ollama cut the answer off without a done_reason: it aborts a generation that repeats "
                        "one token more than 30 times (llm/llama_server.go), so the model is stuck in a loop "
                        "(check the training, the chat template and the stops)")
    elif reason != "stop":
        problems.append(f"it ended by {reason!r}, not by a stop token (check the template and stops)")
    if "<|" in text:
        problems.append("the answer contains a raw special token '<|' (the stop tokens are not set right)")
    if problems:
        raise OllamaError(f"{cfg.ollama.model} was created but does not answer properly: {'; '.join(problems)}. "
                          f"Answer: {text[:200]!r}")
    return text


def register(cfg: Config) -> Path:
    """Create the Ollama model through the REST API, prove it answers and stops, write the stamp.

    Output: `<run>/ollama.json`: model, host, GGUF and Modelfile sha256, the server's manifest
    digest of the model (what `plan` compares with /api/tags later) and the proof. Raises
    OllamaError (with how to install or point at an Ollama) when none is reachable, when the
    server is too old, when creation fails or times out, or when the model does not answer
    properly; no stamp is written then. A GGUF that fails validation is never uploaded.
    """
    gguf, digest = check_served_gguf(cfg)  # a broken file is named whether or not a server runs
    client = OllamaClient()
    try:
        version = client.version()  # too old: OllamaError saying so
    except NoServerError as e:
        raise OllamaError(how_to_get_ollama(str(e), cfg)) from None
    modelfile = cfg.modelfile_path
    for p in (modelfile, gguf):
        if not p.is_file():
            raise OllamaError(f"{p}: missing; run `make gguf` and `make modelfile` first")
    print(f"[ollama] Ollama {version} at {client.host}")
    create_with_api(cfg, client, gguf, digest)
    answer = prove_it_answers(cfg, client)
    stamp = {
        "model": cfg.ollama.model,
        "host": client.host,
        "gguf": gguf.name,
        "gguf_sha256": digest,
        "modelfile_sha256": sha256_file(modelfile),
        "server_digest": client.digest(cfg.ollama.model),
        "proof": {"prompt": PROOF_PROMPT, "answer": answer},
    }
    atomic_write_text(cfg.ollama_stamp, json.dumps(stamp, indent=1, ensure_ascii=False) + "\n")
    print(f"[ollama] registered {cfg.ollama.model}; it answered: {answer[:80]!r}")
    print(f"[ollama] try: make ollama-run PROMPT=\"...\" (or ollama run {cfg.ollama.model})")
    return cfg.ollama_stamp


def stamp_follows_server(cfg: Config) -> str:
    """Keep `ollama.json` only while the server still has the model it records.

    Asks the server at OLLAMA_HOST (/api/tags, a short timeout) for the model's manifest digest.
    When it lacks the model (`ollama rm`, another OLLAMA_HOST) or lists another digest (the model
    was created again elsewhere), the stamp is removed so that Make registers again. When no
    server answers, the stamp is kept. Returns the line saying what happened ("" with no stamp).
    Never raises for the server's sake.
    """
    try:
        stamp = json.loads(cfg.ollama_stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    model, recorded = stamp.get("model", cfg.ollama.model), stamp.get("server_digest")
    client = OllamaClient(timeout=3)
    try:
        found = client.digest(model)
    except OllamaError as e:
        return f"==> [ollama] cannot ask whether {model} is still registered ({e}); keeping {cfg.ollama_stamp.name}"
    if found is not None and found == recorded:
        return ""
    why = f"{client.host} has no model {model}" if found is None else \
        f"{client.host} lists {model} with digest {found[:12]}, not the registered {str(recorded)[:12]}"
    cfg.ollama_stamp.unlink(missing_ok=True)
    return f"==> [ollama] {why}; removed {cfg.ollama_stamp.name}, it will be registered again"


def ask(cfg: Config, prompt: str) -> str:
    """One chat turn with the registered model (make ollama-run)."""
    reply = OllamaClient().chat(cfg.ollama.model, [{"role": "user", "content": prompt}], {})
    return (reply.get("message") or {}).get("content", "")
