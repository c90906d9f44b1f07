"""Benchmark: generation speed of slm's backends, in one run on one machine.

    python benchmarks/decode.py [--hidden 512 --layers 8] [--prompt 128 --gen 128 --rounds 3]
                                [--threads N] [--bandwidth GB/s]
    python benchmarks/decode.py --checkpoint DIR [--gguf FILE ...]    # a released model and its GGUF files

1. slm's torch backend (`slm bench`: pretransposed weights, a static KV cache, greedy; eager and with --compile)
   against transformers' `generate` (its own dynamic cache, greedy, same checkpoint, same prompt, same number of new
   tokens): the ratio of generation tokens/s. Target >= 1.5x.
2. The GGUF backend (llama.cpp through llama-cpp-python, f16 and q4_0 files slm writes) as a fraction of the
   memory-bandwidth bound (weight bytes per token / bandwidth, the bandwidth measured as the streaming-read speed of
   a large tensor, or given). Target >= 60%.

The model is a StableLM-2-architecture checkpoint with random weights of the given size (default about 50M
parameters), written to a temporary directory, or --checkpoint: any checkpoint slm reads (a released transformers
directory such as SmolLM2-135M-Instruct included), with --gguf the files to measure instead of f16 and q4_0 written
here (`slm quantize DIR --type q8_0,q4_0,q4_k_m`). Tokens are random ids. Median of --rounds.

The bound counts the bytes a generated token reads: every weight, except the rows of an input embedding that is not
also the output matrix (one row is read per token).
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder holds tokenize.py, which must not shadow the standard library's tokenize

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_checkpoint(d: Path, hidden: int, layers: int, vocab_texts: int) -> Path:
    from slm.formats.checkpoint import write_checkpoint
    from slm.formats.tokenizer import Tokenizer, padded_vocab_size
    from slm.model.transformer import ModelConfig, build
    from slm.stages.tokenize import TrainConfig, train_bpe as train

    corpus = d / "corpus.jsonl"
    import sysconfig

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in
             sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:vocab_texts]]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok_dir = train(TrainConfig(corpus=[str(corpus)], vocab_size=8192, out=d / "tok"))
    tok = Tokenizer(tok_dir)
    cfg = ModelConfig(family="stablelm", vocab_size=padded_vocab_size(tok.n_vocab), hidden_size=hidden,
                      num_layers=layers, num_heads=hidden // 64, num_kv_heads=hidden // 64, intermediate_size=hidden * 3,
                      max_seq_len=1024, partial_rotary_factor=0.25, qkv_bias=True)
    model = build(cfg, seed=0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    return write_checkpoint(d / "run", 1, model_cfg=cfg, state_dict=state, tokenizer_dir=tok_dir, lineage={},
                            train_state={"step": 1}, optimizer=None, rng_state=None, keep=1, bos_id=tok.bos_id,
                            eos_id=tok.eos_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bandwidth", type=float, default=None)
    ap.add_argument("--checkpoint", type=Path, default=None, help="measure this checkpoint instead of a random one")
    ap.add_argument("--gguf", type=Path, nargs="*", default=None, help="GGUF files to measure (with --checkpoint)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from slm.stages.bench import LlamaCppRunner, TorchRunner, measure_bandwidth

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt = args.checkpoint or make_checkpoint(d, args.hidden, args.layers, 200)
        from slm.formats.checkpoint import Checkpoint

        rng = np.random.default_rng(0)
        vocab = Checkpoint.open(ckpt).model_config.vocab_size
        ids = [int(i) for i in rng.integers(0, min(vocab, 8000), args.prompt)]

        # 1. slm's torch backend against transformers' generate
        ours = TorchRunner(ckpt, args.threads, "fp32", args.prompt + args.gen)
        compiled = TorchRunner(ckpt, args.threads, "fp32", args.prompt + args.gen, compile=True)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        prompt = torch.tensor([ids])

        def slm_tg(runner=ours):
            _, times = runner.run(ids, args.gen, 1)
            return len(times) / sum(times)

        def hf_tg():
            with torch.no_grad():
                t = time.perf_counter()
                hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                first = time.perf_counter() - t
                t = time.perf_counter()
                hf.generate(prompt, max_new_tokens=args.gen, min_new_tokens=args.gen, do_sample=False)
                total = time.perf_counter() - t
            return (args.gen - 1) / max(1e-9, total - first)

        t = time.perf_counter()
        slm_tg(), slm_tg(compiled), hf_tg()  # warm-up (and compilation)
        warm = time.perf_counter() - t
        a, c, b = [], [], []
        for _ in range(args.rounds):  # interleaved, so a slow moment of the machine hits all three alike
            a.append(slm_tg())
            c.append(slm_tg(compiled))
            b.append(hf_tg())
        a, b, c = statistics.median(a), statistics.median(b), statistics.median(c)
        n_params = sum(p.numel() for p in hf.parameters())  # a tied output matrix once
        result = {"model": str(args.checkpoint or "random"), "params": n_params, "threads": torch.get_num_threads(),
                  "prompt": args.prompt, "gen": args.gen,
                  "slm_torch_tg_tokens_per_s": round(a, 1), "slm_torch_compiled_tg_tokens_per_s": round(c, 1),
                  "transformers_generate_tg_tokens_per_s": round(b, 1), "torch_speedup": round(a / b, 2),
                  "torch_compiled_speedup": round(c / b, 2), "warm_up_s": round(warm, 1)}

        # 2. the GGUF backend against the bandwidth bound
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            result["gguf"] = "llama-cpp-python is not installed"
        else:
            from slm.formats.gguf import write_gguf
            from slm.inference.llamacpp import cpu_backend

            bandwidth = args.bandwidth or measure_bandwidth()
            result["bandwidth_gb_s"] = round(bandwidth, 2)
            files = {}
            for path in args.gguf or []:
                files[path.stem.rsplit("-", 1)[-1]] = path
            if not args.gguf:
                for kind in ("f16", "q4_0"):
                    files[kind] = d / f"m-{kind}.gguf"
                    write_gguf(Checkpoint.open(ckpt), files[kind], kind)
            for kind, path in files.items():
                r = LlamaCppRunner(path, args.threads, args.prompt + args.gen + 8)
                result["llama_cpp_cpu"] = cpu_backend()
                r.run(ids[:16], 4, 1)
                tg = statistics.median(
                    (lambda t: len(t) / sum(t))(r.run(ids, args.gen, 1)[1]) for _ in range(args.rounds))
                bound = bandwidth * 1e9 / r.weight_bytes
                result[f"gguf_{kind}_tg_tokens_per_s"] = round(tg, 1)
                result[f"gguf_{kind}_bound_tokens_per_s"] = round(bound, 1)
                result[f"gguf_{kind}_fraction_of_bound"] = round(tg / bound, 3)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
