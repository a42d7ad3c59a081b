"""Precomputed data for the page's text lookups (no server), sharded by an FNV-1a hash of the key and loaded by the
page only for the keys a query needs:

- context-text search: word -> the features whose top-activating contexts, as their cards show them, contain
  the word, each scored 0..9 by the feature's largest activation on the word's tokens relative to its maximum
  over the store; at most `search_features` features per word and dictionary (highest scores first);
- "features that fire on this text": token string -> each dictionary's `fire_features` features with the largest
  mean activation on that token string over the scanned store rows (every occurrence; ids that decode to the
  same text are pooled). The page splits typed text into known token strings greedily, longest match first, and
  ranks features by the sum of their means over the pieces: a context-free lookup, not a forward pass.

Words are runs of Unicode letters, digits and `_`, lowercased (Python `\\w+` and the page's
`[\\p{L}\\p{N}_]+`); both sides hash the UTF-8 bytes of a key the same way.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

WORD = re.compile(r"\w+")
MAX_WORD = 40  # longer runs (hashes, base64) are not indexed
FIRE_ELEMS = 64 * 2**20  # largest [token strings, K] sum table (256 MB fp32); beyond it the most frequent strings
PER_SHARD = 20_000  # about this many postings per shard file


def words(text: str) -> list[tuple[str, int, int]]:
    """(lowercased word, start, end) of every word of `text`."""
    return [(m.group().lower(), m.start(), m.end()) for m in WORD.finditer(text) if m.end() - m.start() <= MAX_WORD]


def fnv1a(key: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes (app.js computes the same)."""
    h = 0x811C9DC5
    for b in key.encode("utf-8"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def n_shards(postings: int) -> int:
    """A power of two giving about PER_SHARD postings per shard."""
    n = 1
    while n < 4096 and postings > n * PER_SHARD:
        n *= 2
    return n


class TokenText:
    """Decoded text of single token ids, memoised (`#id` without a tokenizer, e.g. a synthetic store)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.memo = tokenizer, {}

    def __call__(self, i: int) -> str:
        if i not in self.memo:
            self.memo[i] = f"#{i}" if self.tokenizer is None else self.tokenizer.decode([i])
        return self.memo[i]


class StringTable:
    """The token strings of a store's scanned rows seen at least `min_count` times, most frequent first: every id
    that decodes to the same (non-empty) text shares a row."""

    def __init__(self, text: TokenText, token_counts: np.ndarray, min_count: int = 1):
        ids = np.flatnonzero(token_counts)
        totals: dict[str, int] = {}
        for i in ids:
            s = text(int(i))
            if s:
                totals[s] = totals.get(s, 0) + int(token_counts[i])
        self.strings = sorted((s for s in totals if totals[s] >= min_count), key=lambda s: (-totals[s], s))
        self.counts = np.array([totals[s] for s in self.strings], dtype=np.int64)
        rank = {s: r for r, s in enumerate(self.strings)}
        self.row_of_id = np.full(len(token_counts), -1, dtype=np.int64)
        for i in ids:
            self.row_of_id[i] = rank.get(text(int(i)), -1)

    def rows(self, K: int) -> torch.Tensor:
        """Per token id its string's row, keeping the FIRE_ELEMS // K most frequent strings (-1: left out)."""
        keep = self.kept(K)
        return torch.from_numpy(np.where(self.row_of_id < keep, self.row_of_id, -1))

    def kept(self, K: int) -> int:
        return min(len(self.strings), max(1, FIRE_ELEMS // max(K, 1)))


def fire_entries(table: StringTable, sums: torch.Tensor, n: int) -> dict[str, list[tuple[int, float]]]:
    """Per token string, the n features with the largest mean activation on it: [(feature, mean), ...]."""
    means = sums / torch.from_numpy(table.counts[:len(sums)]).float()[:, None]
    vals, ks = means.topk(min(n, means.shape[1]), dim=1)
    return {table.strings[r]: list(zip(ks[r].tolist(), vals[r].tolist())) for r in range(len(sums))}


def window_words(text: TokenText, ids: list[int], vals: np.ndarray, vmax: float) -> dict[str, int]:
    """The words of one window of tokens, each scored 0..9: the largest activation on its tokens / `vmax`."""
    pieces = [text(i) for i in ids]
    found = words("".join(pieces))
    if not found:
        return {}
    owner = np.repeat(np.arange(len(pieces)), [len(p) for p in pieces])  # the token of every character
    first = owner[[a for _, a, _ in found]]
    last = owner[[b - 1 for _, _, b in found]]
    rel = np.clip(np.nan_to_num(np.asarray(vals, dtype=np.float64)) / vmax, 0, 1) if vmax > 0 else np.zeros(len(ids))
    t = np.arange(len(pieces))
    on = (t >= first[:, None]) & (t <= last[:, None])  # [words, tokens]: the tokens each word overlaps
    scores = np.rint(9 * np.where(on, rel, 0).max(axis=1)).astype(int).tolist()
    out: dict[str, int] = {}
    for (w, _, _), score in zip(found, scores):
        out[w] = max(out.get(w, 0), score)
    return out


def postings_of(scored: dict[int, dict[str, int]], cap: int) -> dict[str, list[tuple[int, int]]]:
    """{feature: {word: score}} -> {word: [(feature, score), ...]}, at most `cap` per word, best scores first."""
    out: dict[str, list[tuple[int, int]]] = {}
    for k, ws in scored.items():
        for w, s in ws.items():
            out.setdefault(w, []).append((k, s))
    return {w: sorted(v, key=lambda e: (-e[1], e[0]))[:cap] for w, v in out.items()}
