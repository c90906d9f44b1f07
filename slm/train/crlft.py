"""C-RLFT (conditioned RL fine-tuning, OpenChat; StableLM 2's self-knowledge stage): the objective.

Each training sequence belongs to a class c (positive: answered with the facts in the system prompt; negative:
answered without them, its prompt marked by a negative-class token). Class c has a coarse reward, used as a weight
w_c (OpenChat: 1.0 for the good class, 0.1 for the other). The KL-regularised objective max E[r_c] - beta KL(pi ||
pi_c) has the closed form pi* proportional to pi_c exp(r_c / beta); fitting it reduces to weighted, class-conditioned
SFT over the response tokens t of every sequence:

    L_sft = sum_t w_c(t) * (-log pi(y_t | y_<t, x, c)) / sum_t w_c(t)

StableLM 2's summary mentions an explicit KL term towards a reference model; slm offers it with a coefficient
(0 = OpenChat's practice, no reference model). It is estimated on the positive response tokens from the reference's
cached per-token log-probabilities with the non-negative estimator k3 (Schulman 2020): with
r_t = log pi_ref(y_t) - log pi(y_t),

    KL ~= sum_{t positive} (exp(r_t) - 1 - r_t) / sum_t w_c(t)
    L  = L_sft + kl_coef * KL

Both sums run over a whole optimizer step (all micro-batches and processes): the loop divides the summed numerator
by the step's total weight (the micro-batch's `n_tokens` is its weight sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slm.train.batches import MicroBatch
from slm.train.chat_batches import Encoded, Rows


def crlft_terms(logprobs: torch.Tensor, weights: torch.Tensor, positive: torch.Tensor,
                ref_logprobs: torch.Tensor | None, kl_coef: float) -> tuple[torch.Tensor, dict]:
    """The numerator of L for some tokens: sum_t w_t * (-logprob_t) + kl_coef * sum_{t positive} k3_t.

    logprobs [N] (the policy's, differentiable), weights [N] (w of each token's class, 0 off the responses),
    positive [N] bool, ref_logprobs [N] or None (needed when kl_coef > 0). Returns the numerator and sums to log
    (the weighted NLL, the KL estimate's numerator, positive and negative response tokens)."""
    nll = -(weights * logprobs).sum()
    stats = {"weighted_nll": nll.detach(), "positive_tokens": positive.sum().float(),
             "negative_tokens": ((weights > 0) & ~positive).sum().float()}
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("a KL term needs the reference's log-probabilities")
        r = (ref_logprobs - logprobs)[positive]
        kl = (torch.exp(r) - 1 - r).sum()
        stats["kl"] = kl.detach()
        return nll + kl_coef * kl, stats
    return nll, stats


@dataclass
class CrlftBatch(MicroBatch):
    weights: torch.Tensor | None = None  # [B, T] w of each target's class, 0 off the responses
    positive: torch.Tensor | None = None  # [B, T] bool: the target is a positive response token
    ref: torch.Tensor | None = None  # [B, T] the reference's log-probability of each positive target, or None

    @property
    def n_tokens(self) -> float:  # the unit a step's loss is divided by: the weight sum
        return float(self.weights.sum())


class CrlftRows(Rows):
    """Rows of packed conversations, each of a class: POSITIVE[c] and its weight; REF[c] (optional) the
    reference's log-probability of each token of conversation c (at the token's position; 0 where untrained)."""

    def __init__(self, convs: list[Encoded], rows: list[list[int]], length: int, pad_id: int, seed: int,
                 positive: list[bool], weights: tuple[float, float], ref: list[np.ndarray] | None = None):
        super().__init__(convs, rows, length, pad_id, seed)
        self.positive = np.asarray(positive, dtype=bool)
        self.class_weight = np.where(self.positive, weights[0], weights[1])
        self.ref = ref

    def micro_batch(self, row_ids: list[int], device: torch.device) -> CrlftBatch:
        tokens, mask, seg, boundaries, owner = self.layout(row_ids)
        tmask, towner = mask[:, 1:], owner[:, 1:]  # target j is token j + 1
        weights = np.where(tmask, self.class_weight[towner.clip(min=0)], 0.0)
        positive = tmask & self.positive[towner.clip(min=0)]
        ref = None
        if self.ref is not None:
            ref = np.zeros(tmask.shape, dtype=np.float64)
            for b, r in enumerate(row_ids):
                pos = 0
                for ci in self.rows[r]:
                    n = len(self.convs[ci].ids)
                    ref[b, pos:pos + n - 1] = self.ref[ci][1:]
                    pos += n
            ref = torch.from_numpy(np.where(positive, ref, 0.0)).to(device)
        t = torch.from_numpy(tokens).to(device)
        return CrlftBatch(t[:, :-1], torch.from_numpy(np.where(tmask, tokens[:, 1:], -100)).to(device),
                          torch.from_numpy(seg[:, :-1]).to(device) if boundaries else None,
                          weights=torch.from_numpy(weights).to(device), positive=torch.from_numpy(positive).to(device),
                          ref=ref)


def make_loss_fn(kl_coef: float):
    """The training loop's loss for C-RLFT: (model, CrlftBatch) -> (the numerator of L, logged sums)."""

    def loss_fn(model, mb: CrlftBatch):
        lp = model(mb.input_ids, segment_ids=mb.segment_ids, targets=mb.targets, token_logprobs=True)
        keep = mb.targets != -100
        num, stats = crlft_terms(lp[keep], mb.weights[keep].to(lp.dtype), mb.positive[keep],
                                 None if mb.ref is None else mb.ref[keep].to(lp.dtype), kl_coef)
        return num, {k: v for k, v in stats.items() if k in ("weighted_nll", "kl")}

    return loss_fn


@torch.no_grad()
def token_logprobs(model, rows: CrlftRows, which: list[int], micro: int, rank: int, world: int, device,
                   autocast) -> list[np.ndarray]:
    """The log-probability MODEL gives each trained token of every conversation (at the token's position; 0
    elsewhere), for the rows WHICH this process computes (rank r takes every world-th); others stay zero."""
    out = [np.zeros(len(c.ids), dtype=np.float64) for c in rows.convs]
    mine = which[rank::world]
    model.eval()
    for i in range(0, len(mine), micro):
        ids = mine[i:i + micro]
        mb = rows.micro_batch(ids, device)
        with autocast():
            lp = model(mb.input_ids, segment_ids=mb.segment_ids, targets=mb.targets, token_logprobs=True)
        lp = lp.double().cpu().numpy()
        for b, r in enumerate(ids):
            pos = 0
            for ci in rows.rows[r]:
                n = len(rows.convs[ci].ids)
                out[ci][1:] = lp[b, pos:pos + n - 1] * rows.convs[ci].mask[1:]
                pos += n
    return out
