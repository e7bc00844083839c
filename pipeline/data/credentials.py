"""Credentials in training text: find them, then mask them or drop the example (`data.secrets`).

A model trained on a live key can write it out to anyone who asks. The data stage looks in
every turn for credentials by their format, never by entropy (an entropy guess fires on
Japanese text, hashes and ids alike):

- the formats Yelp's detect-secrets (pinned in requirements/base.txt) knows, from its own
  plugins' patterns: AWS access keys (and a 40-character secret key quoted near "aws ... key"),
  GitHub and GitLab tokens, Slack tokens and webhooks, OpenAI's older keys, JWTs (only those
  whose header and payload decode as JSON, the plugin's own check), Stripe, SendGrid, PyPI
  and Azure storage keys, and the header of a private key;
- and, where it has none: a whole PEM private key block (header to `-----END ... KEY-----`,
  or to the end of the text when cut off), OpenAI's current keys (`sk-proj-`, `sk-svcacct-`,
  `sk-admin-`, or `sk-` and 32 or more letters and digits), Google API keys (`AIza` + 35), and
  assignments `password=`, `token: ...`, `api_key = "..."` (also パスワード and トークン), whose
  value is 6 to 128 printable ASCII characters holding a digit, or 8 or more with upper and
  lower case letters (`token = get_token` is code, not a secret).

A find that is a placeholder is left alone: a run of 8 or more of one character
(`AKIAXXXXXXXXXXXXXXXX`, `********`), or a value that says what it is (`example`, `your`,
`dummy`, `sample`, `placeholder`, `redacted`, `changeme`, `<...>`, `${...}`). The policy:
`drop` (the default) drops the example, `mask` writes `[<KIND>]` in place of each find, `keep`
keeps them. `data/secrets_corpus.jsonl` holds positives and look-alikes (placeholders, hashes,
UUIDs, code); the report gives recall and false positives on it.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.stripe import StripeDetector


@dataclass(frozen=True)
class Detector:
    """A kind of credential: its patterns, each with the group that is the secret (0: the match),
    and a check the secret must pass."""
    kind: str
    patterns: tuple[tuple[re.Pattern, int | str], ...]
    check: Callable[[str], bool] = lambda s: True


def _whole(*patterns: re.Pattern) -> tuple[tuple[re.Pattern, int], ...]:
    return tuple((p, 0) for p in patterns)


_ASSIGNED = re.compile(
    r"(?i)(?<![A-Za-z0-9_])(?:password|passwd|pwd|passphrase|client[_-]?secret|secret[_-]?key|"
    r"(?:access|auth|api|bearer|refresh)?[_-]?token|api[_-]?key|パスワード|トークン)"
    r"\s*[=:：＝]\s*([\"'`]?)(?P<secret>[A-Za-z0-9!#$%&*+\-./?@^_|~=]{6,128})\1")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----")


def _strong_value(value: str) -> bool:
    return any(c.isdigit() for c in value) or (len(value) >= 8 and value != value.lower() and value != value.upper())


_AWS_ACCESS_KEY, _AWS_SECRET_KEY = AWSKeyDetector.denylist  # the second's group 1 is the secret key
DETECTORS = (
    Detector("private_key", _whole(*(re.compile(re.escape(p.pattern)) for p in PrivateKeyDetector.denylist))),
    Detector("aws_key", ((_AWS_ACCESS_KEY, 0), (_AWS_SECRET_KEY, 1))),
    Detector("github_token", _whole(*GitHubTokenDetector.denylist)),
    Detector("gitlab_token", _whole(*GitLabTokenDetector.denylist)),
    Detector("slack_token", _whole(*SlackDetector.denylist)),
    Detector("openai_key", _whole(*OpenAIDetector.denylist,
                                  re.compile(r"(?<![A-Za-z0-9_-])sk-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}"
                                             r"|[A-Za-z0-9]{32,})"))),
    Detector("google_api_key", _whole(re.compile(r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])"))),
    Detector("jwt", _whole(*JwtTokenDetector.denylist), JwtTokenDetector.is_formally_valid),
    Detector("other_key", _whole(*StripeDetector.denylist, *SendGridDetector.denylist, *PypiTokenDetector.denylist,
                                 *AzureStorageKeyDetector.denylist)),
    Detector("assignment", ((_ASSIGNED, "secret"),), _strong_value),
)
SECRET_KINDS = tuple(d.kind for d in DETECTORS)
MASKS = {k: f"[{k.upper()}]" for k in SECRET_KINDS}
_PLACEHOLDER = re.compile(r"(.)\1{7,}|example|your|dummy|sample|placeholder|redacted|changeme|<|\$\{", re.I)


@dataclass(frozen=True)
class Find:
    kind: str
    start: int
    end: int


def _private_key_block(text: str, start: int) -> tuple[int, int]:
    """From the header's dashes to the END line, or to the end of a cut-off block."""
    begin = text.rfind("-----", max(0, start - 12), start)
    end = _PEM_END.search(text, start)
    return (begin if begin >= 0 else start), (end.end() if end else len(text))


def find_secrets(text: str) -> list[Find]:
    """Every credential in `text`, in order, none overlapping (an earlier detector's find wins)."""
    finds: list[Find] = []
    for d in DETECTORS:
        for pattern, group in d.patterns:
            for m in pattern.finditer(text):
                start, end = m.span(group)
                if d.kind == "private_key":
                    start, end = _private_key_block(text, m.start())
                value = text[start:end]
                if not value or _PLACEHOLDER.search(value) or not d.check(value):
                    continue
                if any(f.start < end and start < f.end for f in finds):
                    continue
                finds.append(Find(d.kind, start, end))
    return sorted(finds, key=lambda f: f.start)


def mask_secrets(text: str, finds: list[Find]) -> str:
    pieces, last = [], 0
    for f in finds:
        pieces += [text[last:f.start], MASKS[f.kind]]
        last = f.end
    return "".join(pieces) + text[last:]


def apply_secrets_policy(record: dict, policy: str) -> tuple[dict | None, dict[str, int]]:
    """The record under `policy` (drop | mask | keep): None when dropped; and the finds per kind."""
    found: dict[str, int] = {}

    def clean(text: str) -> str:
        finds = find_secrets(text)
        for f in finds:
            found[f.kind] = found.get(f.kind, 0) + 1
        return mask_secrets(text, finds) if policy == "mask" else text

    if "text" in record:
        out = {"text": clean(record["text"])}
    else:
        out = {"messages": [{**m, "content": clean(m["content"])} for m in record["messages"]]}
    if found and policy == "drop":
        return None, found
    return out, found
