"""Benchmark: a DPO step with the reference's log-probabilities cached, against an SFT step over the same tokens,
and against a DPO step that runs the reference model on the fly, in one run.

    python benchmarks/dpo_step.py [--threads N] [--rounds 5] [--steps 3] [--pairs 4] [--length 256] [--device cpu]

A step is forward, backward, AdamW and zero_grad on P pairs (2P sequences of LENGTH tokens, the answer being the
second half of each), for the tiny recipe's model. The SFT step takes the same 2P sequences with the language-model
loss on the same answer tokens. The three alternate round by round; the median round counts. Target: cached DPO
<= 1.1x the SFT step (the chosen and rejected sequences of a pair go through the policy in one batch; the
per-token log-probabilities' backward recomputes the output layer's logits chunk by chunk instead of keeping them).
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder holds tokenize.py, which must not shadow the standard library's tokenize

import argparse
import contextlib
import json
import statistics
import time

import numpy as np
import torch

from slm.model.transformer import ModelConfig, build
from slm.train.preference import EncodedPair, make_loss_fn, pair_batch, sequence_logprobs

TINY = ModelConfig(family="stablelm", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                   intermediate_size=768, partial_rotary_factor=0.25, qkv_bias=True, max_seq_len=512)


def timed(fn, steps: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    rng = np.random.default_rng(0)
    L, half = args.length, args.length // 2
    pairs = []
    for _ in range(args.pairs):
        prompt = rng.integers(0, TINY.vocab_size, half)
        pairs.append(EncodedPair(np.concatenate([prompt, rng.integers(0, TINY.vocab_size, L - half)]),
                                 np.concatenate([prompt, rng.integers(0, TINY.vocab_size, L - half)]), half, half))
    ref_model = build(TINY, "cpu", seed=1).to(device).eval()
    probe = pair_batch(pairs, None, 0, device)
    with torch.no_grad(), autocast():
        ref = sequence_logprobs(ref_model, probe, average=False).float()
    cached = pair_batch(pairs, ref, 0, device)
    loss_fn = make_loss_fn(0.1, "sigmoid")

    def make(kind):
        model = build(TINY, "cpu", seed=0).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step():
            with autocast():
                if kind == "sft":
                    s, n = model(cached.input_ids, targets=cached.targets)
                    loss = s / n
                elif kind == "dpo-cached":
                    s, _ = loss_fn(model, cached)
                    loss = s / args.pairs
                else:  # the reference runs every step
                    with torch.no_grad():
                        r = sequence_logprobs(ref_model, probe, average=False).float()
                    s, _ = loss_fn(model, pair_batch(pairs, r, 0, device))
                    loss = s / args.pairs
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    steps = {k: make(k) for k in ("sft", "dpo-cached", "dpo-on-the-fly")}
    for fn in steps.values():
        fn()
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, fn in steps.items():
            times[k].append(timed(fn, args.steps, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; {args.pairs} pairs of "
          f"{L} tokens (the answer: {L - half}), tiny model", file=sys.stderr)
    print("| step | ms | vs SFT |\n|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v * 1000:,.1f} | {v / med['sft']:.2f}x |")
    print(json.dumps({k: round(v * 1000, 2) for k, v in med.items()}
                     | {"cached_vs_sft": round(med["dpo-cached"] / med["sft"], 3),
                        "on_the_fly_vs_cached": round(med["dpo-on-the-fly"] / med["dpo-cached"], 3)}))


if __name__ == "__main__":
    main()
