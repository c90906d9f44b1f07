"""Benchmark: tokens/s of a training step, slm's model against transformers' with the same config, in one run.

    python benchmarks/train_step.py [--threads N] [--rounds 5] [--steps 3] [--device cpu|cuda] [--shapes ...]
                                    [--bf16] [--engines]

A step is forward, backward, AdamW (torch's fused implementation, as slm's loop uses, for both) and zero_grad, on the same batch of
random tokens, from the same weights. slm and transformers alternate round by round so that both see the same
machine; the median round counts. Prints tokens/s of each and the ratio (target on a CPU: >= 1.2x).

--bf16 (CPU): slm's step in fp32 against bf16 autocast (what train.dtype auto picks on CPUs with avx512_bf16 or
AMX), after a bf16 against fp32 matrix-product measurement; on a CPU without bf16 units torch emulates bf16, many
times slower, and the step comparison is skipped unless --bf16-step forces it.

--engines (CPU): the tiny recipe's step (16 x 256 tokens) on 1 process (gradient accumulation 2) against 2 processes
under torchrun with DDP, FSDP and DeepSpeed ZeRO-1 (8 sequences each), the same global batch. On one 2-core machine
the processes share the cores (1 thread each against 2 for the single process) and talk over gloo: the ratio shows
the engines' overhead, not a speed-up, which needs more devices.

Shapes: tiny (the tiny recipe: StableLM 2 architecture, 7.6M parameters, vocab 8192) and ~50M (StableLM 2 and
SmolLM2/Llama architectures); smollm2-135m (the recipe's shape at sequence 2048, 2 sequences: minutes per round, so
run it alone: --shapes smollm2-135m --rounds 2 --steps 1) and smollm2-135m-1seq (one sequence, where slm expands
the 3 kv heads for SDPA's CPU backward and transformers keeps them grouped). --packed N packs each row with N
documents, as pre-training runs: slm attends within each (segment ids), transformers through the positions and a
[B, 1, T, T] document mask (its way to train on packed rows with SDPA); the logits are checked equal first. Each
row shows slm fp32, slm with train.dtype auto (bf16 autocast on a CPU with bf16 units, else fp32 itself) and
transformers fp32, alternating in one run. On a GPU (--device cuda) it also reports MFU for the smollm2-360m and
stablelm-2-1_6b shapes (bf16 autocast, FLOPs per token 6N + 12 L H T against the device's peak).
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
import subprocess
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
# SmolLM2-135M's recipe shape at its pre-training sequence length: 2 sequences of 2048 tokens fit in 8 GB for slm
# (the planner: 7.5 GiB); run it alone with --shapes smollm2-135m --rounds 2 --steps 1 (a step is ~3.3 TFLOP).
CPU_REAL_SHAPES = {
    "smollm2-135m": (ModelConfig(family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                                 num_kv_heads=3, intermediate_size=1536, tie_embeddings=True, max_seq_len=2048,
                                 init_std=0.0417), 2, 2048),
}
CPU_REAL_SHAPES["smollm2-135m-1seq"] = (CPU_REAL_SHAPES["smollm2-135m"][0], 1, 2048)
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


def packed_segments(batch: int, seq: int, documents: int, seed: int = 0) -> torch.Tensor:
    """Segment ids [batch, seq] of rows packed with DOCUMENTS documents each, cut at random places."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        for cut in torch.randperm(seq - 1, generator=g)[:documents - 1].add(1).tolist():
            seg[b, cut:] += 1
    return seg


def make_steps(cfg, batch, seq, device, autocast, compile_slm=False, documents: int = 1):
    """slm's and transformers' training steps on the same batch. DOCUMENTS > 1: rows packed with that many
    documents; slm gets their segment ids, transformers the positions and the [B, 1, T, T] boolean mask of causal
    attention within each document (how transformers trains on packed rows with SDPA), built once outside the
    step; both models' logits on the batch are checked equal first."""
    torch.manual_seed(0)
    slm_model = build(cfg, "cpu", seed=0).to(device)
    hf = hf_model(cfg, slm_model, device)
    forward = torch.compile(slm_model) if compile_slm else slm_model
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    opt_slm = torch.optim.AdamW(slm_model.parameters(), lr=1e-4, fused=True)  # the same optimizer for both
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    seg, hf_kwargs = None, {}
    if documents > 1:
        from slm.model.transformer import document_mask, positions_from_segments

        seg = packed_segments(batch, seq, documents).to(device)
        hf_kwargs = {"position_ids": positions_from_segments(seg), "attention_mask": document_mask(seg, "sdpa")}
        with torch.no_grad():
            diff = (slm_model(tokens[:1, :-1], segment_ids=seg[:1])
                    - hf(input_ids=tokens[:1, :-1], **{k: v[:1] for k, v in hf_kwargs.items()}).logits).abs().max()
        if diff > 1e-3:
            raise SystemExit(f"packed rows: slm's and transformers' logits differ by {float(diff):.3g}")

    step_slm = _mfu_step(forward, tokens, opt_slm, autocast, seg)

    def step_hf():
        with autocast():
            loss = hf(input_ids=tokens[:, :-1], labels=tokens[:, :-1], **hf_kwargs).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    return slm_model, step_slm, step_hf, opt_slm, tokens, seg


def _mfu_step(model, tokens, opt, autocast, segment_ids=None):
    """One slm training step (forward with the fused loss, backward, AdamW) on a fixed batch."""
    def step():
        with autocast():
            s, n = model(tokens[:, :-1], segment_ids=segment_ids, targets=tokens[:, 1:])
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


def matmul_gflops(dtype: torch.dtype, n: int = 1024) -> float:
    """GFLOP/s of an n x n matrix product in DTYPE (as many repeats as fit in about a second)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = time.perf_counter()
    a @ b
    reps = max(1, min(20, int(1.0 / max(time.perf_counter() - t, 1e-6))))
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def bf16_rows(args, results: dict) -> None:
    """slm's CPU step in fp32 against bf16 autocast, alternating round by round, from the same weights."""
    from slm.train.engine import cpu_has_bf16

    fast = cpu_has_bf16()
    f32, b16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    results["matmul_gflops"] = {"fp32": round(f32, 1), "bf16": round(b16, 1), "cpu_has_bf16": fast}
    print(f"\nmatrix product 1024^2, {torch.get_num_threads()} threads: fp32 {f32:,.1f} GFLOP/s, bf16 {b16:,.1f} "
          f"GFLOP/s ({b16 / f32:.2f}x); bf16 units (avx512_bf16 / AMX): {'yes' if fast else 'no'}, so train.dtype "
          f"auto trains in {'bf16' if fast else 'fp32'} here")
    if not fast and not args.bf16_step:
        print("(no bf16 units: the step comparison would take minutes of emulated bf16; --bf16-step runs it anyway)")
        return
    print("\n| shape | params | batch x seq | fp32 tok/s | bf16 autocast tok/s | ratio |\n|---|---:|---:|---:|---:|---:|")
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    for name in args.shapes:
        cfg, batch, seq = SHAPES[name]
        steps = {}
        for label, autocast in (("fp32", contextlib.nullcontext), ("bf16", bf16)):
            model = build(cfg, "cpu", seed=0)
            tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            steps[label] = _mfu_step(model, tokens, opt, autocast)
            steps[label]()  # warm up
        times = {k: [] for k in steps}
        for _ in range(args.rounds):
            for k, fn in steps.items():
                times[k].append(timed(fn, args.steps, torch.device("cpu")))
        a, b = (batch * seq / statistics.median(times[k]) for k in ("fp32", "bf16"))
        results[name + "-bf16"] = {"fp32_tokens_per_s": round(a, 1), "bf16_tokens_per_s": round(b, 1),
                                   "ratio": round(b / a, 3)}
        print(f"| {name} | {cfg_params(cfg) / 1e6:.1f}M | {batch} x {seq} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")


def cfg_params(cfg: ModelConfig) -> int:
    return build(cfg, "meta", seed=0).num_parameters()


ENGINE_RUNS = (("single", 1), ("ddp", 2), ("fsdp", 2), ("deepspeed", 2))
ENGINE_GLOBAL_BATCH = 16  # sequences of the tiny shape's 256 tokens: the tiny recipe's step


def engine_worker(name: str, rounds: int, steps: int) -> None:
    """One process of an --engines measurement (under torchrun for 2): slm's engine API, as the training loop uses
    it, on random tokens; rank 0 prints tokens/s as JSON."""
    from slm.train import dist, engine
    from slm.train.config import TrainSettings

    d = dist.setup("cpu")
    cfg, micro, seq = SHAPES["tiny"][0], ENGINE_GLOBAL_BATCH // 2, SHAPES["tiny"][2]
    accumulation = ENGINE_GLOBAL_BATCH // (micro * d.world)
    t = TrainSettings(tokens_per_step=ENGINE_GLOBAL_BATCH * seq, micro_batch_size=micro, dtype="fp32", engine=name)
    model = build(cfg, "cpu", seed=0)
    eng = engine.build(engine.resolve_engine(name, d), d, model, t, accumulation, micro)
    eng.set_lr(1e-4)
    g = torch.Generator().manual_seed(d.rank)
    batches = [torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=g) for _ in range(accumulation)]
    n_global = float(ENGINE_GLOBAL_BATCH * seq)

    def step():
        loss_sum = torch.zeros(())
        for i, tokens in enumerate(batches):
            last = i == accumulation - 1
            with eng.accumulating(last):
                s, _ = eng.forward_model(tokens[:, :-1], targets=tokens[:, 1:])
                loss_sum += s.detach()
                if last:
                    dist.all_reduce_sum(loss_sum, d)
                eng.backward(s * (d.world / n_global), last)
        eng.finish_step(True)

    step()
    step()
    times = []
    for _ in range(rounds):
        dist.barrier(d)
        times.append(timed(step, steps, torch.device("cpu")))
    if d.main:
        print(json.dumps({"engine": eng.describe(), "processes": d.world, "threads": torch.get_num_threads(),
                          "tokens_per_s": round(ENGINE_GLOBAL_BATCH * seq / statistics.median(times), 1)}))
    dist.teardown(d)


def engines_rows(args, results: dict) -> None:
    print("\n| engine | processes x threads | tokens/s | vs 1 process |\n|---|---:|---:|---:|")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    base = None
    for name, nproc in ENGINE_RUNS:
        worker = [os.path.abspath(__file__), "--engine-worker", name, "--rounds", str(args.rounds), "--steps",
                  str(args.steps)]
        if nproc == 1:
            cmd, run_env = [sys.executable, *worker], {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
        else:
            cmd, run_env = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={nproc}", *worker], env
        proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {name} | {nproc} | failed: {tail} | - |")
            continue
        r = json.loads(lines[-1])
        base = base or r["tokens_per_s"]
        results["engine-" + name] = r
        print(f"| {r['engine']} | {r['processes']} x {r['threads']} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base:.2f}x |")
    print("(one machine's cores shared by the processes: this is the engines' overhead, not a speed-up)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--compile", action="store_true", help="torch.compile slm's model (train.compile: true)")
    ap.add_argument("--packed", type=int, default=1, metavar="N",
                    help="rows packed with N documents each (attention within each; default 1: plain causal rows)")
    ap.add_argument("--bf16", action="store_true", help="CPU: fp32 against bf16 autocast (train.dtype auto)")
    ap.add_argument("--bf16-step", action="store_true", help="run the bf16 step even without bf16 units")
    ap.add_argument("--engines", action="store_true", help="CPU: 1 process against DDP, FSDP, DeepSpeed ZeRO-1 on 2")
    ap.add_argument("--only", action="store_true", help="with --bf16 / --engines: skip the slm vs transformers table")
    ap.add_argument("--engine-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.packed < 1:
        ap.error(f"--packed {args.packed}: expected a number of documents a row, 1 or more")
    if args.engine_worker:
        return engine_worker(args.engine_worker, args.rounds, args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          f"{', slm compiled' if args.compile else ''}", file=sys.stderr)
    results = {}
    from slm.train.config import TrainSettings
    from slm.train.engine import compute_dtype

    # train.dtype auto on this device: bf16 autocast where the CPU has bf16 units, else fp32 (the same step)
    auto_bf16 = device.type == "cpu" and compute_dtype(TrainSettings(), device) == "bf16"
    if not args.only:
        print(f"train.dtype auto here: {'bf16 autocast' if auto_bf16 else 'fp32'}", file=sys.stderr)
        print("| shape | params | batch x seq | slm fp32 tok/s | slm auto tok/s | transformers fp32 tok/s | slm fp32 / "
              "transformers | slm auto / transformers |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in ([] if args.only else args.shapes):
        cfg, batch, seq = {**SHAPES, **CPU_REAL_SHAPES, **GPU_SHAPES}[name]
        model, step_slm, step_hf, opt_slm, tokens_in, seg = make_steps(cfg, batch, seq, device, autocast,
                                                                       args.compile, args.packed)
        steps = {"slm": step_slm, "hf": step_hf}
        if auto_bf16:
            steps["auto"] = _mfu_step(model, tokens_in, opt_slm, lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                                      seg)
        for fn in list(steps.values()) * (1 if seq >= 2048 else 2):  # warm up each
            fn()
        times = {k: [] for k in steps}
        for _ in range(args.rounds):
            for k, fn in steps.items():
                times[k].append(timed(fn, args.steps, device))
        tokens = batch * seq
        rate = {k: tokens / statistics.median(v) for k, v in times.items()}
        s, h = rate["slm"], rate["hf"]
        a = rate.get("auto", s)
        label = name if args.packed <= 1 else f"{name}, {args.packed} documents a row"
        results[label] = {"slm_tokens_per_s": round(s, 1), "slm_auto_tokens_per_s": round(a, 1),
                         "auto_dtype": "bf16" if auto_bf16 else "fp32", "transformers_tokens_per_s": round(h, 1),
                         "ratio": round(s / h, 3), "auto_ratio": round(a / h, 3)}
        auto_cell = f"{a:,.0f}" if auto_bf16 else "= fp32"
        print(f"| {label} | {model.num_parameters() / 1e6:.1f}M | {batch} x {seq} | {s:,.0f} | {auto_cell} | "
              f"{h:,.0f} | {s / h:.2f}x | {a / h:.2f}x |")
        if auto_bf16 and a < s:
            print(f"  ({name}: bf16 autocast loses to fp32 at this shape on this CPU: train.dtype fp32 is the faster "
                  "choice here)", file=sys.stderr)
        del model, steps, opt_slm
    if args.bf16 and device.type == "cpu":
        bf16_rows(args, results)
    if args.engines and device.type == "cpu":
        engines_rows(args, results)
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
