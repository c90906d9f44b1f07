"""C-RLFT's objective (slm/train/crlft.py) against a hand computation."""

import math

import pytest
import torch

from slm.train.crlft import crlft_terms


def test_crlft_terms_equal_a_hand_computation():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0, 0.0], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0, -0.25, -1.0, -9.0])
    positive = torch.tensor([True, True, False, False, False])
    weights = torch.tensor([1.0, 1.0, 0.1, 0.1, 0.0])  # the last token is a prompt token: no weight
    got, stats = crlft_terms(lp, weights, positive, None, 0.0)
    want_nll = 1.0 * 1.0 + 1.0 * 2.0 + 0.1 * 0.5 + 0.1 * 3.0
    assert float(got.detach()) == pytest.approx(want_nll)
    assert float(stats["positive_tokens"]) == 2 and float(stats["negative_tokens"]) == 2
    got, stats = crlft_terms(lp, weights, positive, ref, 0.2)
    k3 = [math.exp(r) - 1 - r for r in (-1.5 + 1.0, -2.0 + 2.0)]  # positive tokens only
    assert float(stats["kl"]) == pytest.approx(sum(k3))
    assert float(got.detach()) == pytest.approx(want_nll + 0.2 * sum(k3))
    got.backward()
    # d/d lp of -w lp + c (exp(ref - lp) - 1 - (ref - lp)) = -w + c (1 - exp(ref - lp)) on positives
    want = [-1 + 0.2 * (1 - math.exp(-0.5)), -1 + 0.2 * (1 - 1.0), -0.1, -0.1, 0.0]
    torch.testing.assert_close(lp.grad, torch.tensor(want))
    with pytest.raises(ValueError, match="reference"):
        crlft_terms(lp, weights, positive, None, 0.1)
