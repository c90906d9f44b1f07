"""Benchmark: time for slm to write GGUF files (f16 and q4_0 by gguf-py, q5_k_m by llama.cpp's quantizer from the
f16 file) for the tiny recipe's model and a ~50M model, against llama.cpp's own tools when they are at hand.

    python benchmarks/quantize.py [--rounds 3] [--llama-cpp DIR]

--llama-cpp DIR (or $LLAMA_CPP_DIR): a llama.cpp checkout with convert_hf_to_gguf.py (and a built llama-quantize
in DIR/build/bin): the same checkpoint is then converted to f16 and q4_0 by convert_hf_to_gguf.py and quantized to
q5_k_m by llama-quantize, and the ratio slm / llama.cpp is printed. Without it only slm's times are printed
(pip's llama-cpp-python ships neither the script nor the binary). Median of --rounds; weights are random.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder holds tokenize.py, which must not shadow the standard library's tokenize

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"))
    args = ap.parse_args()
    import importlib.util

    spec = importlib.util.spec_from_file_location("slm_benchmark_decode", Path(__file__).with_name("decode.py"))
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    make_checkpoint = decode.make_checkpoint

    from slm.formats.checkpoint import Checkpoint
    from slm.formats.gguf import write_gguf, LLAMA_CPP_TYPES
    from slm.inference.llamacpp import quantize_gguf

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, hidden, layers in (("tiny (7.6M)", 256, 4), ("~50M", 512, 8)):
            d = Path(tmp) / label.split()[0].strip("~")
            d.mkdir()
            ckpt = Checkpoint.open(make_checkpoint(d, hidden, layers, 200))
            row = {"model": label, "params": sum(v.numel() for v in ckpt.state_dict().values())}
            row["slm_f16_s"] = timed(lambda: write_gguf(ckpt, d / "f16.gguf", "f16"), args.rounds)
            row["slm_q4_0_s"] = timed(lambda: write_gguf(ckpt, d / "q4_0.gguf", "q4_0"), args.rounds)
            try:
                row["slm_q5_k_m_s"] = timed(lambda: quantize_gguf(d / "f16.gguf", d / "q5.gguf",
                                                                  LLAMA_CPP_TYPES["q5_k_m"], None, "q5_k_m"), args.rounds)
            except Exception as e:  # noqa: BLE001 - reported in the output
                row["slm_q5_k_m_s"] = f"unavailable: {e}"
            if args.llama_cpp:
                lc = Path(args.llama_cpp)
                conv = [sys.executable, str(lc / "convert_hf_to_gguf.py"), str(ckpt.dir)]
                row["llama_cpp_f16_s"] = timed(lambda: subprocess.run(
                    conv + ["--outtype", "f16", "--outfile", str(d / "lc-f16.gguf")], check=True,
                    capture_output=True), args.rounds)
                row["llama_cpp_q4_0_s"] = timed(lambda: subprocess.run(
                    [str(lc / "build" / "bin" / "llama-quantize"), str(d / "lc-f16.gguf"), str(d / "lc-q4.gguf"),
                     "Q4_0"], check=True, capture_output=True), args.rounds)
                row["f16_ratio_slm_over_llama_cpp"] = round(row["slm_f16_s"] / row["llama_cpp_f16_s"], 2)
            else:
                row["llama_cpp"] = "not at hand (give --llama-cpp DIR with convert_hf_to_gguf.py)"
            out.append({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
