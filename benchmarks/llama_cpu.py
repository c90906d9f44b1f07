"""Benchmark: what llama.cpp's CPU-specific kernels are worth here, one CPU backend variant at a time.

    python benchmarks/llama_cpu.py FILE.gguf [FILE.gguf ...] [--prompt 128 --gen 128 --rounds 3] [--threads N]

Needs llama-cpp-python built with every CPU variant of llama.cpp's CPU backend, as scripts/setup.sh builds it
(CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"): x64 (no instruction-set flags),
sse42, sandybridge (AVX), ivybridge (+F16C), piledriver (+FMA), haswell (AVX2, BMI2: what a single-backend
GGML_NATIVE=OFF build compiles), skylakex / cannonlake / cascadelake / icelake / cooperlake / zen4 (AVX-512 and its
extensions), alderlake (AVX-VNNI), sapphirerapids (AMX). Each variant this CPU can run (its ggml_backend_score is
above 0) is loaded alone, in a fresh process, and decodes each file as `slm bench` does (greedy, a random prompt,
median of --rounds); then the variant slm loads (llama.cpp's pick, or the best other one where llama.cpp's AMX
variant faults: slm.inference.llamacpp). A variant killed by a signal is shown as crashed. Prints one JSON line per
(variant, file) and a Markdown table of generation tokens/s with each variant's ratio to the picked one.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder holds tokenize.py, which must not shadow the standard library's tokenize

import argparse
import ctypes
import json
import signal
import statistics
import subprocess
from pathlib import Path


def variants() -> list[Path]:
    """The build's CPU variant files (SystemExit when the build has none)."""
    from slm.inference.llamacpp import cpu_variants

    found = cpu_variants()
    if found:
        return found
    raise SystemExit("this llama-cpp-python has one built-in CPU backend, no variants to compare: build it with "
                     'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON" '
                     "(scripts/setup.sh does)")


def child(variant: str, files: list[str], prompt: int, gen: int, rounds: int, threads: int | None) -> None:
    """Load VARIANT (a file, or 'picked': llama.cpp's own choice), then decode FILES; one JSON line each."""
    import llama_cpp
    import numpy as np

    from slm.inference.llamacpp import _ggml_library, cpu_backend, variant_name
    from slm.stages.bench import LlamaCppRunner

    if variant != "picked":
        ggml = _ggml_library(Path(llama_cpp.__file__).resolve().parent)
        ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load.restype = ctypes.c_void_p
        if not ggml.ggml_backend_load(variant.encode()):
            raise SystemExit(f"{variant}: llama.cpp did not load it")
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 1000, prompt)]
    for f in files:
        r = LlamaCppRunner(Path(f), threads, prompt + gen + 8)  # threads None: every usable core
        r.run(ids[:16], 4, 1)  # warm-up
        tg = statistics.median(len(t) / sum(t) for t in (r.run(ids, gen, 1)[1] for _ in range(rounds)))
        print(json.dumps({"variant": "picked" if variant == "picked" else variant_name(Path(variant)),
                          "cpu_backend": cpu_backend(), "file": Path(f).name, "tg_tokens_per_s": round(tg, 1)}),
              flush=True)
        r.llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.files, args.prompt, args.gen, args.rounds, args.threads)
    from slm.inference.llamacpp import variant_name, variant_score

    found = variants()
    d = found[0].parent
    runnable = [(p, s) for p in found if (s := variant_score(p)) > 0]
    print(f"{len(found)} variants in {d}; this CPU runs {len(runnable)}: "
          + ", ".join(f"{variant_name(p)} (score {s})" for p, s in runnable), file=sys.stderr)
    rows = []
    for variant in [str(p) for p, _ in sorted(runnable, key=lambda x: x[1])] + ["picked"]:
        cmd = [sys.executable, os.path.abspath(__file__), *args.files, "--child", variant, "--prompt",
               str(args.prompt), "--gen", str(args.gen), "--rounds", str(args.rounds)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode < 0 and variant != "picked":  # a variant that faults here (the AMX one on some VMs)
            crash = signal.Signals(-out.returncode).name
            print(f"{variant_name(Path(variant))}: killed by {crash}", file=sys.stderr)
            rows += [{"variant": variant_name(Path(variant)), "file": Path(f).name, "tg_tokens_per_s": None,
                      "crashed": crash} for f in args.files]
            continue
        if out.returncode != 0:
            last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit code {out.returncode}"
            raise SystemExit(f"{variant}: {last}")
        for line in out.stdout.splitlines():
            print(line, flush=True)
            rows.append(json.loads(line))
    picked = {r["file"]: r for r in rows if r["variant"] == "picked"}
    files = list(picked)
    print("\n| variant | " + " | ".join(f"{f} tg t/s (vs picked)" for f in files) + " |")
    print("|---|" + "---:|" * len(files))
    for v in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for f in files:
            r = next(x for x in rows if x["variant"] == v and x["file"] == f)
            if r["tg_tokens_per_s"] is None:
                cells.append(f"crashed ({r['crashed']})")
                continue
            cells.append(f"{r['tg_tokens_per_s']} ({r['tg_tokens_per_s'] / picked[f]['tg_tokens_per_s']:.2f}x)")
        label = f"picked: {picked[files[0]]['cpu_backend']}" if v == "picked" else v
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
