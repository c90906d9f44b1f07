"""The mix plan and the data order: sample n -> (phase, source, start offset), a pure function of (plan, seed, n).

A mix directory holds plan.json (below), ledger.md (the token ledger as a table) and manifest.json (kind "mix").

plan.json
    seq_len, seed, tokenizer_sha256
    sources  [{name, path, manifest_sha256, tokens, documents, sequences}]   sequences = (tokens - 1) // seq_len:
             the windows of seq_len + 1 tokens at offsets 0, seq_len, 2 seq_len, ... of the source's token stream;
             a source with min_doc_tokens also has windows (a file of the mix directory: the int64 offsets of its
             windows, all inside long documents), windows_sha256, tokens_all, documents_all, and its sequences,
             tokens and documents count only those windows and documents
    phases   [{name, tokens, samples, block_size, weights {name: normalised weight},
               samples_per_source {name: N}, drawn_before {name: D}}]

The order, with O(sources + block_size) memory and no index that grows with the corpus:
  1. Phases follow each other; phase p holds `samples` consecutive sample numbers.
  2. A phase is cut into blocks of block_size samples. Source s owns C_s(b) of the first b blocks' samples:
     floor(N_s * m_b / S) plus one for the r sources with the largest remainders (r makes the sum exactly m_b,
     m_b = min(b * block_size, S), ties to the earlier source). block_size >= S / min N_s makes C_s non-decreasing,
     and C_s(last) = N_s exactly, so the ledger is exact and every block holds each source in proportion.
  3. Inside block b the C_s(b+1) - C_s(b) slots of each source are laid out in the order of a pseudo-random
     permutation keyed by (seed, phase, b).
  4. The j-th sample drawn from source s (j counted across phases, so later phases continue through the data
     rather than repeat it) is sequence perm_e(j mod n_s) of epoch e = j // n_s, where perm_e is a pseudo-random
     permutation of the source's n_s sequences keyed by (seed, source name, e). New epoch, new order.
Permutations are Feistel networks over the next power of four with cycle walking: bijections computed
element-wise in integer arithmetic, identical on every platform and numpy version.

Any process of any world size can therefore read any range of samples; reading 0..N in one process equals the
concatenation of the slices several processes read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from collections import OrderedDict
from pathlib import Path

import numpy as np

from slm.errors import SlmError
from slm.formats.manifest import read_json, read_manifest, sha256_file
from slm.formats.tokens import TokensDir

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective scramble of 64-bit words (arrays wrap mod 2^64 without warnings)."""
    z = x + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def stable_key(*parts: object) -> int:
    """A 64-bit key from any printable parts (source names, phase numbers): stable across runs and machines."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def permute(idx: np.ndarray, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """perm(idx) for a pseudo-random bijection of [0, n) chosen by KEY."""
    idx = np.asarray(idx, dtype=np.int64)
    if n <= 1:
        return np.zeros_like(idx)
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    round_keys = _mix64(np.arange(rounds, dtype=np.uint64) + np.uint64(key))

    def encrypt(v: np.ndarray) -> np.ndarray:
        left, right = v >> half, v & mask
        for k in round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << half) | right

    y = encrypt(idx.astype(np.uint64))
    out = y >= np.uint64(n)
    while out.any():  # cycle walking: re-encrypt until inside [0, n); stays a bijection of [0, n)
        y[out] = encrypt(y[out])
        out = y >= np.uint64(n)
    return y.astype(np.int64)


def cumulative_counts(per_source: np.ndarray, total: int, m: int) -> np.ndarray:
    """C_s for the first m samples of a phase: floor(N_s * m / S) plus the largest remainders, summing to m."""
    num = per_source.astype(object) * m  # Python ints: exact for any phase size
    base = np.array([int(v // total) for v in num], dtype=np.int64)
    rem = np.array([int(v % total) for v in num], dtype=object)
    deficit = m - int(base.sum())
    if deficit:
        order = sorted(range(len(per_source)), key=lambda s: (-rem[s], s))
        base[order[:deficit]] += 1
    return base


@dataclass
class Phase:
    name: str
    samples: int
    block_size: int
    per_source: np.ndarray  # N_s for every source of the plan (0 where the phase does not draw it)
    drawn_before: np.ndarray  # D_s: samples drawn from s by earlier phases
    index: int


class MixPlan:
    """The pure data order of a plan.json (no file access beyond reading the plan)."""

    def __init__(self, plan: dict, windows: list[np.ndarray | None] | None = None):
        self.plan = plan
        self.windows = list(windows) if windows is not None else [None] * len(plan["sources"])
        for s, w in zip(plan["sources"], self.windows):
            if ("windows" in s) != (w is not None) or (w is not None and w.size != s["sequences"]):
                raise SlmError(f"plan.json: source {s['name']!r}: its window table does not match the plan")
        self.seq_len = int(plan["seq_len"])
        self.seed = int(plan["seed"])
        self.source_names = [s["name"] for s in plan["sources"]]
        self.sequences = np.array([s["sequences"] for s in plan["sources"]], dtype=np.int64)
        self.source_keys = [stable_key("source", self.seed, name) for name in self.source_names]
        self.phases: list[Phase] = []
        start = np.zeros(len(self.source_names), dtype=np.int64)
        for i, p in enumerate(plan["phases"]):
            n = np.array([p["samples_per_source"].get(name, 0) for name in self.source_names], dtype=np.int64)
            self.phases.append(Phase(p["name"], int(p["samples"]), int(p["block_size"]), n, start.copy(), i))
            start += n
        self.phase_starts = np.concatenate([[0], np.cumsum([p.samples for p in self.phases])]).astype(np.int64)
        self.total_samples = int(self.phase_starts[-1])
        self._blocks: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _block(self, phase_index: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position, global draw number j of that position's sample from its source); the last
        few blocks are kept, as readers go through them in order."""
        key = (phase_index, b)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        if len(self._blocks) >= 8:
            self._blocks.popitem(last=False)
        self._blocks[key] = self._compute_block(phase_index, b)
        return self._blocks[key]

    def _compute_block(self, phase_index: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        ph = self.phases[phase_index]
        m0 = min(b * ph.block_size, ph.samples)
        m1 = min((b + 1) * ph.block_size, ph.samples)
        c0 = cumulative_counts(ph.per_source, ph.samples, m0)
        c1 = cumulative_counts(ph.per_source, ph.samples, m1)
        slots = np.repeat(np.arange(len(self.source_names)), c1 - c0)
        order = permute(np.arange(m1 - m0), m1 - m0, stable_key("block", self.seed, phase_index, b))
        src = slots[order]
        # Rank of each position among the positions of the same source, in position order.
        by_src = np.argsort(src, kind="stable")
        group_start = np.concatenate([[0], np.cumsum(c1 - c0)])[src[by_src]]
        rank = np.empty_like(src)
        rank[by_src] = np.arange(src.size) - group_start
        draw = ph.drawn_before[src] + c0[src] + rank
        return src, draw

    def locate(self, n: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For sample numbers N: (phase index, source index, start token offset in the source's stream)."""
        n = np.atleast_1d(np.asarray(n, dtype=np.int64))
        if n.size and (n.min() < 0 or n.max() >= self.total_samples):
            raise IndexError(f"sample numbers must be in [0, {self.total_samples})")
        phase = np.searchsorted(self.phase_starts, n, side="right") - 1
        source = np.empty_like(n)
        draw = np.empty_like(n)
        local = n - self.phase_starts[phase]
        block = np.zeros_like(n)
        for p in np.unique(phase):
            sel = phase == p
            block[sel] = local[sel] // self.phases[p].block_size
        for p, b in {(int(p), int(b)) for p, b in zip(phase, block)}:
            sel = (phase == p) & (block == b)
            src, drw = self._block(p, b)
            pos = local[sel] - b * self.phases[p].block_size
            source[sel], draw[sel] = src[pos], drw[pos]
        seq = np.empty_like(n)
        for s in np.unique(source):
            sel = source == s
            j = draw[sel]
            epoch, k = j // self.sequences[s], j % self.sequences[s]
            out = np.empty_like(k)
            for e in np.unique(epoch):
                es = epoch == e
                out[es] = permute(k[es], int(self.sequences[s]), stable_key(self.source_keys[s], int(e)))
            seq[sel] = out if self.windows[s] is None else self.windows[s][out]
        starts = seq.copy()
        plain = np.array([w is None for w in self.windows])[source]
        starts[plain] *= self.seq_len
        return phase, source, starts


@dataclass
class Sample:
    tokens: np.ndarray  # seq_len + 1 token ids (int64): inputs are tokens[:-1], targets tokens[1:]
    doc_starts: np.ndarray  # positions in [0, seq_len + 1) where a document begins
    phase: int
    source: int
    start: int  # token offset of the window in the source's stream


class MixReader:
    """Read samples of a mix directory: any range, in any process."""

    def __init__(self, directory: Path, verify: bool = True):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir, "mix")
        self.plan_dict = read_json(self.dir / "plan.json")
        self.tokenizer_sha256 = self.plan_dict["tokenizer_sha256"]
        self.sources: list[TokensDir] = []
        windows = []
        for s in self.plan_dict["sources"]:
            td = TokensDir(Path(s["path"]))
            if verify and sha256_file(td.dir / "manifest.json") != s["manifest_sha256"]:
                raise SlmError(f"{td.dir}: source {s['name']!r} changed since the mix was planned "
                               f"(its manifest.json hash differs); re-run `slm mix`")
            self.sources.append(td)
            windows.append(self._windows(s) if "windows" in s else None)
        self.plan = MixPlan(self.plan_dict, windows)
        self.seq_len = self.plan.seq_len

    def _windows(self, s: dict) -> np.ndarray:
        path = self.dir / s["windows"]
        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SlmError(f"{path}: cannot read the window table of source {s['name']!r} ({e})") from None
        if table.dtype != np.dtype("<i8") or table.ndim != 1 or \
                hashlib.sha256(table.tobytes()).hexdigest() != s.get("windows_sha256"):
            raise SlmError(f"{path}: the window table of source {s['name']!r} is not the one plan.json names "
                           "(changed or damaged); re-run `slm mix`")
        return table

    def __len__(self) -> int:
        return self.plan.total_samples

    def sample(self, n: int) -> Sample:
        return self.samples(np.array([n]))[0]

    def samples(self, ns) -> list[Sample]:
        ns = np.atleast_1d(np.asarray(ns, dtype=np.int64))
        phase, source, start = self.plan.locate(ns)
        width = self.seq_len + 1
        out = []
        for p, s, st in zip(phase.tolist(), source.tolist(), start.tolist()):
            src = self.sources[s]
            out.append(Sample(src.read(st, width), src.document_starts(st, st + width) - st, p, s, st))
        return out

    def batch(self, ns) -> tuple[np.ndarray, list[np.ndarray]]:
        """(tokens [len(ns), seq_len + 1] int64, document starts of each row)."""
        samples = self.samples(ns)
        return np.stack([s.tokens for s in samples]), [s.doc_starts for s in samples]
