"""Prepared records to token ids with loss masks, packed or not, and batches of them.

A `{"messages": [...]}` record is rendered with the tokenizer's own chat
template and trained on the assistant turns only (their content and the
end-of-turn token that follows); a `{"text": ...}` record is trained on every
token and cut at `max_length`. A conversation longer than `max_length` follows
the over-long policy: `truncate_prompt` removes the oldest turns (a system
message stays) until it fits, keeping the last reply; `drop` leaves it out.
Either way it is counted, never an abort; a reply that does not fit even alone
is dropped.

Packing puts consecutive examples into windows of `max_length` tokens. Position
ids restart at each example and the attention mask is block-diagonal (a 4D
boolean mask, which transformers passes to SDPA as it is), so no token attends
across an example boundary; the first label of each example is ignored, so no
token is trained on predicting the next example. (transformers also infers
such a mask from restarting position ids, but not on the SDPA path Phi-3
takes: the loss then differed by 3e-4 on the tiny model.)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..chattext import encode_rendered
from ..errors import DataError

IGNORE = -100  # label value that cross-entropy skips


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # set on packed windows: restarts at each example

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _assistant_spans(tokenizer, messages: list[dict], text: str, where: str) -> list[tuple[int, int]]:
    """Character spans of what the model must write for each assistant reply in the rendered `text`:
    everything after the generation prompt up to the end of the reply's content. That is the
    content itself, after any text the template puts first (Qwen3's empty `<think>\n\n</think>\n\n`
    before the last reply: the model writes it at serving time, since the generation prompt ends
    before it). Templates that trim the content (Gemma's `| trim`) are followed."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        rest = text[len(prompt):] if text.startswith(prompt) else ""
        content = m["content"] if m["content"] in rest else m["content"].strip()
        at = rest.find(content) if rest else -1
        if at < 0:
            raise DataError(
                f"{where}: the tokenizer's chat template does not render this conversation "
                "incrementally, so assistant turns cannot be located"
            )
        spans.append((len(prompt), len(prompt) + at + len(content)))
    return spans


def _tokenize_messages(tokenizer, messages: list[dict], where: str) -> Example:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _assistant_spans(tokenizer, messages, text, where)
    enc = encode_rendered(tokenizer, text, return_offsets_mapping=True)
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
    return Example(ids, labels)


def _oldest_turn_removed(messages: list[dict]) -> list[dict] | None:
    """The conversation without its oldest user turn and what answers it; None when only the last reply is left."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    last_user = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=0)
    if last_user == 0:
        return None
    nxt = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), last_user)
    return system + rest[nxt:]


def tokenize_record(tokenizer, rec: dict, max_length: int, where: str, overlong: str = "truncate_prompt",
                    counts: Counter | None = None) -> Example | None:
    """Tokenize one record; labels are IGNORE outside the trained spans.

    Returns None for an over-long conversation that is dropped (by policy, or
    because its last reply does not fit alone); `counts` tallies "truncated"
    and "dropped".
    """
    counts = Counter() if counts is None else counts
    if "text" in rec:
        enc = tokenizer(rec["text"], truncation=True, max_length=max_length)
        ids = list(enc["input_ids"])
        return Example(ids, list(ids))

    messages = rec["messages"]
    ex = _tokenize_messages(tokenizer, messages, where)
    if len(ex.input_ids) <= max_length and ex.trained_tokens:
        return ex
    while overlong == "truncate_prompt" and (messages := _oldest_turn_removed(messages)) is not None:
        ex = _tokenize_messages(tokenizer, messages, where)
        if len(ex.input_ids) <= max_length and ex.trained_tokens:
            counts["truncated"] += 1
            return ex
    counts["dropped"] += 1
    return None


def load_examples(records: list[dict], tokenizer, max_length: int, overlong: str = "truncate_prompt",
                  counts: Counter | None = None) -> list[Example]:
    """Tokenize prepared records (each with its "source"); over-long ones follow the policy."""
    out = []
    for rec in records:
        ex = tokenize_record(tokenizer, rec, max_length, rec.get("source", "?"), overlong, counts)
        if ex is not None:
            out.append(ex)
    return out


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Consecutive examples into windows of at most `max_length` tokens (a longer one stays alone)."""
    windows: list[list[Example]] = []
    size = 0
    for ex in examples:
        if not windows or size + len(ex.input_ids) > max_length:
            windows.append([])
            size = 0
        windows[-1].append(ex)
        size += len(ex.input_ids)
    out = []
    for w in windows:
        ids = [i for ex in w for i in ex.input_ids]
        # The first token of each example predicts nothing across the boundary before it.
        labels = [lab for ex in w for lab in [IGNORE, *ex.labels[1:]]]
        positions = [p for ex in w for p in range(len(ex.input_ids))]
        out.append(Example(ids, labels, positions))
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are ignored by the loss.

    Unpacked: an attention mask hides the padding. Packed: position ids that
    restart at each example (the padding is one more sequence of its own) and a
    block-diagonal causal mask, [batch, 1, width, width], True where attending.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        positions[i, :n] = torch.tensor(e.position_ids if e.position_ids is not None else list(range(n)))
        positions[i, n:] = torch.arange(width - n)
    if packed:
        sequence = (positions == 0).cumsum(-1)  # which example each token belongs to
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        block = (sequence[:, :, None] == sequence[:, None, :]) & causal
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": block[:, None]}
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
