"""Ollama's own rules, as its source (v0.33) states them: standard library only (and Go's
net.SplitHostPort from pipeline.goproxy).

The config check, the registration client and the plan all need the same rules, and they
must be Ollama's, not ours, or a config passes here and fails on the server:

- `parse_host` follows `envconfig.Host` (envconfig/config.go), `connect_url` its
  `ConnectableHost`;
- `name_problem` follows `ParseName` / `IsValid` (types/model/name.go) and the `:cloud` /
  `:local` source suffixes (internal/modelref/modelref.go), `display_shortest` the name
  `/api/tags` lists;
- `OPTIONS` is the table `Options.FromMap` (api/types.go) converts parameters with.
"""
from __future__ import annotations

import ipaddress
import math
from urllib.parse import urlsplit

from .goproxy import split_host_port

OLLAMA_DEFAULT_PORT = "11434"
# Registration creates with `files` (blob digests), which replaced the `modelfile` body in
# v0.5.5 (ollama commit 86a622c), and proves the prompt with /api/chat's `_debug_render_only`,
# which v0.11.5 introduced (ollama commit 8de1da4, api/types.go ChatRequest.DebugRenderOnly).
MIN_OLLAMA_VERSION = (0, 11, 5)


def _join_host_port(host: str, port: str) -> str:
    """Go's net.JoinHostPort: brackets around a host that holds a colon."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _go_parse_int(port: str) -> int | None:
    """strconv.ParseInt(port, 10, 32): an optional sign and decimal digits only."""
    digits = port[1:] if port[:1] in "+-" else port
    return int(port) if digits.isdigit() and digits.isascii() else None


def parse_host(value: str) -> str:
    """The server URL Ollama's own client uses for an OLLAMA_HOST value (envconfig.Host).

    Input: the raw variable ("" when unset). Output: the URL as Go's url.URL.String() writes
    it, e.g. "http://127.0.0.1:11434", "https://example.com:443/ollama", "http://[::1]:11434".
    With no scheme the default is http on 11434 (and ollama.com means https on 443); an explicit
    http:// or https:// without a port means 80 or 443. A path is kept. An invalid port falls
    back to the default, as Ollama does (it only logs a warning). Never raises.
    """
    s = value.strip().strip("\"'").strip()  # envconfig.Var: TrimSpace, then Trim quotes
    default_port = OLLAMA_DEFAULT_PORT
    scheme, sep, hostport = s.partition("://")
    if not sep:
        scheme, hostport = "http", s
        if s == "ollama.com":
            scheme, hostport = "https", "ollama.com:443"
    elif scheme == "http":
        default_port = "80"
    elif scheme == "https":
        default_port = "443"
    hostport, _, path = hostport.partition("/")
    split = split_host_port(hostport)
    if split is None:
        host, port = "127.0.0.1", default_port
        try:
            host = str(ipaddress.ip_address(hostport.strip("[]")))
        except ValueError:
            if hostport:
                host = hostport
    else:
        host, port = split
    number = _go_parse_int(port)
    if number is None or not 0 <= number <= 65535:
        port = default_port
    return f"{scheme}://{_join_host_port(host, port)}" + (f"/{path}" if path else "")


def connect_url(url: str) -> str:
    """Where a client connects for a parse_host URL: envconfig.ConnectableHost replaces the
    unspecified addresses 0.0.0.0 and :: by the loopback address, and an empty host (":1234")
    is the local system, as Go's net.Dial takes it. No trailing slash.

    Raises ValueError saying why for a URL no client can connect to: parse_host keeps what
    OLLAMA_HOST says, and Go's own client then fails the same way (url.Parse in
    http.NewRequest: "invalid port", a bracketed host that is no IPv6 address).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname or ""
    except ValueError as e:
        raise ValueError(f"{url} is no address a client can connect to ({e})") from None
    try:
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            host = "127.0.0.1" if ip.version == 4 else "::1"
    except ValueError:
        if not host:
            host = "127.0.0.1"
    if any(c.isspace() for c in host):
        raise ValueError(f"{url} is no address a client can connect to (a space in the host)")
    netloc = _join_host_port(host, str(port))
    return f"{parts.scheme}://{netloc}{parts.path}".rstrip("/")


# -- model names (types/model/name.go) ----------------------------------------------------------
_NAME_DEFAULTS = {"host": "registry.ollama.ai", "namespace": "library", "tag": "latest"}
_MISSING = "!MISSING!"


def _cut_promised(s: str, sep: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i] or _MISSING, s[i + len(sep):] or _MISSING, True


def parse_name_bare(s: str) -> dict[str, str]:
    """ParseNameBare: host/namespace/model:tag, each part "" where the name has none."""
    n = {"host": "", "namespace": "", "model": "", "tag": ""}
    if s.rfind(":") > s.rfind("/"):
        s, n["tag"], _ = _cut_promised(s, ":")
    s, n["model"], promised = _cut_promised(s, "/")
    if not promised:
        n["model"] = s
        return n
    s, n["namespace"], promised = _cut_promised(s, "/")
    if not promised:
        n["namespace"] = s
        return n
    scheme, sep, host = s.partition("://")
    n["host"] = host if sep else scheme
    return n


def parse_name(s: str) -> dict[str, str]:
    """ParseName: the bare parts merged with the defaults (registry.ollama.ai/library/…:latest)."""
    return {k: v or _NAME_DEFAULTS.get(k, "") for k, v in parse_name_bare(s).items()}


def _valid_part(kind: str, s: str) -> bool:
    """isValidPart: 1-80 bytes (a host 350), starting alphanumeric or "_", then also "-" "_",
    "." (not in a namespace) and ":" (only in a host)."""
    limit = 350 if kind == "host" else 80
    data = s.encode()
    if not 1 <= len(data) <= limit:
        return False
    for i, c in enumerate(data):
        ok = chr(c).isascii() and (chr(c).isalnum() or c == ord("_"))
        if i == 0:
            if not ok:
                return False
        elif not (ok or chr(c) == "-" or (chr(c) == "." and kind != "namespace")
                  or (chr(c) == ":" and kind == "host")):
            return False
    return True


def name_is_valid(parts: dict[str, str]) -> bool:
    """Name.IsValid (IsFullyQualified): every part valid."""
    return all(_valid_part(k, parts[k]) for k in ("host", "namespace", "model", "tag"))


def name_problem(name: str) -> str | None:
    """Why Ollama would refuse `name` for /api/create or route it elsewhere; None when fine.

    ParseName then IsValid (types/model/name.go), as CreateHandler checks it (server/create.go);
    and a ":cloud" / ":local" suffix or a tag ending in "-cloud" (internal/modelref/modelref.go),
    which chat and show take as a request for a cloud model rather than the local one.
    """
    if not name_is_valid(parse_name(name)):
        return ("not a name Ollama accepts (types/model/name.go: [host/][namespace/]model[:tag], "
                "each part 1-80 characters of letters, digits, '_', '-' and '.', starting with a "
                "letter, digit or '_'; no '.' in a namespace)")
    i = name.rfind(":")
    suffix = name[i + 1:].strip().lower() if i >= 0 else ""
    if suffix in ("cloud", "local") or (suffix.endswith("-cloud") and "/" not in suffix):
        return (f"the suffix {name[i:]!r} makes Ollama treat it as a cloud/local model reference "
                "(internal/modelref/modelref.go), not as the name of this model")
    return None


def display_shortest(name: str) -> str:
    """Name.DisplayShortest: how /api/tags lists the model, e.g. "agiasi-borea:latest"."""
    n = parse_name(name)
    if n["host"].lower() != _NAME_DEFAULTS["host"]:
        prefix = f"{n['host']}/{n['namespace']}/"
    elif n["namespace"].lower() != _NAME_DEFAULTS["namespace"]:
        prefix = f"{n['namespace']}/"
    else:
        prefix = ""
    return f"{prefix}{n['model']}:{n['tag']}"


# -- parameters (api/types.go: Options, Runner, FromMap) -----------------------------------------
# name -> (Go kind, lowest value allowed here or None). FromMap takes JSON numbers for int and
# float32 fields, bools for bool and *bool fields, and a list of strings for stop; it rejects
# anything else for that key ("option %q must be of type integer") on every chat, and drops an
# unknown key with only a log line. The ranges are what the runner can use (a context of at
# least one token, no negative temperature); -1 means "default/infinite" where Ollama says so.
OPTIONS: dict[str, tuple[str, float | None]] = {
    "num_ctx": ("int", 1), "num_batch": ("int", 1), "num_gpu": ("int", -1), "main_gpu": ("int", 0),
    "use_mmap": ("bool", None), "num_thread": ("int", 0), "draft_num_predict": ("int", 0),
    "num_keep": ("int", -1), "seed": ("int", -1), "num_predict": ("int", -2), "top_k": ("int", 0),
    "top_p": ("float", 0), "min_p": ("float", 0), "typical_p": ("float", 0), "repeat_last_n": ("int", -1),
    "temperature": ("float", 0), "repeat_penalty": ("float", 0), "presence_penalty": ("float", None),
    "frequency_penalty": ("float", None), "stop": ("list", None),
}
_UPPER = {"top_p": 1.0, "min_p": 1.0, "typical_p": 1.0}


def option_problem(key: str, value: object) -> str | None:
    """Why Ollama would refuse or ignore `value` for parameter `key`; None when it is fine."""
    if key not in OPTIONS:
        return f"unknown parameter; Ollama knows: {', '.join(sorted(OPTIONS))} (api/types.go Options)"
    kind, low = OPTIONS[key]
    if kind == "bool":
        return None if isinstance(value, bool) else "must be true or false (api/types.go: bool)"
    if kind == "list":
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        return None if ok else "must be a list of non-empty strings"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be {'an integer' if kind == 'int' else 'a number'}, not {type(value).__name__} {value!r}"
    if kind == "int" and not isinstance(value, int):
        return f"must be an integer (Ollama would truncate {value!r}; api/types.go: int)"
    if not math.isfinite(value):
        return "must be a finite number"
    if low is not None and value < low:
        return f"must be >= {low:g}"
    if key in _UPPER and value > _UPPER[key]:
        return f"must be <= {_UPPER[key]:g}"
    return None


def typed_option(key: str, value: object) -> object:
    """The value as JSON should carry it for FromMap: a float for a float32 field (1 -> 1.0)."""
    return float(value) if OPTIONS[key][0] == "float" else value


def version_tuple(version: str) -> tuple[int, ...] | None:
    """"0.33.0-rc2" -> (0, 33, 0); None for what is no release version (a dev build says 0.0.0)."""
    core = version.split("-", 1)[0].split("+", 1)[0]
    parts = core.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    numbers = tuple(int(p) for p in parts)
    return None if numbers == (0, 0, 0) else numbers
