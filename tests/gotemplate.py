"""A test oracle: the subset of Go's text/template that Ollama chat templates use.

Enough to render modelfiles/*.Modelfile TEMPLATEs the way Ollama would
(text, {{- -}} trimming, range with $i/$_ , if/else, variable assignment,
fields such as .Role and $.Messages, and the functions eq, ne, and, or,
not, len, slice), so tests can compare them with the tokenizer's own chat
template. Not used by the pipeline.
"""
from __future__ import annotations

import re
import shlex

_ACTION = re.compile(r"{{(-\s)?(.*?)(\s-)?}}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip())
    out.append(("text", template[pos:]))
    return out


def _parse(tokens, i=0, stop=("end",)):
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        head = value.split(None, 1)[0] if value else ""
        if head in stop:
            return nodes, i
        if head in ("range", "if"):
            body, i = _parse(tokens, i + 1, stop=("end", "else"))
            other = []
            if tokens[i][1] == "else":
                other, i = _parse(tokens, i + 1, stop=("end",))
            nodes.append((head, value[len(head):].strip(), body, other))
            i += 1
            continue
        nodes.append(("action", value))
        i += 1
    return nodes, i


def _truthy(v) -> bool:
    return bool(v) if not isinstance(v, (int, float)) or isinstance(v, bool) else v != 0


def _split_args(expr: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in expr:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == " " and depth == 0:
            if cur:
                parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def _value(term: str, dot, env: dict):
    if term.startswith("("):
        return _eval(term[1:-1], dot, env)
    if term.startswith('"'):
        return shlex.split(term)[0]
    if term.lstrip("-").isdigit():
        return int(term)
    if term.startswith("$"):
        name, _, path = term.partition(".")
        base = env["$"] if name == "$" else env[name]
        return _fields(base, path)
    if term.startswith("."):
        return _fields(dot, term[1:])
    raise ValueError(f"unsupported term {term!r}")


def _fields(obj, path: str):
    for name in filter(None, path.split(".")):
        obj = obj[name] if isinstance(obj, dict) else getattr(obj, name)
    return obj


_FUNCS = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "len": len, "not": lambda a: not _truthy(a),
    "slice": lambda seq, i, j=None: seq[i:j], "and": None, "or": None,
}


def _eval(expr: str, dot, env: dict):
    args = _split_args(expr.strip())
    if args[0] in _FUNCS:
        vals = [_value(a, dot, env) for a in args[1:]]
        if args[0] == "and":
            return next((v for v in vals if not _truthy(v)), vals[-1])
        if args[0] == "or":
            return next((v for v in vals if _truthy(v)), vals[-1])
        return _FUNCS[args[0]](*vals)
    return _value(args[0], dot, env)


def _render(nodes, dot, env, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            m = re.match(r"(\$\w+)\s*:?=\s*(.*)", node[1], re.S)
            if m:
                env[m.group(1)] = _eval(m.group(2), dot, env)
            else:
                value = _eval(node[1], dot, env)
                out.append("" if value is None else str(value))
        elif node[0] == "if":
            _render(node[2] if _truthy(_eval(node[1], dot, env)) else node[3], dot, env, out)
        elif node[0] == "range":
            m = re.match(r"(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.*)", node[1])
            items = _eval(m.group(3) if m else node[1], dot, env)
            if not items:
                _render(node[3], dot, env, out)
            for i, item in enumerate(items or []):
                inner = dict(env)
                if m:
                    inner[m.group(1)], inner[m.group(2)] = i, item
                _render(node[2], item, inner, out)


def render(template: str, data: dict) -> str:
    """Render `template` with `data` as the dot (e.g. {"Messages": [...]})."""
    nodes, _ = _parse(_tokens(template))
    out: list[str] = []
    _render(nodes, data, {"$": data}, out)
    return "".join(out)
