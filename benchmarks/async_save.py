"""Benchmark: what a checkpoint save costs the training step, synchronous against train.async_save, in one run.

    python benchmarks/async_save.py [--work DIR] [--steps 24] [--every 6]

Three `slm pretrain` runs of the same ~50M-parameter StableLM 2 shape (hidden 512, 10 layers, sequences of 512, the
embedded corpus with an 8,192-token tokenizer trained here), one after the other on this machine:
  none    no checkpoint until the end
  sync    a checkpoint every --every steps, written before the next step starts
  async   the same, written in the background (train.async_save: true)
and prints the median step time of the steps that overlap a background write (the step after each save) against
the plain steps, and each run's wall time over the `none` run's. Target (issue 21): the overlapping steps of the
async run within 10% of its plain steps; the sync run shows what a save stalls.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder holds tokenize.py, which must not shadow the standard library's tokenize

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

MODEL = """model:
  family: stablelm
  hidden_size: 512
  num_layers: 10
  num_heads: 8
  num_kv_heads: 8
  intermediate_size: 1536
  max_seq_len: 512
  partial_rotary_factor: 0.25
  qkv_bias: true
train:
  dtype: fp32
  tokens_per_step: 2048
  micro_batch_size: 4
  lr_peak: 1.0e-3
  warmup_steps: 2
  keep: 2
  eval_every: 0
"""


def slm(*args, cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "slm", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"slm {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def prepare(work: Path) -> None:
    if (work / "mix" / "manifest.json").is_file():
        return
    slm("tokenize", "corpus", "--out", "corpus", cwd=work)
    slm("tokenize", "train", "--corpus", "corpus/code/train.jsonl", "--corpus", "corpus/prose/train.jsonl",
        "--vocab-size", "8192", "--out", "tokenizer", cwd=work)
    slm("tokenize", "encode", "--tokenizer", "tokenizer", "corpus/code/train.jsonl", "corpus/prose/train.jsonl",
        "--out", "tokens", cwd=work)
    (work / "mix.yaml").write_text("seq_len: 512\nseed: 1\nsources:\n  all: tokens\n"
                                   "phases:\n  - {name: p, tokens: 2M, weights: {all: 1}}\n")
    slm("mix", "mix.yaml", "--out", "mix", cwd=work)
    (work / "model.yaml").write_text(MODEL)


def run(work: Path, name: str, steps: int, every: int, background: bool) -> dict:
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    wall = slm("pretrain", "--config", "model.yaml", "--data", "mix", "--out", out, "--steps", steps, "--device", "cpu",
               "--set", f"train.save_every={every}", "--set", f"train.async_save={str(background).lower()}", cwd=work)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step_seconds"' in x]
    seconds = {r["step"]: r["step_seconds"] for r in rows}
    # the step after a save (0-based step k + 1 follows the save after k + 1 steps) overlaps its background write
    overlap = {s for s in seconds if every and s % every == 0 and s > 0}
    plain = [v for s, v in seconds.items() if s not in overlap and s >= 2]  # steps 0-1 warm up
    over = [v for s, v in seconds.items() if s in overlap]
    return {"wall_s": round(wall, 2), "plain_step_s": round(statistics.median(plain), 4),
            "overlap_step_s": round(statistics.median(over), 4) if over else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=6)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="slm-async-save-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    results = {"none": run(work, "none", args.steps, 0, False),
               "sync": run(work, "sync", args.steps, args.every, False),
               "async": run(work, "async", args.steps, args.every, True)}
    base = results["none"]["wall_s"]
    print(f"~50M StableLM 2 shape, {args.steps} steps of 4 x 512 tokens, a save every {args.every} steps; "
          f"{len(os.sched_getaffinity(0))} CPUs", file=sys.stderr)
    print("| run | wall s | vs no saves | plain step s | step overlapping a write s | overlapping / plain |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio = f"{r['overlap_step_s'] / r['plain_step_s']:.2f}x" if r["overlap_step_s"] else "-"
        print(f"| {name} | {r['wall_s']:.1f} | {r['wall_s'] / base:.2f}x | {r['plain_step_s']:.3f} | "
              f"{r['overlap_step_s'] if r['overlap_step_s'] is not None else '-'} | {ratio} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
