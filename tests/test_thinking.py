"""The thinking filter (pipeline/thinking.py): no thinking text ever leaves it, whatever the
reply and its chunking; one example per rule of its docstring."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.thinking import (FINAL_IN_FINAL, MALFORMED_IN_FINAL, NO_FINAL, PROBLEMS, STRAY_CLOSE_IN_FINAL,
                               UNCLOSED_FINAL, UNCLOSED_THINK_IN_FINAL, ThinkingFilter, filter_reply)

# Thinking is written in its own alphabet, so "no byte of it leaks" is "none of these characters
# appears"; answers and outside text use another (no letters that could spell a tag).
SECRET = "θψΩ秘密"
PLAIN = "ab あい 1<\n"


def stream(reply: str, cuts: list[int], fields: dict[str, str] | None = None):
    """Feed reply cut at the given positions; returns (emitted text, FilterResult)."""
    f = ThinkingFilter()
    for name, text in (fields or {}).items():
        f.feed_field(name, text)
    out, last = [], 0
    for cut in sorted(set(cuts)) + [len(reply)]:
        out.append(f.feed(reply[last:cut]))
        last = cut
    return "".join(out), f.finish()


# -- generated hostile replies ------------------------------------------------------------------

def spaced(word: str) -> st.SearchStrategy[str]:
    """A tag's word in any case, maybe a Kelvin sign for a k."""
    return st.tuples(*[st.sampled_from(sorted({c, c.upper()} | ({"\u212a"} if c == "k" else set())))
                       for c in word]).map("".join)


ws = st.sampled_from(["", " ", "  ", "\n", "\t", "\u3000"])
names = st.sampled_from(["", "-a", "-plan", "-B_2", "-x-y"])


@st.composite
def think_tag(draw, closing: bool, name: str) -> str:
    return f"<{draw(ws)}{'/' if closing else ''}{draw(ws)}{draw(spaced('think'))}{name}{draw(ws)}>"


@st.composite
def final_tag(draw, closing: bool) -> str:
    return f"<{draw(ws)}{'/' if closing else ''}{draw(ws)}{draw(spaced('final'))}{draw(ws)}>"


secret_text = st.text(alphabet=SECRET, min_size=1, max_size=12)
plain_text = st.text(alphabet=PLAIN, max_size=12)


@st.composite
def thinking(draw, depth: int = 0) -> str:
    """A thinking section: maybe nested, maybe holding a final, maybe unclosed or mis-closed."""
    name = draw(names)
    inner = [draw(secret_text)]
    if depth < 1 and draw(st.booleans()):
        inner.append(draw(thinking(depth + 1)))
    if draw(st.booleans()):
        inner.append(draw(final_tag(False)) + draw(secret_text) + draw(final_tag(True)))
    inner.append(draw(secret_text))
    ending = draw(st.sampled_from(["close", "close", "none", "other"]))
    close = {"close": draw(think_tag(True, name)), "none": "",
             "other": draw(think_tag(True, "-zz")) + draw(secret_text)}[ending]
    return draw(think_tag(False, name)) + "".join(inner) + close


@st.composite
def final(draw) -> str:
    parts = [draw(plain_text)]
    if draw(st.booleans()):
        parts.append(draw(thinking()))
    parts.append(draw(plain_text))
    if draw(st.integers(0, 5)) == 0:
        parts.append(draw(st.sampled_from(["<final>", "</think>", "<thinking>", "<think a>", "<final/>"])))
    close = draw(final_tag(True)) if draw(st.integers(0, 4)) else ""
    return draw(final_tag(False)) + "".join(parts) + close


replies = st.lists(st.one_of(thinking(), final(), plain_text, st.just("</think>")), max_size=6).map("".join)
cuts = st.lists(st.integers(0, 200), max_size=12)
fields = st.dictionaries(st.sampled_from(["reasoning_content", "reasoning", "thinking"]),
                         secret_text.map(lambda s: s + "<final>x</final>"), max_size=2)


def no_secret(text: str | None) -> bool:
    return text is None or not set(SECRET) & set(text)


@settings(max_examples=400, deadline=None)
@given(reply=replies, cuts=cuts, fields=fields)
def test_no_thinking_byte_leaves_the_filter(reply, cuts, fields):
    emitted, result = stream(reply, cuts, fields)
    assert no_secret(emitted) and no_secret(result.final) and no_secret(result.problem)
    whole = filter_reply(reply, fields)
    if result.final is not None:
        assert emitted == result.final == whole.final  # the stream is the answer, chunking changes nothing
    else:
        assert whole.final is None and whole.outcome == result.outcome
        assert whole.final is None or whole.final.startswith(emitted)


@settings(max_examples=200, deadline=None)
@given(reply=replies, a=cuts, b=cuts)
def test_chunking_never_changes_the_outcome(reply, a, b):
    (out_a, res_a), (out_b, res_b) = stream(reply, a), stream(reply, b)
    assert res_a == res_b
    assert out_a == out_b or res_a.final is None  # an error may come at another chunk boundary


@settings(max_examples=200, deadline=None)
@given(answer=plain_text.filter(lambda s: s.strip()), thought=secret_text, cuts=cuts)
def test_a_well_formed_reply_gives_exactly_its_final(answer, thought, cuts):
    reply = f"<think-plan>{thought}</think-plan>\n<final>{answer}</final>"
    emitted, result = stream(reply, cuts)
    assert result.outcome == "ok" and emitted == result.final == answer.strip()
    assert result.sections == {"think-plan": thought}


# -- one example per rule ----------------------------------------------------------------------

RULES = [
    ("1 tags in any case and spacing", "< THINK-a >θ</think-A\n><\nFinal >ok</ Final >", "ok", {"think-a": "θ"}),
    ("1 not our tags are text", "<final>a < b <b> <|end|> ＜final＞</final>", "a < b <b> <|end|> ＜final＞", {}),
    ("3 text outside every tag is withheld", "θ</think> sure! <final>ok</final> θ", "ok", {}),
    ("4 a section ends at its own close", "<think-a>θ</think>θ</think-b>θ</think-a><final>ok</final>",
     "ok", {"think-a": "θ</think>θ</think-b>θ"}),
    ("4 a final inside thinking is thinking", "<think>θ<final>θ</final>θ</think><final>ok</final>",
     "ok", {"think": "θ<final>θ</final>θ"}),
    ("5 nested sections", "<think-a>θ<think-b>ψ</think-b>Ω</think-a><final>ok</final>",
     "ok", {"think-a": "θ<think-b>ψ</think-b>Ω"}),
    ("6 an unclosed section swallows the rest", "<think>θ <final>leak</final>", NO_FINAL, {"think": "θ <final>leak</final>"}),
    ("7 the first final, stripped", "<final>\n  ok  \n</final>", "ok", {}),
    ("8 thinking inside the final is cut out", "<final>a <think-x>θ</think-x>b</final>", "a b", {"think-x": "θ"}),
    ("8 unclosed thinking inside the final", "<final>a <think>θ", UNCLOSED_THINK_IN_FINAL, {"think": "θ"}),
    ("9 later finals are withheld", "<final>ok</final><final>θ</final>", "ok", {}),
    ("10 a final inside the final", "<final>a<final>θ</final></final>", FINAL_IN_FINAL, {}),
    ("10 a stray close inside the final", "<final>a</think>θ</final>", STRAY_CLOSE_IN_FINAL, {}),
    ("10 a near-miss tag inside the final", "<final>a<thinking>θ</thinking></final>", MALFORMED_IN_FINAL, {}),
    ("11 an unclosed final", "<final>abc", UNCLOSED_FINAL, {}),
    ("11 no final at all", "just text", NO_FINAL, {}),
    ("13 names come again", "<think>θ</think><THINK>ψ</THINK><final>ok</final>", "ok", {"think": "θ", "think#2": "ψ"}),
]


@pytest.mark.parametrize("reply,expected,sections", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule(reply, expected, sections):
    result = filter_reply(reply)
    if expected in PROBLEMS:
        assert result.final is None and result.outcome == expected
        assert no_secret(result.problem)
    else:
        assert result.final == expected and result.outcome == "ok"
    assert result.sections == sections


def test_rule_2_a_tag_split_anywhere_is_held_back():
    reply = "<final>ab</final>"
    f = ThinkingFilter()
    assert [f.feed(c) for c in "<fi"] == ["", "", ""]
    assert f.feed("nal>a<") == "a" and f.feed("/fi") == "" and f.feed("nal>") == ""
    assert f.finish().final == "a" and filter_reply(reply).final == "ab"


def test_rule_10_a_stream_keeps_what_came_before_the_error():
    emitted, result = stream("<final>ab <final>θ</final>", [10])
    assert emitted == "ab" and result.final is None and result.outcome == FINAL_IN_FINAL


def test_rule_12_reasoning_fields_are_thinking_whatever_they_hold():
    result = filter_reply("<final>ok</final>", {"reasoning_content": "θ<final>leak</final>", "thinking": "ψ"})
    assert result.final == "ok"
    assert result.sections == {"reasoning_content": "θ<final>leak</final>", "thinking": "ψ"}


def test_rule_14_problems_never_quote_the_reply():
    for text in PROBLEMS.values():
        assert "θ" not in text and "{" not in text
