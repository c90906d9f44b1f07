"""Benchmark: batched sampling with a KV cache (slm.inference.sampling.generate_batch, what `slm selfknow generate`
runs) against the same prompts one at a time with the same cache code, in one run.

    python benchmarks/generate_batch.py [--threads N] [--prompts 64] [--batch 64] [--new 64] [--rounds 3] [--device cpu]

The tiny recipe's model (random weights) continues PROMPTS prompts of 20-120 tokens for NEW tokens each (no stop
token, so every row runs to the end and both sides generate the same number of tokens). Prints generated tokens/s
for both and the ratio; the median round counts. Target: batched >= 5x one at a time on a CPU at batch 64 (the
matrix products of a decode step then have 64 rows instead of one).
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder holds tokenize.py, which must not shadow the standard library's tokenize

import argparse
import json
import random
import statistics
import time

import torch

from slm.inference.sampling import generate_batch
from slm.model.transformer import ModelConfig, build

TINY = ModelConfig(family="stablelm", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                   intermediate_size=768, partial_rotary_factor=0.25, qkv_bias=True, max_seq_len=512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(TINY, device, seed=0).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(8000) for _ in range(rng.randint(20, 120))] for _ in range(args.prompts)]
    total = args.prompts * args.new

    def batched():
        for i in range(0, len(prompts), args.batch):
            generate_batch(model, prompts[i:i + args.batch], args.new, 1.0, 0, 1.0, set(), torch.Generator())

    def one_by_one():
        for p in prompts:
            generate_batch(model, [p], args.new, 1.0, 0, 1.0, set(), torch.Generator())

    times = {"batched": [], "one_by_one": []}
    for _ in range(args.rounds):
        for name, fn in (("batched", batched), ("one_by_one", one_by_one)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    b, s = statistics.median(times["batched"]), statistics.median(times["one_by_one"])
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "prompts": args.prompts,
                      "batch": args.batch, "new_tokens": args.new, "batched_tokens_per_s": round(total / b, 1),
                      "one_by_one_tokens_per_s": round(total / s, 1), "speedup": round(s / b, 2)}))


if __name__ == "__main__":
    main()
