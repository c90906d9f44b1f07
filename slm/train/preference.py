"""Direct Preference Optimization: the losses, pairs as batches, and the reference model's log-probabilities.

For a prompt x with a chosen answer y_w and a rejected one y_l, the policy pi and the frozen reference pi_ref give
the implicit rewards r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x)) and r_l likewise, with h = (r_w - r_l) / beta:

    sigmoid  (DPO, Rafailov et al. 2023)   -log sigmoid(beta h)
    hinge    (SLiC)                         max(0, 1 - beta h)
    ipo      (Azar et al. 2023)             (h - 1 / (2 beta))^2, with log-probabilities averaged over the
                                            answer's tokens (as TRL computes IPO)

Pairs are read with StableLM 2's and Zephyr's filters (read_pairs). Logged per pair: rewards of chosen and
rejected, their margin, accuracy (r_w > r_l), a KL estimate (mean over both answers of log pi - log pi_ref). The
reference's log-probabilities are computed once and kept (reference_logprobs/): training runs only the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slm.console import info
from slm.errors import SlmError
from slm.formats.chat import Pair, iter_objects, parse_pair
from slm.formats.checkpoint import Checkpoint
from slm.formats.manifest import atomic_dir, new_manifest, read_manifest, write_json
from slm.formats.records import BadRecord
from slm.train.batches import MicroBatch, StepBatches
from slm.train.dist import barrier, broadcast_object


def dpo_losses(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
               kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the loss, the chosen reward and the rejected reward, from sequence log-probabilities of the
    policy (pc, pr) and the reference (rc, rr) (for ipo: per-token averages)."""
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}")
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


@dataclass
class EncodedPair:
    chosen: np.ndarray  # token ids of prompt + chosen answer
    rejected: np.ndarray
    chosen_start: int  # where the answer starts (its tokens are the targets)
    rejected_start: int


@dataclass
class PairBatch(MicroBatch):
    """2P rows: the P chosen sequences, then the P rejected ones; ref: [2P] reference log-probabilities."""

    ref: torch.Tensor | None = None
    lengths: torch.Tensor | None = None  # answer tokens of each row (for ipo's averages)
    pairs: int = 0

    @property
    def n_tokens(self) -> int:  # the unit a step's loss is averaged over: pairs
        return self.pairs


def pair_batch(pairs: list[EncodedPair], ref: torch.Tensor | None, pad_id: int, device) -> PairBatch:
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    starts = [p.chosen_start for p in pairs] + [p.rejected_start for p in pairs]
    L = max(len(s) for s in seqs)
    tokens = np.full((len(seqs), L), pad_id, dtype=np.int64)
    targets = np.full((len(seqs), L - 1), -100, dtype=np.int64)
    for i, (s, a) in enumerate(zip(seqs, starts)):
        tokens[i, :len(s)] = s
        targets[i, a - 1:len(s) - 1] = s[a:]  # position j predicts token j + 1: the answer's tokens
    t = torch.from_numpy(tokens).to(device)
    tg = torch.from_numpy(targets).to(device)
    return PairBatch(t[:, :-1], tg, None, ref=None if ref is None else ref.to(device),
                     lengths=(tg != -100).sum(dim=1), pairs=len(pairs))


def sequence_logprobs(model, mb: PairBatch, average: bool) -> torch.Tensor:
    lp = model(mb.input_ids, targets=mb.targets, token_logprobs=True).sum(dim=1)
    return lp / mb.lengths.clamp(min=1) if average else lp


def make_loss_fn(beta: float, kind: str):
    """The training loop's loss for DPO: (model, PairBatch) -> (sum of pair losses, logged sums)."""
    average = kind == "ipo"

    def loss_fn(model, mb: PairBatch):
        lp = sequence_logprobs(model, mb, average)
        ref = mb.ref.to(lp.dtype)
        if average:
            ref = ref / mb.lengths.clamp(min=1)
        P = mb.pairs
        losses, rw, rl = dpo_losses(lp[:P], lp[P:], ref[:P], ref[P:], beta, kind)
        stats = {"rewards_chosen": rw.sum(), "rewards_rejected": rl.sum(), "reward_margin": (rw - rl).sum(),
                 "accuracy": (rw > rl).float().sum(),
                 "kl_estimate": ((lp.detach() - ref) / 2).view(2, P).sum(dim=0).sum()}
        return losses.sum(), stats

    return loss_fn


class PairOrder:
    """Pair n of epoch e is pair perm_e[n] (seeded by (seed, e)): a pure function of the sample number."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __call__(self, sample: int) -> int:
        epoch, k = divmod(sample, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][k])


class PairBatches(StepBatches):
    """The loop's batches over pairs (samples are pairs; slm.train.batches.StepBatches slices them by rank)."""

    unit = "pairs"

    def __init__(self, pairs: list[EncodedPair], ref: torch.Tensor, pairs_per_step: int, micro: int, rank: int,
                 world: int, pad_id: int, seed: int, device):
        super().__init__(pairs_per_step, micro, rank, world, device, "dpo.batch_size", "dpo.micro_batch_size")
        self.pairs, self.ref, self.pad_id = pairs, ref, pad_id
        self.order = PairOrder(len(pairs), seed)

    def micro_batch(self, samples: np.ndarray) -> PairBatch:
        return self.batch([self.order(int(n)) for n in samples])

    def batch(self, idx: list[int]) -> PairBatch:
        ref = torch.cat([self.ref[idx, 0], self.ref[idx, 1]])
        return pair_batch([self.pairs[i] for i in idx], ref, self.pad_id, self.device)


class PairValid:
    """Held-out pairs, each once: the validation loss and the logged sums (valid_accuracy ...)."""

    def __init__(self, batches: PairBatches):
        self.b = batches

    def batches(self, micro: int, rank: int, world: int, device) -> list[PairBatch]:
        mine = list(range(len(self.b.pairs)))[rank::world]
        return [self.b.batch(mine[i:i + micro]) for i in range(0, len(mine), micro)]


@torch.no_grad()
def reference_logprobs(model, pairs: list[EncodedPair], micro: int, pad_id: int, rank: int, world: int, device,
                       autocast, progress=None) -> torch.Tensor:
    """[N, 2] summed log-probabilities of each pair's chosen and rejected answer under MODEL, computed by the
    processes in turn (pair i by process i mod world) and summed over them."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    mine = list(range(len(pairs)))[rank::world]
    model.eval()
    for i in range(0, len(mine), micro):
        idx = mine[i:i + micro]
        mb = pair_batch([pairs[j] for j in idx], None, pad_id, device)
        with autocast():
            lp = sequence_logprobs(model, mb, average=False).double()
        out[idx, 0], out[idx, 1] = lp[:len(idx)], lp[len(idx):]
        if progress is not None:
            progress(len(idx))
    return out


def read_pairs(specs: list[str], skip_bad: bool, min_chosen: float | None, counts: dict) -> list[Pair]:
    """Pairs of SPECS with the filters applied; COUNTS gets each reason."""
    pairs, seen = [], set()
    bad = {}
    for where, obj in iter_objects(specs, skip_bad, bad):
        counts["read"] = counts.get("read", 0) + 1
        try:
            p = parse_pair(obj, where)
        except BadRecord:
            if not skip_bad:
                raise
            counts["skipped: bad record"] = counts.get("skipped: bad record", 0) + 1
            continue
        reason = None
        if p.chosen == p.rejected:
            reason = "dropped: identical answers"
        elif p.score_chosen is not None and p.score_chosen == p.score_rejected:
            reason = "dropped: tie (equal scores)"
        elif min_chosen is not None and p.score_chosen is not None and p.score_chosen < min_chosen:
            reason = f"dropped: chosen score below {min_chosen:g}"
        elif p.key() in seen:
            reason = "dropped: exact duplicate"
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
            continue
        seen.add(p.key())
        pairs.append(p)
    if bad.get("bad"):
        counts["read"] = counts.get("read", 0) + bad["bad"]
        counts["skipped: bad record"] = counts.get("skipped: bad record", 0) + bad["bad"]
    counts["kept"] = len(pairs)
    return pairs


PAIR_LAYOUT = "logprobs [pairs, 2] float64: summed log-probabilities of the chosen and the rejected answer"


def cached_reference(out: Path, ref_ckpt: Checkpoint, ref_hash: str, data_hash: str, compute, d,
                     layout: str = PAIR_LAYOUT) -> torch.Tensor:
    """OUT/reference_logprobs/: reused when the reference's and data's hashes match, else COMPUTE()d and kept."""
    cache = out / "reference_logprobs"
    reuse = None
    if d.main and (cache / "manifest.json").is_file():
        try:
            m = read_manifest(cache, "reference_logprobs")
            if m.get("reference_sha256") == ref_hash and m.get("data_sha256") == data_hash:
                reuse = True
        except SlmError:
            reuse = None
    reuse = broadcast_object(reuse, d)
    if reuse:
        if d.main:
            info(f"reference log-probabilities: reusing {cache}")
        return load_file(str(cache / "logprobs.safetensors"))["logprobs"]
    lp = compute()
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_dir(cache) as tmp:
            save_file({"logprobs": lp.cpu().contiguous()}, str(tmp / "logprobs.safetensors"))
            write_json(tmp / "manifest.json", new_manifest(
                "reference_logprobs", {"reference": str(ref_ckpt.dir)},
                inputs=[{"path": str(ref_ckpt.dir), "sha256": ref_hash}], counts={"rows": int(lp.shape[0])},
                reference_sha256=ref_hash, data_sha256=data_hash, layout=layout))
    barrier(d)
    return lp.cpu()
