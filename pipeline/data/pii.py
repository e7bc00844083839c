"""Personal and confidential information in training text: find it, mask it or drop the example.

Categories (each `data.pii.<category>: mask | drop | keep`):

- `url_credentials`: a URL carrying a user and password (`https://user:pw@host`);
- `email`: an e-mail address;
- `credit_card`: 13 to 19 digits (spaces or hyphens between) that pass the Luhn check;
- `my_number`: a Japanese Individual Number, 12 digits whose last is its check digit;
- `phone`: Japanese numbers (0 and 9 or 10 more digits: 03-1234-5678, 090-1234-5678,
  0120-123-456) and international ones (+81 3 1234 5678, +1 (415) 555-0132);
- `postal_code`: a Japanese postal code (〒100-0001, 100-0001);
- `ip_address`: an IPv4 or IPv6 address.

Categories are searched in that order, each in the text the earlier ones left, so
a card number is not also read as a phone number. A look-alike that fails its
check (a number failing Luhn, a date, a version string) is left alone.
Full-width forms, common in Japanese text (０３－１２３４－５６７８, ｔａｒｏ＠ｅｘａｍｐｌｅ．ｊｐ),
are found as their ASCII forms are: the patterns run on a copy of the text
where each full-width character is its ASCII twin, one character for one, so
the spans found are the original's.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

PII_CATEGORIES = ("url_credentials", "email", "credit_card", "my_number", "phone", "postal_code", "ip_address")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def my_number_ok(digits: str) -> bool:
    """The Individual Number's check digit: P_n weighted by Q_n (n from the right, check digit excluded)."""
    body, check = digits[:11], int(digits[11])
    total = sum(int(p) * (n + 1 if n <= 6 else n - 5) for n, p in enumerate(reversed(body), start=1))
    r = total % 11
    return check == (0 if r <= 1 else 11 - r)


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _ascii(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.ASCII)


def _ip_ok(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


# (pattern, check on the matched text): a match counts only when its check passes.
# A number is read whole: no digit (or digit group) may adjoin it. Patterns are ASCII
# (re.ASCII): \w is not a Japanese character, so 電話は03-1234-5678 is found.
_NO_DIGIT_BEFORE, _NO_DIGIT_AFTER = r"(?<![\d\w.+-])(?<!\d[ -])", r"(?![\d\w-]|[ -]\d)"
PATTERNS: dict[str, tuple[re.Pattern, Callable[[str], bool]]] = {
    "url_credentials": (_ascii(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]+:[^\s/@]+@[^\s/?#]+"), lambda s: True),
    "email": (_ascii(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
              lambda s: True),
    "credit_card": (_ascii(_NO_DIGIT_BEFORE + r"\d(?:[ -]?\d){12,18}" + _NO_DIGIT_AFTER),
                    lambda s: luhn_ok(_digits(s))),
    "my_number": (_ascii(_NO_DIGIT_BEFORE + r"\d{4}[ -]?\d{4}[ -]?\d{4}" + _NO_DIGIT_AFTER),
                  lambda s: my_number_ok(_digits(s))),
    "phone": (_ascii(
        # international: +CC then 6 to 14 more digits in groups
        r"(?<![\w+])\+\d{1,3}(?:[ -]?\(?\d{1,4}\)?){2,5}" + _NO_DIGIT_AFTER
        # Japanese: a leading 0, groups split by hyphens, spaces or brackets, 10 or 11 digits in all
        + r"|" + _NO_DIGIT_BEFORE + r"\(?0\d{1,4}\)?[ -]?\d{1,4}[ -]?\d{3,4}" + _NO_DIGIT_AFTER),
        lambda s: 10 <= len(_digits(s)) <= 11 if not s.startswith("+") else 8 <= len(_digits(s)) <= 15),
    "postal_code": (_ascii(r"(?:〒\s?)?" + _NO_DIGIT_BEFORE + r"\d{3}-\d{4}" + _NO_DIGIT_AFTER),
                    lambda s: True),
    "ip_address": (_ascii(r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})"
                              r"(?![\w.:])"), _ip_ok),
}
MASKS = {c: f"[{c.upper()}]" for c in PII_CATEGORIES}
# Full-width ASCII (U+FF01..U+FF5E), the ideographic space and the dashes Japanese text writes for
# hyphens, each to its one ASCII character: offsets in the copy are offsets in the original. Not the
# full-width colon: Japanese writes it after a label (接続元：203.0.113.7), where ":" would join the address.
TO_ASCII = {**{0xFF01 + i: 0x21 + i for i in range(0x5E) if 0xFF01 + i != 0xFF1A}, 0x3000: 0x20,
            **dict.fromkeys((0x2010, 0x2011, 0x2012, 0x2013, 0x2212), 0x2D)}


def mask(text: str, categories) -> tuple[str, dict[str, int]]:
    """`text` with every find of `categories` masked, searched in that order; and the count per category."""
    counts: dict[str, int] = {}
    for category in categories:
        pattern, check = PATTERNS[category]
        probe = text.translate(TO_ASCII)
        pieces, last = [], 0
        for m in pattern.finditer(probe):
            if check(m.group(0)):
                pieces += [text[last:m.start()], MASKS[category]]
                last = m.end()
                counts[category] = counts.get(category, 0) + 1
        text = "".join(pieces) + text[last:]
    return text, counts


def scan(text: str) -> tuple[str, dict[str, int]]:
    """Find every category in `text`: returns the text with each find masked and the count per category."""
    return mask(text, PII_CATEGORIES)


def apply_policy(record: dict, policy: dict[str, str]) -> tuple[dict | None, dict[str, int]]:
    """Apply `policy` (category -> mask | drop | keep) to a record.

    Returns the record (masked where the policy says mask; None when a category
    set to drop was found) and the count of finds per category.
    """
    found: dict[str, int] = {}

    def clean(text: str) -> str:
        masked, counts = scan(text)
        for c, n in counts.items():
            found[c] = found.get(c, 0) + n
        if not any(policy[c] == "keep" for c in counts):
            return masked
        # Some categories are kept: mask only the others.
        return mask(text, [c for c in PII_CATEGORIES if counts.get(c) and policy[c] == "mask"])[0]

    if "text" in record:
        out = {"text": clean(record["text"])}
    else:
        out = {"messages": [{"role": m["role"], "content": clean(m["content"])} for m in record["messages"]]}
    if any(policy[c] == "drop" for c in found):
        return None, found
    return out, found
