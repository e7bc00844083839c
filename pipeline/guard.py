"""The guard (serve.guard): a safety classifier behind any OpenAI-compatible chat API.

It detects and refuses; it never writes anything a user reads. `make serve` asks it about the
prompt before the main model sees it, and about the final answer before the client does
(pipeline/serve.py); `make data` asks it about the assistant replies of refusal-only sources,
and of every source with data.guard_replies (pipeline/data/prepare.py).

The conversation is sent as chat messages (system turns left out), ending with the turn to judge:
a user turn for a prompt, an assistant turn for an answer. The classifier's own chat template
turns them into its task prompt, as Ollama's library models do (`ollama run llama-guard3:1b`,
`shieldgemma`: their model pages show /api/chat with user and assistant turns) and a GGUF's
template does under llama-server. Its answer is read in the format named by serve.guard.format:

  llama-guard-3  "safe", or "unsafe" and a line of violated categories "S1,S10" (Meta's Llama
                 Guard 3 model card: categories S1-S14 of the MLCommons hazard taxonomy); a
                 first line "unsafe" is unsafe whatever follows, keeping the codes it knows
  shieldgemma    "Yes" (the text violates the policy) or "No" at the start (Google's ShieldGemma
                 model card: the output starts with the token Yes or No); no categories

Anything else is `unparseable`; no answer (not reachable, an HTTP error, past serve.guard.timeout,
no chat completion) is `unavailable`. With fail: closed (the default) both are treated as unsafe.
A verdict leaves only as its name and its category codes, never with the text judged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import httpx2

from .config import Config
from .goproxy import proxy_for
from .ollama import ollama_backend

FORMATS = ("llama-guard-3", "shieldgemma")
VERDICTS = ("safe", "unsafe", "unavailable", "unparseable")
# Meta's Llama Guard 3 hazard categories (model card, "Hazard Taxonomy and Policy").
LLAMA_GUARD_3_CATEGORIES = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation", "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy",
    "S8": "Intellectual Property", "S9": "Indiscriminate Weapons", "S10": "Hate",
    "S11": "Suicide & Self-Harm", "S12": "Sexual Content", "S13": "Elections", "S14": "Code Interpreter Abuse",
}
CONNECT_TIMEOUT = 5.0
# The classifier answers in a few tokens (Llama Guard 3: "unsafe", a newline and up to 14 codes).
MAX_TOKENS = 64
_YES_NO = re.compile(r"\s*(yes|no)\b", re.I)


@dataclass(frozen=True)
class Verdict:
    verdict: str  # one of VERDICTS
    categories: tuple[str, ...] = ()
    why: str = ""  # for unavailable and unparseable: what went wrong (never the guard's text)

    def blocks(self, fail: str) -> bool:
        """Whether the text judged may not pass: unsafe, or no usable verdict when failing closed."""
        return self.verdict == "unsafe" or (self.verdict != "safe" and fail == "closed")

    def record(self) -> dict:
        """What the audit log and the data report keep: the verdict and its category codes."""
        return {"verdict": self.verdict, "categories": list(self.categories)}


def parse_llama_guard_3(text: str) -> Verdict:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines == ["safe"]:
        return Verdict("safe")
    if lines and lines[0] == "unsafe":
        # Whatever follows, the classifier said unsafe: never let that pass, even failing open.
        codes = tuple(c.strip() for c in lines[1].split(",")) if len(lines) > 1 else ()
        return Verdict("unsafe", tuple(c for c in codes if c in LLAMA_GUARD_3_CATEGORIES))
    return Verdict("unparseable", why="not Llama Guard 3's safe / unsafe + categories")


def parse_shieldgemma(text: str) -> Verdict:
    m = _YES_NO.match(text)
    if m is None:
        return Verdict("unparseable", why="not ShieldGemma's Yes / No")
    return Verdict("unsafe" if m.group(1).lower() == "yes" else "safe")


PARSERS = {"llama-guard-3": parse_llama_guard_3, "shieldgemma": parse_shieldgemma}


def guard_messages(messages: list[dict], answer: str | None = None) -> list[dict]:
    """The turns the classifier judges: user and assistant turns, then the answer when one is judged."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] in ("user", "assistant")]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


class Guard:
    """One classifier: serve.guard's model at its backend (an OpenAI-compatible /v1 base)."""

    def __init__(self, backend_url: str, model: str, fmt: str, timeout: float, fail: str, refusal: str):
        self.backend_url, self.model, self.format = backend_url.rstrip("/"), model, fmt
        self.fail, self.refusal = fail, refusal
        self.url = self.backend_url + "/chat/completions"
        self.client_options = {"timeout": httpx2.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
                               "trust_env": False, "proxy": proxy_for(self.url)}

    def body(self, messages: list[dict]) -> dict:
        return {"model": self.model, "messages": messages, "stream": False, "temperature": 0,
                "max_tokens": MAX_TOKENS}

    def verdict(self, status: int, obj) -> Verdict:
        """The verdict of the backend's answer (HTTP status and decoded JSON body)."""
        if status != 200:
            return Verdict("unavailable", why=f"HTTP {status} from the guard at {self.backend_url}")
        try:
            content = obj["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            return Verdict("unavailable", why=f"the guard at {self.backend_url} sent no chat completion")
        return PARSERS[self.format](content)

    async def classify(self, messages: list[dict]) -> Verdict:
        try:
            async with httpx2.AsyncClient(**self.client_options) as client:
                reply = await client.post(self.url, json=self.body(messages))
            return self.verdict(reply.status_code, _json(reply))
        except httpx2.TransportError as err:
            return self._unreachable(err)

    def classify_sync(self, messages: list[dict]) -> Verdict:
        try:
            with httpx2.Client(**self.client_options) as client:
                reply = client.post(self.url, json=self.body(messages))
            return self.verdict(reply.status_code, _json(reply))
        except httpx2.TransportError as err:
            return self._unreachable(err)

    def _unreachable(self, err: Exception) -> Verdict:
        what = "did not answer in time" if isinstance(err, httpx2.TimeoutException) else "is not reachable"
        return Verdict("unavailable", why=f"the guard at {self.backend_url} {what} ({type(err).__name__})")


def _json(reply: httpx2.Response):
    try:
        return reply.json()
    except ValueError:
        return None


def guard_from_config(cfg: Config, main_backend: str | None = None) -> Guard | None:
    """serve.guard as a Guard (None without one). Its backend: serve.guard.backend, else the main
    model's (main_backend, else serve.backend, else Ollama's /v1 at OLLAMA_HOST)."""
    g = cfg.serve.guard
    if g is None:
        return None
    backend = g.backend or main_backend or cfg.serve.backend or ollama_backend()
    return Guard(backend, g.model, g.format, g.timeout, g.fail, g.refusal)
