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

import torch


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
