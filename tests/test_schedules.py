"""Every schedule against values computed by hand."""

import math

import pytest

from slm.recipes import load_recipe
from slm.train.schedules import Schedule, calibrate_hybrid_horizon, cosine, hybrid, linear_to_zero, wsd


def test_warmup_is_linear_and_reaches_the_peak():
    s = Schedule("cosine", lr_peak=1e-3, total_steps=100, warmup_steps=10)
    assert s(0) == pytest.approx(1e-4)
    assert s(4) == pytest.approx(5e-4)
    assert s(9) == pytest.approx(1e-3)
    assert s(10) == pytest.approx(1e-3)  # the cosine starts at the peak


def test_cosine_by_hand():
    # lr_min + (peak - lr_min) (1 + cos(pi (s - W) / (T - W))) / 2 with peak 1, min 0.1, W 10, T 110
    f = lambda s: cosine(s, lr_peak=1.0, lr_min=0.1, warmup_steps=10, total_steps=110)  # noqa: E731
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert f(35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)


def test_wsd_by_hand():
    # SmolLM2 small models: warmup 2000, decay over the last 20%; here T = 100, W = 10, D = 20
    f = lambda s: wsd(s, lr_peak=3e-3, warmup_steps=10, total_steps=100, decay_fraction=0.2)  # noqa: E731
    assert f(9) == pytest.approx(3e-3)
    assert f(50) == pytest.approx(3e-3)
    assert f(79) == pytest.approx(3e-3)
    assert f(80) == pytest.approx(3e-3)  # the first decay step is at the peak
    assert f(89) == pytest.approx(3e-3 * 10 / 19)
    assert f(99) == 0.0  # the last step is exactly 0
    assert wsd(95, lr_peak=1.0, warmup_steps=0, total_steps=100, decay_fraction=0.1) == pytest.approx(4 / 9)


def test_linear_cooldown_ends_at_zero():
    # StableLM 2: from 2.529e-4 to 0; here over 5 steps starting at global step 420000
    lrs = [linear_to_zero(420_000 + i, 2.529e-4, 420_000, 5) for i in range(5)]
    assert lrs == pytest.approx([2.529e-4, 2.529e-4 * 0.75, 2.529e-4 * 0.5, 2.529e-4 * 0.25, 0.0])
    assert lrs[-1] == 0.0


def test_stablelm_hybrid_gives_the_published_cooldown_start():
    t = load_recipe("stablelm-2-1_6b")["train"]
    s = Schedule("hybrid", lr_peak=t["lr_peak"], lr_min=t["lr_min"], warmup_steps=t["warmup_steps"],
                 total_steps=t["total_steps"], cosine_fraction=t["cosine_fraction"],
                 cosine_horizon_steps=t["cosine_horizon_steps"])
    assert t["warmup_steps"] == round(0.018 * 540_000)
    assert s(420_000) == pytest.approx(2.529e-4, rel=1e-4)  # the lr the published cooldown starts from
    assert s(9_719) == pytest.approx(1e-3)
    # value and slope are continuous at the joint (a quarter of training)
    joint = 135_000
    cos_part = lambda x: 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (x - 9720) / (283_150 - 9720)))  # noqa: E731
    assert s(joint - 1) == pytest.approx(cos_part(joint - 1), rel=1e-12)
    assert s(joint) == pytest.approx(cos_part(joint), rel=1e-9)
    assert s(joint + 1) - s(joint) == pytest.approx(cos_part(joint) - cos_part(joint - 1), rel=1e-3)
    # after the joint, 1 / lr^2 grows linearly in the step: lr = a / sqrt(t + b)
    inv_sq = [s(t) ** -2 for t in (300_000, 400_000, 500_000)]
    assert inv_sq[1] - inv_sq[0] == pytest.approx(inv_sq[2] - inv_sq[1], rel=1e-9)
    assert s(540_000 - 1) == pytest.approx(2.178e-4, rel=1e-3)


def test_the_hybrid_horizon_is_the_calibrated_one():
    h = calibrate_hybrid_horizon(420_000, 2.529e-4, lr_peak=1e-3, lr_min=1e-4, warmup_steps=9720, total_steps=540_000)
    assert round(h) == load_recipe("stablelm-2-1_6b")["train"]["cosine_horizon_steps"] == 283_150
    assert hybrid(420_000, lr_peak=1e-3, lr_min=1e-4, warmup_steps=9720, total_steps=540_000,
                  cosine_horizon_steps=h) == pytest.approx(2.529e-4, rel=1e-9)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        Schedule("exponential", lr_peak=1.0, total_steps=10)
    with pytest.raises(ValueError, match="cosine_horizon_steps"):
        Schedule("hybrid", lr_peak=1.0, total_steps=10)
