"""What a quantized file costs in quality: next-token log-probabilities of a runtime against the fp32 model's, on
the same token windows (perplexity, KL divergence, top-1 agreement)."""

from __future__ import annotations

import math

import numpy as np

from slm.formats.checkpoint import Checkpoint
from slm.inference.load import load_model


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class TorchScorer:
    """The reference: the checkpoint in fp32, by torch, on the CPU."""

    def __init__(self, ckpt: Checkpoint, n_vocab: int):
        import torch

        self.model = load_model(ckpt, torch.device("cpu"))
        self.n_vocab = n_vocab

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(ids)[None])[0, :, :self.n_vocab].double().numpy()


def compare(ref_logits: list[np.ndarray], scorer, windows: list[np.ndarray]) -> dict:
    """Perplexity of SCORER on the windows' next tokens, mean KL(ref || scorer) and top-1 agreement per token."""
    nll = kl = agree = 0.0
    n = 0
    for ref, ids in zip(ref_logits, windows):
        q = log_softmax(scorer.logits(ids))[:-1]
        p = log_softmax(np.asarray(ref, dtype=np.float64))[:-1]
        targets = ids[1:]
        nll -= q[np.arange(len(targets)), targets].sum()
        kl += (np.exp(p) * (p - q)).sum()
        agree += (p.argmax(-1) == q.argmax(-1)).sum()
        n += len(targets)
    return {"perplexity": math.exp(nll / n), "kl_mean": max(0.0, kl / n), "top1_agreement": agree / n, "tokens": n}


def reference_quality(ref_logits: list[np.ndarray], windows: list[np.ndarray]) -> dict:
    nll, n = 0.0, 0
    for ref, ids in zip(ref_logits, windows):
        p = log_softmax(np.asarray(ref, dtype=np.float64))[:-1]
        nll -= p[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
    return {"perplexity": math.exp(nll / n), "kl_mean": 0.0, "top1_agreement": 1.0, "tokens": n}
