"""Megatron-style indexed datasets (MMIDIDX): PREFIX.bin holds the tokens, PREFIX.idx says where each sequence is.

The layout read by Megatron-LM (megatron/core/datasets/indexed_dataset.py), GPT-NeoX (megatron/data/indexed_dataset.py)
and datatrove, all little-endian:

    PREFIX.bin   the token ids of every sequence, back to back, in the dtype the index names; nothing else

    PREFIX.idx   offset  size            field
                 0       9               magic b"MMIDIDX\\x00\\x00"
                 9       8  uint64       version, 1
                 17      1  uint8        dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                         7 float32, 8 uint16
                 18      8  uint64       S, the number of sequences
                 26      8  uint64       D, the number of entries in the document index (documents + 1)
                 34      4*S int32       sequence lengths in tokens
                 34+4S   8*S int64       sequence pointers: byte offset of each sequence in PREFIX.bin
                 34+12S  8*D int64       document index: the sequence number where each document starts,
                                         then S (so document d is sequences doc_idx[d] .. doc_idx[d+1]-1)

slm writes one sequence per document (doc_idx = 0, 1, ..., S), each ending with the end-of-document token unless
asked not to. The writer streams: memory stays flat however many documents a shard holds.
"""

from __future__ import annotations

import hashlib
import os
import struct
from functools import cached_property
from pathlib import Path

import numpy as np

from slm.errors import SlmError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
HEADER = struct.Struct("<9sQBQQ")  # 34 bytes


class IndexedWriter:
    """Append documents; close() writes PREFIX.bin and PREFIX.idx under temp names, then renames both.

    Until close() returns, only PREFIX.bin.tmp / PREFIX.idx.tmp / PREFIX.sizes.tmp exist: a killed writer never
    leaves a shard that looks complete. sha256 of both files is computed on the way (bin_sha256, idx_sha256).
    """

    CHUNK = 1 << 20  # sequences per chunk when writing the index

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        self._bin_tmp = self.prefix.with_name(self.prefix.name + ".bin.tmp")
        self._sizes_tmp = self.prefix.with_name(self.prefix.name + ".sizes.tmp")
        self._idx_tmp = self.prefix.with_name(self.prefix.name + ".idx.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._sizes = open(self._sizes_tmp, "wb")
        self._bin_hash = hashlib.sha256()
        self.n_sequences = 0
        self.n_tokens = 0
        self.bin_sha256 = self.idx_sha256 = ""

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: TOKENS is their concatenation, LENGTHS their token counts."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError("lengths do not add up to the number of tokens")
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise SlmError("a document has more than 2^31 tokens, more than the index format can hold")
        self._bin.write(tokens.data)
        self._bin_hash.update(tokens.data)
        self._sizes.write(lengths.astype("<i4").tobytes())
        self.n_sequences += lengths.size
        self.n_tokens += tokens.size

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        self.add_batch(tokens, np.array([tokens.size]))

    def abort(self) -> None:
        for f in (self._bin, self._sizes):
            f.close()
        for p in (self._bin_tmp, self._sizes_tmp, self._idx_tmp):
            p.unlink(missing_ok=True)

    def close(self) -> tuple[Path, Path]:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        self._sizes.close()
        itemsize = self.dtype.itemsize
        h = hashlib.sha256()
        with open(self._idx_tmp, "wb") as idx, open(self._sizes_tmp, "rb") as sizes_in:
            def put(b: bytes) -> None:
                idx.write(b)
                h.update(b)

            put(HEADER.pack(MAGIC, VERSION, CODE_OF[self.dtype], self.n_sequences, self.n_sequences + 1))
            while block := sizes_in.read(4 * self.CHUNK):  # lengths, as they were written
                put(block)
            sizes_in.seek(0)
            offset = 0
            while block := sizes_in.read(4 * self.CHUNK):  # pointers: running sum of lengths, in bytes
                lengths = np.frombuffer(block, dtype="<i4").astype(np.int64)
                ends = np.cumsum(lengths) * itemsize + offset
                starts = np.empty_like(ends)
                starts[0] = offset
                starts[1:] = ends[:-1]
                offset = int(ends[-1])
                put(starts.astype("<i8").tobytes())
            for start in range(0, self.n_sequences + 1, self.CHUNK):  # one document per sequence
                stop = min(start + self.CHUNK, self.n_sequences + 1)
                put(np.arange(start, stop, dtype="<i8").tobytes())
            idx.flush()
            os.fsync(idx.fileno())
        self._sizes_tmp.unlink()
        self.bin_sha256, self.idx_sha256 = self._bin_hash.hexdigest(), h.hexdigest()
        bin_path, idx_path = self.prefix.with_name(self.prefix.name + ".bin"), self.prefix.with_name(self.prefix.name + ".idx")
        os.replace(self._bin_tmp, bin_path)
        os.replace(self._idx_tmp, idx_path)
        return bin_path, idx_path


class IndexedDataset:
    """Read PREFIX.bin/.idx (memory-mapped; opening costs O(1) whatever the size)."""

    def __init__(self, prefix: Path):
        self.prefix = Path(prefix)
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        try:
            with open(self.idx_path, "rb") as f:
                head = f.read(HEADER.size)
        except OSError as e:
            raise SlmError(f"{self.idx_path}: cannot open ({e.strerror})") from None
        if len(head) < HEADER.size:
            raise SlmError(f"{self.idx_path}: truncated index ({len(head)} bytes)")
        magic, version, code, n_seq, n_doc = HEADER.unpack(head)
        if magic != MAGIC:
            raise SlmError(f"{self.idx_path}: not an MMIDIDX index (magic {magic!r})")
        if version != VERSION:
            raise SlmError(f"{self.idx_path}: index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise SlmError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.n_sequences, self.n_doc_entries = n_seq, n_doc
        expected = HEADER.size + 12 * n_seq + 8 * n_doc
        actual = os.path.getsize(self.idx_path)
        if actual < expected:
            raise SlmError(f"{self.idx_path}: truncated index ({actual} bytes, expected {expected})")
        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        o = HEADER.size
        self.lengths = idx[o:o + 4 * n_seq].view("<i4")
        o += 4 * n_seq
        self.pointers = idx[o:o + 8 * n_seq].view("<i8")
        o += 8 * n_seq
        self.doc_idx = idx[o:o + 8 * n_doc].view("<i8")
        bin_size = os.path.getsize(self.bin_path) if self.bin_path.exists() else -1
        if bin_size < 0:
            raise SlmError(f"{self.bin_path}: missing")
        self._check_layout()
        want = int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize if n_seq else 0
        if bin_size != want:
            raise SlmError(f"{self.bin_path}: {bin_size} bytes, the index says {want}")

    def _check_layout(self, chunk: int = 1 << 22) -> None:
        """Sequences lie one after another from byte 0 (as Megatron and slm write them), with lengths >= 0: a damaged
        index is named here, in one line, not met later as a wrong slice. Chunked: memory stays flat."""
        item = self.dtype.itemsize
        expect = 0
        for start in range(0, self.n_sequences, chunk):
            lengths = np.asarray(self.lengths[start:start + chunk], dtype=np.int64)
            pointers = np.asarray(self.pointers[start:start + chunk], dtype=np.int64)
            if (lengths < 0).any():
                i = start + int(np.argmax(lengths < 0))
                raise SlmError(f"{self.idx_path}: damaged index (sequence {i} has length {int(self.lengths[i])})")
            starts = expect + np.concatenate([[0], np.cumsum(lengths[:-1] * item)])
            if not np.array_equal(pointers, starts):
                i = start + int(np.argmax(pointers != starts))
                raise SlmError(f"{self.idx_path}: damaged index (sequence {i} starts at byte "
                               f"{int(self.pointers[i])}, expected {int(starts[i - start])})")
            expect = int(starts[-1] + lengths[-1] * item)

    def __len__(self) -> int:
        return self.n_sequences

    @cached_property
    def tokens(self) -> np.ndarray:
        """Every token of the shard as one flat array (memory-mapped)."""
        if self.n_sequences == 0 or os.path.getsize(self.bin_path) == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r")

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.n_sequences <= i < self.n_sequences:
            raise IndexError(i)
        i %= self.n_sequences
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.lengths[i])]

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        """Token offsets in [start, stop) where a document begins (binary search in the memory-mapped index)."""
        docs = self.doc_idx[:-1]
        if docs.size == 0:
            return np.zeros(0, dtype=np.int64)
        itemsize = self.dtype.itemsize
        # A document starts where its first sequence starts.
        seq_starts = self.pointers
        lo = int(np.searchsorted(seq_starts, start * itemsize, side="left"))
        hi = int(np.searchsorted(seq_starts, stop * itemsize, side="left"))
        candidates = np.asarray(seq_starts[lo:hi]) // itemsize
        if self.n_doc_entries == self.n_sequences + 1:  # one document per sequence (what slm writes)
            return candidates.astype(np.int64)
        is_doc_start = np.isin(np.arange(lo, hi), np.asarray(docs))
        return candidates[is_doc_start].astype(np.int64)
