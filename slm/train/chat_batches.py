"""Conversations as training rows: encoding with a chat template, filters, packing, and the batches of an epoch.

A conversation becomes token ids and a mask that is true on the tokens its assistant messages contribute (the
answer and the end of its turn): the loss is taken there only. Rows are `length` tokens long; with packing, several
conversations share a row (best-fit decreasing: longest first, each into the fullest row it fits), and attention
and positions restart at each conversation (segment ids), so a packed row trains exactly as its conversations
would alone. Row n of epoch e is row perm_e[n] of a permutation seeded by (seed, e): the order is a pure function
of the sample number, so a run resumes, on any number of processes, with the same rows in the same order.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from slm.formats.chat import ChatTemplate
from slm.formats.tokenizer import Tokenizer
from slm.train.batches import MicroBatch, StepBatches


@dataclass
class Encoded:
    ids: np.ndarray  # int64 token ids of the whole conversation
    mask: np.ndarray  # bool: the token is part of an assistant message (a target of the loss)


def encode_chat(tok: Tokenizer, template: ChatTemplate, messages: list[dict],
                only_last: bool = False) -> Encoded:
    """Token ids of the rendered conversation (special tokens written by the template become their ids, as in
    transformers) and the assistant mask; ONLY_LAST masks the last assistant message only (a DPO answer)."""
    msgs = [dict(m, content=tok.normalize(m["content"])) for m in messages]
    spec = tok.spec
    text, spans = template.spans(msgs, spec.bos_token, spec.eos_token)
    if only_last:
        spans = spans[-1:]
    ids = tok.encode(text, allowed_special="all")
    _, offsets = tok.decode_with_offsets(ids)
    starts = np.asarray(offsets, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    return Encoded(np.asarray(ids, dtype=np.int64), mask)


def user_turns(messages: list[dict]) -> int:
    """Turns of a conversation: its user messages (each with the answer to it)."""
    return sum(m["role"] == "user" for m in messages)


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of LENGTHS grouped into rows of at most CAPACITY tokens, longest first, each
    into the row with the least room that still fits it. Deterministic (ties by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> rows with that room
    rooms: list[int] = []  # the distinct rooms present, sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            r = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            r, room = len(rows), capacity
            rows.append([])
        rows[r].append(i)
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(r)
    return rows


@dataclass
class Rows:
    """Conversations grouped into rows of LENGTH tokens."""

    convs: list[Encoded]
    rows: list[list[int]]
    length: int
    pad_id: int
    seed: int
    tokens: int = field(init=False)

    def __post_init__(self):
        self.tokens = sum(len(c.ids) for c in self.convs)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def row_of_sample(self, n: int) -> int:
        epoch, k = divmod(n, len(self.rows))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return int(self._perm[1][k])

    def layout(self, row_ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, np.ndarray]:
        """Rows ROW_IDS as arrays [B, length]: tokens, loss mask, segment ids, whether a row holds more than one
        conversation, and the conversation each position belongs to (-1: padding)."""
        B, L = len(row_ids), self.length
        tokens = np.full((B, L), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, L), dtype=bool)
        seg = np.zeros((B, L), dtype=np.int64)
        owner = np.full((B, L), -1, dtype=np.int64)
        boundaries = False
        for b, r in enumerate(row_ids):
            pos = 0
            for j, ci in enumerate(self.rows[r]):
                c = self.convs[ci]
                n = len(c.ids)
                tokens[b, pos:pos + n], mask[b, pos:pos + n], seg[b, pos:pos + n] = c.ids, c.mask, j
                owner[b, pos:pos + n] = ci
                mask[b, pos] = False  # a conversation's first token has nothing before it to be predicted from
                pos += n
            seg[b, pos:] = len(self.rows[r])  # the padding is a segment of its own
            boundaries |= len(self.rows[r]) > 1
        return tokens, mask, seg, boundaries, owner

    def micro_batch(self, row_ids: list[int], device: torch.device) -> MicroBatch:
        tokens, mask, seg, boundaries, _ = self.layout(row_ids)
        t = torch.from_numpy(tokens).to(device)
        targets = torch.from_numpy(np.where(mask[:, 1:], tokens[:, 1:], -100)).to(device)
        segment_ids = torch.from_numpy(seg[:, :-1]).to(device) if boundaries else None
        return MicroBatch(t[:, :-1], targets, segment_ids)


class ChatBatches(StepBatches):
    """The loop's batches over Rows (slm.train.batches.StepBatches: the same samples whatever the world size)."""

    unit = "sequences"

    def __init__(self, rows: Rows, samples_per_step: int, micro_batch_size: int, rank: int, world: int,
                 device: torch.device, section: str = "sft"):
        super().__init__(samples_per_step, micro_batch_size, rank, world, device, f"{section}.batch_size",
                         f"{section}.micro_batch_size")
        self.rows = rows

    def micro_batch(self, samples: np.ndarray) -> MicroBatch:
        return self.rows.micro_batch([self.rows.row_of_sample(int(n)) for n in samples], self.device)


class ChatValid:
    """Held-out conversations for the validation loss (assistant tokens only), each row once."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def batches(self, micro: int, rank: int, world: int, device) -> list[MicroBatch]:
        mine = list(range(len(self.rows)))[rank::world]
        return [self.rows.micro_batch(mine[i:i + micro], device) for i in range(0, len(mine), micro)]
