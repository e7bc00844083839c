"""Turn a row of a source's format into one training record.

A record is `{"messages": [{"role", "content"}, ...]}` (trained on the
assistant replies) or `{"text": ...}` (trained on every token). Formats:

- `messages`: the HF/OpenAI chat layout, in column `messages`, `conversations`
  or `conversation` (the first present, or the one `column` names);
- `sharegpt`: `conversations` of `{"from", "value"}`, from human, gpt or system;
- `alpaca`: `instruction`, optional `input` (appended to the instruction),
  `output`, optional `system`;
- `text`: a `text` column;
- `auto`: a row with `messages` or `text`, the layout `data/demo_ja.jsonl` uses.

`columns` renames: `{instruction: 質問, output: 回答}` reads the format's
`instruction` from column 質問. Errors name the row, the format expected and
the keys seen.
"""
from __future__ import annotations

from ..errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
MESSAGE_COLUMNS = ("messages", "conversations", "conversation")
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "text")


def _keys(row: object) -> str:
    return str(sorted(row)) if isinstance(row, dict) else f"a {type(row).__name__}, not an object"


def _column(row: dict, name: str, src, where: str, expected: str) -> object:
    column = src.columns.get(name, name)
    if column not in row:
        raise DataError(f"{where}: format {src.format} expects {expected}; saw keys {_keys(row)}")
    return row[column]


def _nonempty_str(value: object, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {what} must be a non-empty string, saw {type(value).__name__} {value!r:.40}")
    return value


def _check_messages(msgs: object, where: str, what: str = '"messages"') -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {what} must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise DataError(f'{where}: messages[{i}] must have "role" and "content"; saw keys {_keys(m)}')
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has unknown role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return _with_reply(out, where)


def _with_reply(msgs: list[dict], where: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return msgs


def _messages(row: dict, src, where: str) -> dict:
    if src.column is not None:
        names = (src.column,)
    else:
        names = tuple(n for n in MESSAGE_COLUMNS if src.columns.get(n, n) in row) or MESSAGE_COLUMNS
    name = names[0]
    msgs = _column(row, name, src, where, f"a chat column ({' or '.join(repr(n) for n in names)})")
    return {"messages": _check_messages(msgs, where, f'"{src.columns.get(name, name)}"')}


def _sharegpt(row: dict, src, where: str) -> dict:
    turns = _column(row, "conversations", src, where, 'a "conversations" list of {"from", "value"}')
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: "conversations" must be a non-empty list')
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not {"from", "value"} <= set(t):
            raise DataError(f'{where}: conversations[{i}] must have "from" and "value"; saw keys {_keys(t)}')
        if t["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}] is from {t['from']!r} "
                            f"(expected one of {tuple(SHAREGPT_ROLES)})")
        if not isinstance(t["value"], str):
            raise DataError(f"{where}: conversations[{i}].value must be a string")
        msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return {"messages": _with_reply(msgs, where)}


def _alpaca(row: dict, src, where: str) -> dict:
    expected = '"instruction" and "output" (optional "input", "system")'
    instruction = _nonempty_str(_column(row, "instruction", src, where, expected), '"instruction"', where)
    output = _nonempty_str(_column(row, "output", src, where, expected), '"output"', where)
    extra = row.get(src.columns.get("input", "input")) or ""
    system = row.get(src.columns.get("system", "system")) or ""
    for value, what in ((extra, '"input"'), (system, '"system"')):
        if not isinstance(value, str):
            raise DataError(f"{where}: {what} must be a string, saw {type(value).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {"messages": msgs}


def _text(row: dict, src, where: str) -> dict:
    return {"text": _nonempty_str(_column(row, "text", src, where, 'a "text" column'), '"text"', where)}


def _auto(row: dict, src, where: str) -> dict:
    if ("messages" in row) == ("text" in row):
        raise DataError(f'{where}: each row must be an object with exactly one of "messages" or "text" '
                        f"(format auto; set data.train[].format for sharegpt, alpaca, ...); saw keys {_keys(row)}")
    extra = set(row) - {"messages", "text"}
    if extra:
        raise DataError(f"{where}: unknown key(s) {sorted(extra)} (format auto expects only messages or text)")
    if "text" in row:
        return {"text": _nonempty_str(row["text"], '"text"', where)}
    return {"messages": _check_messages(row["messages"], where)}


CONVERTERS = {"auto": _auto, "messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca, "text": _text}


def to_record(row: object, src, where: str) -> dict:
    """The record of one row of source `src` (a config DataSource). Raises DataError naming `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object (format {src.format}); saw {_keys(row)}")
    return CONVERTERS[src.format](row, src, where)
