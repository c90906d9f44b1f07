"""A tokens directory: Megatron .bin/.idx shards written by `slm tokenize encode`, read as one token stream.

    manifest.json   kind "tokens": the tokenizer (path, tokenizer_sha256, n_vocab, eos_id), dtype, each shard
                    (name, tokens, documents, sha256 of .bin and .idx) in stream order, each input (path, sha256,
                    counts, its shards), totals under counts
    shards/NAME.bin shards/NAME.idx   MMIDIDX files (see slm.formats.indexed)

The stream is the concatenation of the shards in manifest order; documents never span shards.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from slm.errors import SlmError
from slm.formats.indexed import IndexedDataset
from slm.formats.manifest import read_manifest, sha256_file


class TokensDir:
    def __init__(self, directory: Path):
        self.dir = Path(directory).absolute()
        self.manifest = read_manifest(self.dir, "tokens")
        self.tokenizer_sha256: str = self.manifest["tokenizer"]["tokenizer_sha256"]
        self.n_vocab: int = self.manifest["tokenizer"]["n_vocab"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shard_names = [s["name"] for s in self.manifest["shards"]]
        counts = np.array([s["tokens"] for s in self.manifest["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # token offset of each shard in the stream
        self.n_tokens = int(self.offsets[-1])
        self.n_documents = int(sum(s["documents"] for s in self.manifest["shards"]))

    @cached_property
    def shards(self) -> list[IndexedDataset]:
        out = []
        for s in self.manifest["shards"]:
            ds = IndexedDataset(self.dir / "shards" / s["name"])
            if ds.n_tokens != s["tokens"] or ds.dtype != self.dtype:
                raise SlmError(f"{ds.bin_path}: {ds.n_tokens} tokens of {ds.dtype}, manifest.json says "
                               f"{s['tokens']} of {self.dtype}")
            out.append(ds)
        return out

    def manifest_sha256(self) -> str:
        return sha256_file(self.dir / "manifest.json")

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, as int64."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.n_tokens})")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            k = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            local = pos - int(self.offsets[k])
            take = min(length - filled, int(self.offsets[k + 1]) - pos)
            out[filled:filled + take] = self.shards[k].tokens[local:local + take]
            filled += take
            pos += take
        return out

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        """Stream offsets in [start, stop) where a document begins."""
        parts = []
        k0 = int(np.searchsorted(self.offsets, start, side="right")) - 1
        k1 = int(np.searchsorted(self.offsets, stop - 1, side="right")) - 1 if stop > start else k0 - 1
        for k in range(max(k0, 0), min(k1, len(self.shards) - 1) + 1):
            base = int(self.offsets[k])
            local = self.shards[k].document_starts(max(start - base, 0), min(stop - base, int(self.offsets[k + 1]) - base))
            parts.append(local + base)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def document_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(stream offset, length in tokens) of every document, in order: from the shards' indexes alone."""
        starts, lengths = [], []
        for k, shard in enumerate(self.shards):
            if len(shard) == 0:
                continue
            ends = np.cumsum(np.asarray(shard.lengths, dtype=np.int64))
            doc_idx = np.asarray(shard.doc_idx, dtype=np.int64)
            if doc_idx.size < 1 or doc_idx[0] != 0 or doc_idx[-1] != len(shard) or (np.diff(doc_idx) < 0).any():
                raise SlmError(f"{shard.idx_path}: damaged document index (expected non-decreasing entries "
                               f"from 0 to {len(shard)})")
            bounds = np.concatenate([[0], ends])[doc_idx]  # sequence -> token
            starts.append(bounds[:-1] + int(self.offsets[k]))
            lengths.append(np.diff(bounds))
        if not starts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(starts), np.concatenate(lengths)

    def documents(self):
        """Every document of the stream, in order (for inspection and tests)."""
        for shard in self.shards:
            for i in range(len(shard)):
                yield shard[i]
