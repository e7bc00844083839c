"""The thinking filter: of a model's reply, only the text inside `<final>...</final>` goes out.

The model thinks in sections, `<think-NAME>...</think-NAME>` (NAME of letters, digits, `-`,
`_`) and plain `<think>...</think>`, and answers in `<final>...</final>`. `ThinkingFilter` is
a streaming state machine: `feed(chunk)` returns the final text that may be shown now,
whatever the chunking; `feed_field(name, text)` takes thinking a backend returns in a field
of its own; `finish()` says whether the reply had a well-formed final, and hands over every
thinking section by name (for the audit log, which keeps only their hashes). `filter_reply`
does the same for a whole reply. Pure: no I/O.

The safe default: anything not provably inside a well-formed top-level final is withheld.
The rules, case by case (each has an example test in tests/test_thinking.py):

1. Tags. A tag is `<`, up to 8 whitespace characters, `/` for a closing tag, up to 8
   whitespace characters, the tag's name, up to 8 whitespace characters, `>`. Names are
   `think`, `think-NAME` (NAME 1 to 64 of `A-Z a-z 0-9 - _`) and `final`, matched without
   regard to case: `< THINK-a >`, `</Final >` and `<\\nfinal\\n>` are tags. Anything else
   that starts with `<` is text (`a < b`, `<b>`, `<|end|>`), and so is `＜final＞`
   (full-width brackets).
2. Tags split across chunks: a `<` that may still become a tag is held back until it is
   one or cannot be one. Chunking never changes what is emitted.
3. Text outside every tag is withheld: it is not the answer, and it may be thinking a
   model did not mark up (a stray `</think>` at the top is withheld the same way).
4. A thinking section runs from its opening tag to the closing tag of the same name (case
   does not matter): `<think-a>` ends at `</think-a>`, not at `</think>` or `</think-b>`.
   Everything between is thinking, tags included: a `<final>` inside a thinking section is
   thinking, never an answer.
5. Nested thinking sections: a thinking tag opened inside a section must be closed inside
   it; the outer section ends only at its own closing tag after the inner ones closed. The
   section's text (inner tags included) is recorded under the outer name.
6. An unclosed thinking section runs to the end of the reply: everything after its
   opening tag is thinking, a final behind it included, so such a reply has no final.
7. The answer is the first top-level `<final>...</final>`, with surrounding whitespace
   stripped.
8. A thinking section inside the final is cut out of the answer (and recorded as thinking);
   the answer goes on after its closing tag. Left unclosed, it makes the final unclosed.
9. Several finals: only the first is the answer; later top-level finals are withheld
   (thinking sections inside them are still recorded).
10. Inside the answer, a markup error stops the answer: a `<final>` inside the final, a
    closing tag other than `</final>` (a stray `</think>`), or something that starts like a
    tag of ours and is none (`<thinking>`, `<think a>`, `<final/>`, `<think->`). The reply
    then has no well-formed final. A stream has by then sent the answer's text that came
    before the error, never text after it.
11. An unclosed final (the reply ends inside it) is no well-formed final.
12. Thinking the backend returns in a field of its own (`reasoning_content`, `reasoning`,
    `thinking`) is thinking, whatever it contains, recorded under the field's name. Tags in
    it mean nothing.
13. Section names: `think`, `think-NAME` in ASCII lower case, or the field's name; a name
    that comes again gets `#2`, `#3`.
14. Problems are told in fixed words: no message ever quotes the reply.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import regex

# Fields in which OpenAI-compatible backends return thinking apart from the content:
# llama-server and DeepSeek `reasoning_content`; Ollama's /v1 `reasoning` (openai/openai.go: Message and
# Delta carry `Reasoning string json:"reasoning"`, filled from the model's thinking); Ollama's /api `thinking`.
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")

_WS = r"\s{0,8}"
_TAG = regex.compile(rf"<{_WS}(?P<close>/?){_WS}(?:(?P<think>think(?:-(?P<name>[A-Za-z0-9_-]{{1,64}}))?)|final){_WS}>",
                     regex.IGNORECASE)
# The only non-ASCII letters that IGNORECASE matches to ASCII ones: names are kept in ASCII.
_ASCII_TWINS = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})
# What starts like one of our tags (rule 10): only inside the answer does it matter.
_LOOKS_LIKE_TAG = regex.compile(r"<\s{0,64}/?\s{0,64}(?:think|final)", regex.IGNORECASE)

# Why a reply has no answer: a code (the audit log's outcome) and fixed words (rule 14).
NO_FINAL = "no_final"
UNCLOSED_FINAL = "unclosed_final"
UNCLOSED_THINK_IN_FINAL = "unclosed_think_in_final"
FINAL_IN_FINAL = "final_in_final"
STRAY_CLOSE_IN_FINAL = "stray_close_in_final"
MALFORMED_IN_FINAL = "malformed_tag_in_final"
PROBLEMS = {
    NO_FINAL: "the reply has no <final> section",
    UNCLOSED_FINAL: "the reply's <final> section is not closed",
    UNCLOSED_THINK_IN_FINAL: "a thinking section inside the reply's <final> section is not closed",
    FINAL_IN_FINAL: "the reply's <final> section holds another <final>",
    STRAY_CLOSE_IN_FINAL: "the reply's <final> section holds a closing tag that closes nothing",
    MALFORMED_IN_FINAL: "the reply's <final> section holds a malformed think/final tag",
}


@dataclass(frozen=True)
class FilterResult:
    """final: the answer (None when the reply has no well-formed final); outcome: "ok" or the
    code of the problem (a key of PROBLEMS); sections: thinking section name -> its text, in
    the order they came."""
    final: str | None
    outcome: str
    sections: dict[str, str] = field(default_factory=dict)

    @property
    def problem(self) -> str | None:
        """Why there is no answer, in fixed words (None when there is one)."""
        return PROBLEMS.get(self.outcome)


@dataclass
class _Section:
    name: str
    stack: list[str]  # names of the open thinking tags, outermost first
    parts: list[str] = field(default_factory=list)


class ThinkingFilter:
    """Feed a reply's content in chunks; get back only what lies inside its first top-level final.

    feed(chunk) -> the answer text that can be shown now ("" while nothing can);
    feed_field(name, text) -> None, for thinking in a separate field; finish() -> FilterResult,
    once, after the last chunk. The concatenation of what feed returned is the start of the
    final answer (the whole of it when finish() reports one); it never holds thinking text.
    """

    def __init__(self) -> None:
        self._buf = ""  # unparsed text: starts at a "<" that may still become a tag
        self._mode = "outside"  # outside | final | after (first final closed) | extra (a later final)
        self._section: _Section | None = None
        self._sections: dict[str, list[str]] = {}
        self._answer: list[str] = []  # emitted answer text
        self._pending_ws = ""  # trailing whitespace of the answer, sent only when text follows
        self._problem: str | None = None
        self._finished = False

    # -- input --------------------------------------------------------------------------------

    def feed(self, chunk: str) -> str:
        """Parse one more chunk of the reply's content; returns the answer text it releases."""
        if self._finished:
            raise RuntimeError("ThinkingFilter.feed after finish")
        self._buf += chunk
        return self._parse(at_end=False)

    def feed_field(self, name: str, text: str) -> None:
        """Thinking returned in a field of its own (rule 12): recorded, never shown."""
        if text:
            self._sections.setdefault(name, []).append(text)

    def finish(self) -> FilterResult:
        """End of the reply: the verdict and every thinking section (rules 6, 11)."""
        if not self._finished:
            self._parse(at_end=True)
            self._finished = True
            if self._section is not None:  # rule 6: an unclosed section runs to the end
                if self._mode == "final":
                    self._fail(UNCLOSED_THINK_IN_FINAL)
                self._close_section()
            if self._problem is None and self._mode == "final":
                self._fail(UNCLOSED_FINAL)
            if self._problem is None and self._mode == "outside":
                self._fail(NO_FINAL)
        sections = {name: "".join(parts) for name, parts in self._sections.items()}
        if self._problem is not None:
            return FilterResult(None, self._problem, sections)
        return FilterResult("".join(self._answer), "ok", sections)

    # -- the state machine ----------------------------------------------------------------------

    def _parse(self, at_end: bool) -> str:
        out: list[str] = []
        while self._buf:
            lt = self._buf.find("<")
            if lt != 0:
                text, self._buf = (self._buf, "") if lt < 0 else (self._buf[:lt], self._buf[lt:])
                self._text(text, out)
                continue
            tag = _TAG.match(self._buf, partial=not at_end)
            if tag is not None and tag.partial:
                break  # rule 2: wait for the rest of a possible tag
            if tag is not None:
                self._buf = self._buf[tag.end():]
                self._tag(tag.group(0), closing=bool(tag["close"]), name=_tag_name(tag), out=out)
                continue
            if self._in_answer():
                looks = _LOOKS_LIKE_TAG.match(self._buf, partial=not at_end)
                if looks is not None and looks.partial:
                    break
                if looks is not None:  # rule 10
                    self._fail(MALFORMED_IN_FINAL)
            self._text("<", out)
            self._buf = self._buf[1:]
        return "".join(out)

    def _in_answer(self) -> bool:
        return self._mode == "final" and self._section is None and self._problem is None

    def _text(self, text: str, out: list[str]) -> None:
        if self._section is not None:
            self._section.parts.append(text)
        elif self._in_answer():
            self._emit(text, out)
        # rule 3 (outside), rule 9 (later finals), rule 10 (after an error): withheld

    def _tag(self, raw: str, closing: bool, name: str, out: list[str]) -> None:
        section = self._section
        if section is not None:  # rules 4, 5: inside thinking only its own tags count
            if name != "final" and not closing:
                section.stack.append(name)
            elif name == section.stack[-1]:
                section.stack.pop()
                if not section.stack:
                    self._close_section()
                    return
            section.parts.append(raw)
            return
        if name != "final":
            if not closing:
                self._section = _Section(name, [name])
            elif self._in_answer():
                self._fail(STRAY_CLOSE_IN_FINAL)  # rule 10
            return  # rule 3: a stray closing tag outside is withheld
        # name == "final"
        if self._mode == "final":
            if self._problem is None and closing:
                self._mode = "after"  # rule 7: the answer is complete
                self._pending_ws = ""
            elif self._problem is None:
                self._fail(FINAL_IN_FINAL)
        elif self._mode == "extra":
            if closing:
                self._mode = "after"
        elif not closing:
            self._mode = "final" if self._mode == "outside" else "extra"  # rule 9

    def _emit(self, text: str, out: list[str]) -> None:
        """Answer text, with the answer's surrounding whitespace held back (rule 7)."""
        if not self._answer:
            text = text.lstrip()
        body = text.rstrip()
        if body:
            piece = self._pending_ws + body
            self._answer.append(piece)
            out.append(piece)
            self._pending_ws = text[len(body):]
        elif self._answer:
            self._pending_ws += text

    def _close_section(self) -> None:
        section, self._section = self._section, None
        self._sections.setdefault(self._free_key(section.name), []).append("".join(section.parts))

    def _fail(self, problem: str) -> None:
        if self._problem is None:
            self._problem = problem
            self._mode = "extra" if self._mode == "final" else self._mode

    def _free_key(self, name: str) -> str:
        key, n = name, 1
        while key in self._sections:
            n += 1
            key = f"{name}#{n}"
        return key


def _tag_name(tag: regex.Match) -> str:
    """"final", "think" or "think-<name lower-cased>" (the keyword as written may be any case)."""
    if tag["think"] is None:
        return "final"
    return "think" if tag["name"] is None else f"think-{tag['name'].translate(_ASCII_TWINS).lower()}"


def filter_reply(content: str, fields: dict[str, str] | None = None) -> FilterResult:
    """A whole reply at once: its content and its separate thinking fields (name -> text)."""
    f = ThinkingFilter()
    for name, text in (fields or {}).items():
        f.feed_field(name, text)
    f.feed(content)
    return f.finish()
