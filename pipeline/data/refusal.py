"""Refusal-only sources (`purpose: refusal` on a source): unsafe requests paired with refusals.

The original system's rule: such a corpus teaches safety judgement and refusal, never
generation. Only assistant replies are ever training targets (pipeline/data/tokenize.py masks
every other token), so the unsafe text in a refusal source's user turns is read, never learnt
to write. What remains is to prove that every reply it trains on is a refusal: an example
whose assistant replies are not all refusals is dropped and counted, and a record without
turns (plain text, where every token is a target) stops the stage.

A reply is a refusal when its opening (its first two sentences, split at 。！？.!?, and at most
160 characters) holds one of REFUSAL_MARKERS, refusing verbs in Japanese or English (an
apology alone is not one: "申し訳ありません。その依頼にはお応えできません。" refuses in its
second sentence), and no NOT_REFUSALS idiom ("I can't help but..."). Text is compared without
regard to case and after NFKC (full-width letters fold to ASCII). It is a documented,
conservative check: a reply that refuses only later, or in other words, is dropped, never
trained on.

With a guard configured (serve.guard), each reply is also judged by it, in the context of the
turns before it (`reply_verdict`): a refusal that goes on to comply is unsafe, and dropped.
With data.guard_replies, the replies of every other source are judged too.
"""
from __future__ import annotations

import re
import unicodedata

from ..errors import DataError
from ..guard import Guard, Verdict, guard_messages

# Refusing verbs, not apologies: "申し訳ありません、手順は次の通りです" apologises and complies.
REFUSAL_MARKERS = (
    "ことはできません", "ことができません", "お答えできません", "お手伝いできません", "ご協力できません",
    "お応えできません", "提供できません", "お教えできません", "お伝えできません", "ご案内できません", "対応できません",
    "できかねます", "しかねます", "お断りします", "お断りいたします", "控えさせていただきます",
    "応じられません", "応じかねます",
    "can't help", "cannot help", "can not help", "can't assist", "cannot assist", "can't provide",
    "cannot provide", "won't help", "will not help", "won't provide", "will not provide", "can't do that",
    "cannot do that", "must decline", "unable to help", "unable to assist", "unable to provide",
    "not able to help", "not able to provide",
)
# Idioms that hold a marker and comply: "I can't help but notice..."
NOT_REFUSALS = ("can't help but", "cannot help but", "can not help but")
OPENING_SENTENCES = 2
OPENING_CHARS = 160
_SENTENCE_END = re.compile(r"[。!?]|\.(?=\s|$)")


def opening(reply: str) -> str:
    """The reply's first OPENING_SENTENCES sentences, at most OPENING_CHARS characters, folded (NFKC, lower case)."""
    text = unicodedata.normalize("NFKC", reply).replace("\u2019", "'").lower().strip()[:OPENING_CHARS]
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[OPENING_SENTENCES - 1]] if len(ends) >= OPENING_SENTENCES else text


def is_refusal(reply: str) -> bool:
    """Whether the reply's opening refuses (see the module's doc)."""
    head = opening(reply)
    return any(m in head for m in REFUSAL_MARKERS) and not any(m in head for m in NOT_REFUSALS)


def refusal_problem(record: dict) -> str | None:
    """Why a refusal source's record may not be trained on (None when every reply refuses)."""
    replies = [m["content"] for m in record.get("messages", []) if m["role"] == "assistant"]
    if not replies:
        return "no assistant reply"
    if not all(is_refusal(r) for r in replies):
        return "a reply that is no refusal"
    return None


def reply_verdict(guard: Guard, record: dict, where: str) -> Verdict:
    """The guard's verdict on the record's assistant replies: the first unsafe one's, else safe.
    Raises DataError when the guard gives no verdict (down, or an answer that is none): the stage
    stops rather than train on what nobody judged."""
    messages = record.get("messages", [])
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        verdict = guard.classify_sync(guard_messages(messages[:i], m["content"]))
        if verdict.verdict in ("unavailable", "unparseable"):
            raise DataError(f"{where}: the guard ({guard.model!r} at {guard.backend_url}) gave no verdict: "
                            f"{verdict.why}. Start it, or check serve.guard.model and serve.guard.format")
        if verdict.verdict == "unsafe":
            return verdict
    return Verdict("safe")
