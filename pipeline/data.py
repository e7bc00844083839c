"""Training data: JSONL chat or text examples, tokenized with loss masks.

Each line is either `{"messages": [{"role": ..., "content": ...}, ...]}`,
rendered with the tokenizer's own chat template and trained on the
assistant turns only (their content and the end-of-turn token that follows),
or `{"text": "..."}`, trained on every token. Sequences are truncated to
`max_length` tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label value that cross-entropy skips


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Parse a JSONL file into (line number, record) pairs, validating shape."""
    records: list[tuple[int, dict]] = []
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a JSONL file") from None
    try:
        # split on "\n" only: str.splitlines also breaks at U+2028 and the like, which JSON strings may hold
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        n = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        _check_record(rec, f"{path}:{n}")
        records.append((n, rec))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty)")
    return records


def _check_record(rec: object, where: str) -> None:
    if not isinstance(rec, dict) or ("messages" in rec) == ("text" in rec):
        raise DataError(f'{where}: each line must be an object with exactly one of "messages" or "text"')
    extra = set(rec) - {"messages", "text"}
    if extra:
        raise DataError(f"{where}: unknown key(s) {sorted(extra)}")
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise DataError(f'{where}: "text" must be a non-empty string')
        return
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise DataError(f'{where}: messages[{i}] must have exactly "role" and "content"')
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has unknown role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message, so nothing to train on")


def _assistant_spans(tokenizer, messages: list[dict], text: str, where: str) -> list[tuple[int, int]]:
    """Character spans of each assistant reply in the rendered `text`."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        if not text.startswith(prompt) or not text[len(prompt):].startswith(m["content"]):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render this conversation "
                "incrementally, so assistant turns cannot be located"
            )
        spans.append((len(prompt), len(prompt) + len(m["content"])))
    return spans


def tokenize_record(tokenizer, rec: dict, max_length: int, where: str) -> Example:
    """Tokenize one record; labels are IGNORE outside the trained spans."""
    if "text" in rec:
        enc = tokenizer(rec["text"], truncation=True, max_length=max_length)
        ids = list(enc["input_ids"])
        return Example(ids, list(ids))

    messages = rec["messages"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _assistant_spans(tokenizer, messages, text, where)
    enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=max_length)
    ids = list(enc["input_ids"])
    # all_special_ids misses chat markers such as <|end|>; the added-token table has them.
    special = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    offsets = enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for s, e in spans:
        inside = [k for k, (start, end) in enumerate(offsets) if start < e and end > s]
        # The reply's tokens are trained, and so is the special end-of-turn
        # token right after it: that is what teaches the model to stop.
        after = next((k for k, (start, _) in enumerate(offsets) if start >= e and k > 0), None)
        if after is not None and ids[after] in special:
            inside.append(after)
        for k in inside:
            labels[k] = ids[k]
    if all(x == IGNORE for x in labels):
        raise DataError(f"{where}: no assistant token left after truncation to {max_length} tokens")
    return Example(ids, labels)


def load_examples(path: Path, tokenizer, max_length: int) -> list[Example]:
    """Read and tokenize a dataset. Raises DataError naming the file and line."""
    return [tokenize_record(tokenizer, rec, max_length, f"{path}:{n}") for n, rec in read_jsonl(path)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked and ignored by the loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def example_order(n_examples: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the examples used at optimizer step `step` (0-based).

    A fresh seeded permutation per epoch: the order depends only on the step,
    so a resumed run sees exactly the data an uninterrupted run would.
    """
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n_examples)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n_examples, generator=g)[pos]))
    return out
