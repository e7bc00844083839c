"""Which proxy a Go program would use for a URL: the rules of Go's `http.ProxyFromEnvironment`.

Ollama's own client (api/client.go: `http.DefaultClient`, whose transport takes its proxy from
`http.ProxyFromEnvironment`) never sends a request for `localhost` or a loopback address through
a proxy, and honours NO_PROXY for other hosts. Python's urllib and httpx would send a request
for 127.0.0.1 through `http_proxy` unless no_proxy names it: behind a corporate proxy, the server
that `ollama list` reaches would look absent. So every HTTP client of this pipeline asks
`proxy_for` and passes its answer explicitly (httpx2 with trust_env=False).

The rules follow golang.org/x/net/http/httpproxy/proxy.go (as vendored in Go's net/http):
`FromEnvironment` (upper-case names first), `proxyForURL` (https uses HTTPS_PROXY, http uses
HTTP_PROXY; HTTP_PROXY is refused under CGI), `parseProxy` (a value without a scheme means
http://), `useProxy` (localhost and loopback never; then the NO_PROXY matchers) and `init` (how
NO_PROXY entries are read: "*", CIDRs, IPs with an optional port, domains where "foo.com"
matches itself and subdomains and ".foo.com" only subdomains).
"""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": "80", "https": "443", "socks5": "1080"}


def _env_any(env: Mapping[str, str], *names: str) -> str:
    """getEnvAny: the first of `names` that is set and non-empty."""
    return next((env[n] for n in names if env.get(n)), "")


def _parse_proxy(value: str) -> str | None:
    """parseProxy: a URL with scheme http, https or socks5 as given; anything else read as
    host[:port] of an http proxy. None when unset."""
    if not value:
        return None
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    return value if scheme in ("http", "https", "socks5") else "http://" + value


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """net.ParseIP, with an IPv4-mapped IPv6 address taken as its IPv4 address (Go's To4)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def split_host_port(hostport: str) -> tuple[str, str] | None:
    """Go's net.SplitHostPort: "h:p" or "[v6]:p"; None where Go returns an error."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or hostport[end + 1:end + 2] != ":" or "[" in hostport[1:end]:
            return None
        return hostport[1:end], hostport[end + 2:]
    if hostport.count(":") != 1:
        return None  # no port, or an IPv6 address without brackets
    host, port = hostport.split(":")
    return host, port


def _no_proxy_matches(no_proxy: str, host: str, port: str) -> bool:
    """config.init then the ip and domain matchers of useProxy: does NO_PROXY exempt host:port?"""
    ip = _ip(host)
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        try:  # IPv4/CIDR, IPv6/CIDR (net.ParseCIDR needs the slash)
            if "/" in entry:
                net = ipaddress.ip_network(entry, strict=False)
                if ip is not None and ip.version == net.version and ip in net:
                    return True
                continue
        except ValueError:
            pass
        split = split_host_port(entry)
        entry_host, entry_port = split if split else (entry, "")
        if split and not entry_host:
            continue  # no host part: malformed, ignored
        entry_ip = _ip(entry_host.strip("[]"))
        if entry_ip is not None:
            if ip is not None and ip == entry_ip and entry_port in ("", port):
                return True
            continue
        if entry_host.startswith("*."):
            entry_host = entry_host[1:]
        match_host = not entry_host.startswith(".")
        suffix = entry_host if not match_host else "." + entry_host
        if (host.endswith(suffix) or (match_host and host == suffix[1:])) and entry_port in ("", port):
            return True
    return False


def is_loopback(host: str) -> bool:
    """useProxy's exemption: "localhost" (case-sensitive in Go: "LOCALHOST" goes through the
    proxy) or a loopback address (brackets of an IPv6 host allowed)."""
    if host == "localhost":
        return True
    ip = _ip(host.strip("[]"))
    return ip is not None and ip.is_loopback


def proxy_for(url: str, env: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL Go would use for a request to `url`, or None for a direct connection."""
    env = os.environ if env is None else env
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https":
        proxy = _parse_proxy(_env_any(env, "HTTPS_PROXY", "https_proxy"))
    elif scheme == "http":
        proxy = _parse_proxy(_env_any(env, "HTTP_PROXY", "http_proxy"))
        if proxy and env.get("REQUEST_METHOD"):
            return None  # Go refuses HTTP_PROXY under CGI (golang.org/s/cgihttpproxy): no request through it
    else:
        return None
    if proxy is None:
        return None
    hostport = parts.netloc.rpartition("@")[2]
    host = hostport[1:hostport.find("]")] if hostport.startswith("[") else hostport.partition(":")[0]
    try:
        port = str(parts.port or _DEFAULT_PORTS.get(scheme, ""))
    except ValueError:
        port = ""
    if is_loopback(host):
        return None
    if _no_proxy_matches(_env_any(env, "NO_PROXY", "no_proxy"), host.strip().lower(), port):
        return None
    return proxy
