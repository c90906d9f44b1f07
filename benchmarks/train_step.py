"""Benchmark: tokens/s of a training step, slm's model against transformers' with the same config, in one run.

    python benchmarks/train_step.py [--threads N] [--rounds 5] [--steps 3] [--device cpu|cuda] [--shapes ...]

A step is forward, backward, AdamW (torch's fused implementation, as slm's loop uses, for both) and zero_grad, on the same batch of
random tokens, from the same weights. slm and transformers alternate round by round so that both see the same
machine; the median round counts. Prints tokens/s of each and the ratio (target on a CPU: >= 1.3x).

Shapes: tiny (the tiny recipe: StableLM 2 architecture, 7.6M parameters, vocab 8192) and ~50M (StableLM 2 and
SmolLM2/Llama architectures). On a GPU (--device cuda) it also reports MFU for the smollm2-360m and stablelm-2-1_6b
shapes (bf16 autocast, FLOPs per token 6N + 12 L H T against the device's peak).
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder holds tokenize.py, which must not shadow the standard library's tokenize

import argparse
import json
import statistics
import time

import torch

from slm.model.hf import to_hf_config, to_hf_state_dict
from slm.model.transformer import ModelConfig, build

SHAPES = {
    "tiny": (ModelConfig(family="stablelm", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                         intermediate_size=768, partial_rotary_factor=0.25, qkv_bias=True, max_seq_len=512), 16, 256),
    "stablelm-50m": (ModelConfig(family="stablelm", vocab_size=16384, hidden_size=512, num_layers=10, num_heads=8,
                                 num_kv_heads=8, intermediate_size=1536, partial_rotary_factor=0.25, qkv_bias=True,
                                 max_seq_len=1024), 4, 512),
    "llama-50m": (ModelConfig(family="llama", vocab_size=16384, hidden_size=512, num_layers=12, num_heads=8,
                              num_kv_heads=4, intermediate_size=1536, tie_embeddings=True, max_seq_len=1024), 4, 512),
}
GPU_SHAPES = {
    "smollm2-360m": (ModelConfig(family="llama", vocab_size=49152, hidden_size=960, num_layers=32, num_heads=15,
                                 num_kv_heads=5, intermediate_size=2560, tie_embeddings=True, max_seq_len=2048), 8, 2048),
    "stablelm-2-1_6b": (ModelConfig(family="stablelm", vocab_size=100352, hidden_size=2048, num_layers=24, num_heads=32,
                                    num_kv_heads=32, intermediate_size=5632, partial_rotary_factor=0.25, qkv_bias=True,
                                    max_seq_len=4096), 2, 4096),
}


def hf_model(cfg: ModelConfig, slm_model, device):
    import transformers

    conf = {k: v for k, v in to_hf_config(cfg, 0, 0).items() if k != "architectures"}
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**conf),
                                                         attn_implementation="sdpa", dtype=torch.float32)
    model.load_state_dict(to_hf_state_dict(slm_model.state_dict(), cfg), strict=False)
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.to(device)


def make_steps(cfg, batch, seq, device, autocast, compile_slm=False):
    torch.manual_seed(0)
    slm_model = build(cfg, "cpu", seed=0).to(device)
    hf = hf_model(cfg, slm_model, device)
    forward = torch.compile(slm_model) if compile_slm else slm_model
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    opt_slm = torch.optim.AdamW(slm_model.parameters(), lr=1e-4, fused=True)  # the same optimizer for both
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

    step_slm = _mfu_step(forward, tokens, opt_slm, autocast)

    def step_hf():
        with autocast():
            loss = hf(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    return slm_model, step_slm, step_hf


def _mfu_step(model, tokens, opt, autocast):
    """One slm training step (forward with the fused loss, backward, AdamW) on a fixed batch."""
    def step():
        with autocast():
            s, n = model(tokens[:, :-1], targets=tokens[:, 1:])
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn, steps, device) -> float:
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--compile", action="store_true", help="torch.compile slm's model (train.compile: true)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        import contextlib

        autocast = contextlib.nullcontext
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          f"{', slm compiled' if args.compile else ''}", file=sys.stderr)
    print("| shape | params | batch x seq | slm tok/s | transformers tok/s | ratio |\n|---|---:|---:|---:|---:|---:|")
    results = {}
    for name in args.shapes:
        cfg, batch, seq = SHAPES[name] if name in SHAPES else GPU_SHAPES[name]
        model, step_slm, step_hf = make_steps(cfg, batch, seq, device, autocast, args.compile)
        for fn in (step_slm, step_hf, step_slm, step_hf):  # warm up both
            fn()
        slm_t, hf_t = [], []
        for _ in range(args.rounds):
            slm_t.append(timed(step_slm, args.steps, device))
            hf_t.append(timed(step_hf, args.steps, device))
        tokens = batch * seq
        s, h = tokens / statistics.median(slm_t), tokens / statistics.median(hf_t)
        results[name] = {"slm_tokens_per_s": round(s, 1), "transformers_tokens_per_s": round(h, 1), "ratio": round(s / h, 3)}
        print(f"| {name} | {model.num_parameters() / 1e6:.1f}M | {batch} x {seq} | {s:,.0f} | {h:,.0f} | {s / h:.2f}x |")
        del model
    if device.type == "cuda":
        from slm.train.metrics import peak_flops

        peak = peak_flops(device)
        print("\n| shape (bf16, slm) | tokens/s | MFU |\n|---|---:|---:|")
        for name, (cfg, batch, seq) in GPU_SHAPES.items():
            model = build(cfg, "cpu", seed=0).to(device)
            tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            step = _mfu_step(model, tokens, opt, autocast)
            for _ in range(3):
                step()
            dt = statistics.median(timed(step, args.steps, device) for _ in range(args.rounds))
            tps = batch * seq / dt
            mfu = model.flops_per_token(seq) * tps / peak if peak else None
            results[name + "-mfu"] = {"tokens_per_s": round(tps, 1), "mfu": mfu}
            print(f"| {name} | {tps:,.0f} | {mfu:.1%} |" if mfu else f"| {name} | {tps:,.0f} | - |")
            del model, opt, step
    print(json.dumps(results))


if __name__ == "__main__":
    main()
