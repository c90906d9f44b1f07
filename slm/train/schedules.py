"""Learning-rate schedules as pure functions of the step (0-based: lr(s) is the rate of the s-th update).

Warmup, everywhere: lr(s) = lr_peak * (s + 1) / warmup_steps for s < warmup_steps, so the first update is not wasted
and step warmup_steps - 1 reaches the peak.

cosine (with warmup)
    lr_min + (lr_peak - lr_min) * (1 + cos(pi * (s - W) / (T - W))) / 2 after warmup, T = total_steps.

wsd, warmup-stable-decay (SmolLM2)
    warmup, then lr_peak, then a linear decay over the last D = round(decay_fraction * T) steps, from lr_peak at
    step T - D to exactly 0 at the last step T - 1 (SmolLM2: the last 20% for 135M / 360M, 10% for 1.7B).

hybrid, StableLM 2's cosine / inverse square root
    warmup; then a cosine from lr_peak towards lr_min over a horizon H; from the joint J = round(cosine_fraction * T)
    (a quarter of training) on, lr = a / sqrt(s + b), with a and b chosen so that value and slope are continuous
    at J. The published facts (peak 1e-3, min 1e-4, 540k planned steps, 9,720 warmup steps, joint at a quarter)
    leave one number free, the cosine's horizon H; `calibrate_hybrid_horizon` solves for the H that makes
    lr(420,000) = 2.529e-4, the learning rate the published cooldown starts from: H = 283,150 steps
    (52.4% of training), which puts the joint at lr 6.09e-4 and gives 2.18e-4 at 540k.

linear (the cooldown)
    lr_start at step 0 down to exactly 0 at the last step N - 1 (StableLM 2 cooled down from 2.529e-4 to 0;
    SmolLM2's decay phase is the same thing).

constant (with warmup)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("cosine", "wsd", "hybrid", "linear", "constant")


def warmup(step: int, lr_peak: float, warmup_steps: int) -> float | None:
    if step < warmup_steps:
        return lr_peak * (step + 1) / warmup_steps
    return None


def cosine(step: int, *, lr_peak: float, lr_min: float, warmup_steps: int, total_steps: int) -> float:
    w = warmup(step, lr_peak, warmup_steps)
    if w is not None:
        return w
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr_min + (lr_peak - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_to_zero(step: int, lr_start: float, start: int, length: int) -> float:
    """lr_start at step START, 0 at step START + LENGTH - 1."""
    if length <= 1:
        return 0.0
    return lr_start * max(0.0, (start + length - 1 - step) / (length - 1))


def wsd(step: int, *, lr_peak: float, warmup_steps: int, total_steps: int, decay_fraction: float) -> float:
    w = warmup(step, lr_peak, warmup_steps)
    if w is not None:
        return w
    decay = round(decay_fraction * total_steps)
    start = total_steps - decay
    if decay <= 0 or step < start:
        return lr_peak
    return linear_to_zero(step, lr_peak, start, decay)


def _hybrid_joint(lr_peak, lr_min, warmup_steps, total_steps, cosine_fraction, horizon):
    """(joint step J, a, b) of the inverse-sqrt tail a / sqrt(s + b) matching the cosine's value and slope at J."""
    joint = round(cosine_fraction * total_steps)
    span = horizon - warmup_steps
    p = (joint - warmup_steps) / span
    value = lr_min + (lr_peak - lr_min) * 0.5 * (1 + math.cos(math.pi * p))
    slope = -(lr_peak - lr_min) * 0.5 * math.sin(math.pi * p) * math.pi / span
    if slope >= 0:
        raise ValueError("hybrid schedule: the cosine must still be decreasing at the joint (horizon too short)")
    t_plus_b = -value / (2 * slope)  # f'/f = -1 / (2 (t + b))
    return joint, value * math.sqrt(t_plus_b), t_plus_b - joint


def hybrid(step: int, *, lr_peak: float, lr_min: float, warmup_steps: int, total_steps: int,
           cosine_fraction: float = 0.25, cosine_horizon_steps: int) -> float:
    w = warmup(step, lr_peak, warmup_steps)
    if w is not None:
        return w
    joint, a, b = _hybrid_joint(lr_peak, lr_min, warmup_steps, total_steps, cosine_fraction, cosine_horizon_steps)
    if step < joint:
        p = (step - warmup_steps) / (cosine_horizon_steps - warmup_steps)
        return lr_min + (lr_peak - lr_min) * 0.5 * (1 + math.cos(math.pi * p))
    return a / math.sqrt(step + b)


def calibrate_hybrid_horizon(target_step: int, target_lr: float, *, lr_peak: float, lr_min: float,
                             warmup_steps: int, total_steps: int, cosine_fraction: float = 0.25) -> float:
    """The cosine horizon H for which hybrid(target_step) == target_lr (bisection; lr(target) grows with H)."""
    joint = round(cosine_fraction * total_steps)
    lo, hi = joint + 1.0, 100.0 * total_steps

    def at(h):
        j, a, b = _hybrid_joint(lr_peak, lr_min, warmup_steps, total_steps, cosine_fraction, h)
        return a / math.sqrt(target_step + b)

    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if at(mid) < target_lr:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass
class Schedule:
    """A schedule with its parameters: call it with a step."""

    kind: str
    lr_peak: float
    total_steps: int
    warmup_steps: int = 0
    lr_min: float = 0.0
    decay_fraction: float = 0.2
    cosine_fraction: float = 0.25
    cosine_horizon_steps: int | None = None
    start_step: int = 0  # linear: where the decay starts

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "hybrid" and not self.cosine_horizon_steps:
            raise ValueError("schedule hybrid: cosine_horizon_steps is required")

    def __call__(self, step: int) -> float:
        if self.kind == "cosine":
            return cosine(step, lr_peak=self.lr_peak, lr_min=self.lr_min, warmup_steps=self.warmup_steps,
                          total_steps=self.total_steps)
        if self.kind == "wsd":
            return wsd(step, lr_peak=self.lr_peak, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                       decay_fraction=self.decay_fraction)
        if self.kind == "hybrid":
            return hybrid(step, lr_peak=self.lr_peak, lr_min=self.lr_min, warmup_steps=self.warmup_steps,
                          total_steps=self.total_steps, cosine_fraction=self.cosine_fraction,
                          cosine_horizon_steps=self.cosine_horizon_steps)
        if self.kind == "linear":
            return linear_to_zero(step, self.lr_peak, self.start_step, self.total_steps - self.start_step)
        return warmup(step, self.lr_peak, self.warmup_steps) or self.lr_peak
