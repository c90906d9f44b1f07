"""Deduplication of short texts (first user messages): exact after normalisation, and near-duplicate by MinHash.

Two texts are exact duplicates when they are equal after Unicode NFKC, case folding and reducing punctuation and
spacing to single spaces ("Who are you?" = "who are you"). They are near duplicates when the Jaccard similarity of
their character 4-gram sets (of the normalised text) reaches a threshold (0.7 by default): datasketch's MinHash LSH
finds the candidates (the method of the BigCode and text-dedup pipelines), and the exact Jaccard of the two sets
decides, so no false positive passes the threshold (LSH may miss a pair just above it, rarely). The first text
seen is the one kept.
"""

from __future__ import annotations

import re
import unicodedata

NGRAM = 4


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\W_]+", " ", text).strip()


def shingles(norm: str, k: int = NGRAM) -> set[str]:
    if len(norm) <= k:
        return {norm}
    return {norm[i:i + k] for i in range(len(norm) - k + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class Deduper:
    """Feed texts in order; `check` says why a text duplicates one kept before, or None (and keeps it)."""

    EXACT = "dropped: duplicate (same words)"
    NEAR = "dropped: near duplicate"

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHashLSH

        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold: expected a number in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        # LSH bands tuned towards recall (a false candidate costs one exact Jaccard; a missed one a duplicate)
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.2, 0.8))
        self.exact: set[str] = set()
        self.sets: list[set[str]] = []

    def check(self, text: str, add: bool = True) -> str | None:
        """Why TEXT duplicates a text kept before, or None; then ADD keeps it (for later checks)."""
        from datasketch import MinHash

        norm = normalize(text)
        if norm in self.exact:
            return self.EXACT
        sh = shingles(norm)
        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch([s.encode("utf-8") for s in sh])
        for key in self.lsh.query(m):
            if jaccard(sh, self.sets[key]) >= self.threshold:
                return self.NEAR
        if not add:
            return None
        self.exact.add(norm)
        self.lsh.insert(len(self.sets), m)
        self.sets.append(sh)
        return None
