"""Training batches from a mix: which global samples each rank reads at each step, as tensors.

Step s of a stage reads the samples_per_step global samples that start at first_sample(s). Rank r of W takes the
r-th contiguous slice of them and cuts it into micro-batches. The set of samples in a step therefore does not
depend on the world size, and a run resumes on any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slm.errors import SlmError
from slm.formats.mixplan import MixReader
from slm.formats.tokens import TokensDir


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]
    segment_ids: torch.Tensor | None  # [B, T], None when no window holds a document boundary

    @property
    def n_tokens(self) -> int:
        return int((self.targets != -100).sum())


def segments(doc_starts: list[np.ndarray], length: int) -> np.ndarray | None:
    """Segment id of each input position: the number of document starts at or before it."""
    if not any(((s > 0) & (s < length)).any() for s in doc_starts):
        return None
    pos = np.arange(length)
    return np.stack([np.searchsorted(s, pos, side="right") for s in doc_starts]).astype(np.int64)


def to_micro_batch(tokens: np.ndarray, doc_starts: list[np.ndarray], device: torch.device) -> MicroBatch:
    t = torch.from_numpy(np.ascontiguousarray(tokens)).to(device, non_blocking=True)
    seg = segments(doc_starts, tokens.shape[1] - 1)
    return MicroBatch(t[:, :-1], t[:, 1:], None if seg is None else torch.from_numpy(seg).to(device))


def fit_micro_batch(per_rank: int, micro: int, micro_name: str, unit: str, world: int, announce: bool) -> int:
    """The micro-batch size a process uses: MICRO when it divides the process's PER_RANK samples of a step, else
    the largest size that does (said on stderr when ANNOUNCE): a step's result does not depend on how it is cut."""
    if per_rank % micro == 0:
        return micro
    fit = max(k for k in range(1, min(micro, per_rank) + 1) if per_rank % k == 0)
    if announce:
        from slm.console import warn

        share = f"the {per_rank} {unit} each of {world} processes takes" if world > 1 else f"the {per_rank} {unit}"
        warn(f"{micro_name} {micro} {'is more than' if micro > per_rank else 'does not divide'} {share} per step: "
             f"using micro-batches of {fit} ({per_rank // fit} per step; the step is the same, memory is less)")
    return fit


class StepBatches:
    """Step s reads the global samples [first, first + samples_per_step); rank r of W takes the r-th contiguous
    slice and cuts it into micro-batches. Subclasses say how samples become a micro-batch (micro_batch)."""

    unit = "samples"

    def __init__(self, samples_per_step: int, micro_batch_size: int, rank: int, world: int, device: torch.device,
                 batch_name: str = "the batch", micro_name: str = "micro_batch_size"):
        if samples_per_step % world:
            raise SlmError(f"{batch_name} gives {samples_per_step} {self.unit} per step, not divisible by the "
                           f"{world} processes")
        self.per_rank = samples_per_step // world
        self.samples_per_step = samples_per_step
        self.micro = fit_micro_batch(self.per_rank, micro_batch_size, micro_name, self.unit, world, rank == 0)
        self.rank, self.device = rank, device
        self.accumulation = self.per_rank // self.micro

    def micro_batch(self, samples: np.ndarray) -> MicroBatch:
        raise NotImplementedError

    def step(self, first_sample: int) -> list[MicroBatch]:
        base = first_sample + self.rank * self.per_rank
        return [self.micro_batch(np.arange(base + m * self.micro, base + (m + 1) * self.micro))
                for m in range(self.accumulation)]


class Batches(StepBatches):
    """A mix's samples."""

    def __init__(self, reader: MixReader, samples_per_step: int, micro_batch_size: int, rank: int, world: int,
                 device: torch.device):
        super().__init__(samples_per_step, micro_batch_size, rank, world, device, "train.tokens_per_step",
                         "train.micro_batch_size")
        self.reader = reader

    def micro_batch(self, samples: np.ndarray) -> MicroBatch:
        tokens, starts = self.reader.batch(samples)
        return to_micro_batch(tokens, starts, self.device)


class ValidSet:
    """EVAL_SAMPLES windows of seq_len + 1 tokens spread evenly over a tokens directory (documents kept apart)."""

    def __init__(self, directory: Path, seq_len: int, n: int):
        self.tokens = TokensDir(directory)
        windows = (self.tokens.n_tokens - 1) // seq_len
        if windows < 1:
            raise SlmError(f"{directory}: {self.tokens.n_tokens} tokens, fewer than one window of {seq_len + 1}")
        self.starts = sorted({int(i * windows // max(1, n)) * seq_len for i in range(min(n, windows))})
        self.seq_len = seq_len

    def batches(self, micro: int, rank: int, world: int, device) -> list[MicroBatch]:
        mine = self.starts[rank::world]
        out = []
        for i in range(0, len(mine), micro):
            chunk = mine[i:i + micro]
            tokens = np.stack([self.tokens.read(s, self.seq_len + 1) for s in chunk])
            starts = [self.tokens.document_starts(s, s + self.seq_len + 1) - s for s in chunk]
            out.append(to_micro_batch(tokens, starts, device))
        return out

    def unigram_loss(self, sources: list[TokensDir], n_vocab: int, max_tokens: int = 20_000_000) -> float:
        """Cross-entropy (nats) of these windows' targets under the training sources' unigram distribution
        (add-one smoothing): the loss a model that ignores context reaches. A trained model must beat it."""
        counts = np.ones(n_vocab, dtype=np.float64)
        for src in sources:
            take = min(src.n_tokens, max_tokens // max(1, len(sources)))
            counts += np.bincount(src.read(0, take), minlength=n_vocab)[:n_vocab]
        logp = np.log(counts / counts.sum())
        targets = np.concatenate([self.tokens.read(s + 1, self.seq_len) for s in self.starts])
        return float(-logp[targets].mean())
