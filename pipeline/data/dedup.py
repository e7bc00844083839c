"""Exact and near-duplicate examples: the first one is kept, later ones removed.

Exact: the same record after Unicode NFKC normalization, lower case and without whitespace.
Near: MinHash (datasketch) over character 5-grams of that normalized text, with
an LSH index at Jaccard `threshold`: two translations of the same prompt that
differ in a few characters count as one. Both depend only on the examples seen
before, so appending lines never changes which of the old ones are kept.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata

from datasketch import MinHash, MinHashLSH

SHINGLE = 5
NUM_PERM = 128


def normalized_text(record: dict) -> str:
    if "text" in record:
        parts = [record["text"]]
    else:
        parts = [f"{m['role']}: {m['content']}" for m in record["messages"]]
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", "\n".join(parts))).lower()


def content_key(record: dict) -> str:
    """sha256 of the normalized record: equal for exact duplicates, and the key of the split."""
    return hashlib.sha256(json.dumps(normalized_text(record), ensure_ascii=False).encode()).hexdigest()


class Deduplicator:
    """Feed records in order; `seen` says whether each duplicates an earlier one ("exact", "near" or None)."""

    def __init__(self, *, exact: bool, near: bool, threshold: float):
        self.exact, self.near = exact, near
        self.keys: set[str] = set()
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM) if near else None
        self.count = 0

    def seen(self, record: dict) -> str | None:
        key = content_key(record)
        if self.exact and key in self.keys:
            return "exact"
        self.keys.add(key)
        if self.lsh is not None:
            m = self._minhash(normalized_text(record))
            if self.lsh.query(m):
                return "near"
            self.lsh.insert(str(self.count), m)
        self.count += 1
        return None

    @staticmethod
    def _minhash(text: str) -> MinHash:
        m = MinHash(num_perm=NUM_PERM, seed=1)
        grams = {text[i:i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1))}
        m.update_batch([g.encode("utf-8") for g in sorted(grams)])
        return m
