"""GPU measurements for benchmarks/gpu.sh: MFU of slm's training step at the recipes' real shapes, memory against
the dry-run planner, what deterministic mode costs, and decode speed of the torch backend.

    python benchmarks/gpu.py --out DIR [--junit DIR/gpu-tests.xml] [--shapes smollm2-360m stablelm-2-1_6b]
    python benchmarks/gpu.py --out DIR --check        # the same code on the CPU at a tiny shape (tests use it)

For each shape (the recipe's model and sequence length, bf16 autocast, slm's fused AdamW and output-layer loss,
packed rows with document masking as `slm pretrain` trains them): the largest micro-batch that fits, with
activation checkpointing off and on, its tokens/s, MFU (6N + 12 L H T FLOPs per token against the device's
datasheet peak, slm/devices.py) and peak memory, next to the planner's prediction (slm/train/cost.py, what
`slm pretrain --dry-run` prints); then the fastest setting again under torch.compile. Deterministic mode
(train.deterministic) against the default at the first shape. Decode: tokens/s of the static-cache decoder
(compiled) for the smollm2-135m shape in bf16, batch 1, and the same replayed as a CUDA graph (compile
"reduce-overhead": a 135M step is hundreds of short kernels, whose launches may bound it). The time to build a
batch's FlexAttention block mask against the step it serves.

Writes DIR/gpu.json after every measurement (a run cut short keeps what it measured) and DIR/gpu.md at the end.
Targets (issue 19): MFU >= 45% at stablelm-2-1_6b on an H100/H200-class GPU; the planner within 10% of the peak.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder holds tokenize.py, which must not shadow the standard library's tokenize

import argparse
import contextlib
import datetime
import json
import statistics
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch._dynamo

from slm.model.transformer import ModelConfig, build
from slm.recipes import load_recipe
from slm.train import cost, engine
from slm.train.config import TrainSettings
from slm.train.dist import Dist
from slm.train.loop import set_deterministic
from slm.train.metrics import peak_flops

CHECK_SHAPE = (ModelConfig(family="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                           intermediate_size=128, tie_embeddings=True, max_seq_len=128), 128)


def recipe_shape(name: str) -> tuple[ModelConfig, int]:
    r = load_recipe(name)
    return ModelConfig.from_dict(r["model"]), int(r["mix"]["seq_len"])


def packed_batch(cfg: ModelConfig, micro: int, seq: int, device, seed: int = 0):
    """Random tokens in rows of several documents (about 4 per row), as `slm mix` packs them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=g)
    seg = torch.zeros(micro, seq, dtype=torch.long)
    for b in range(micro):
        for cut in torch.randint(1, seq, (3,), generator=g).tolist():
            seg[b, cut:] += 1
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device), seg.to(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def new_model(cfg: ModelConfig, device):
    """The shape's model, initialised on DEVICE (one per shape: building a 1.6B model on the host and copying it for
    every micro-batch tried would take minutes of a lent machine's time)."""
    return build(cfg, device, seed=0)


class Step:
    """slm's training step as the loop runs it (engine "single", its optimizer, bf16 autocast on a GPU) on MODEL,
    whose gradients are cleared first; the optimizer (and its moments) is this step's own."""

    def __init__(self, model, micro: int, seq: int, device, ac: bool, compiled: bool):
        self.device = device
        self.model = model
        model.zero_grad(set_to_none=True)
        cfg = model.cfg
        self.model.activation_checkpointing = ac
        t = TrainSettings(tokens_per_step=micro * seq, micro_batch_size=micro, activation_checkpointing=ac)
        self.eng = engine.build("single", Dist(device=device), self.model, t, 1, micro)
        self.eng.set_lr(1e-4)
        self.forward = torch.compile(self.eng.forward_model) if compiled else self.eng.forward_model
        self.batch = packed_batch(cfg, micro, seq, device)
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
            else contextlib.nullcontext

    def __call__(self) -> None:
        ids, targets, seg = self.batch
        with self.autocast():
            s, n = self.forward(ids, segment_ids=seg, targets=targets)
        self.eng.backward(s / n, True)
        self.eng.finish_step(True)


def fits(model, micro, seq, device, ac) -> int | None:
    """The peak memory (bytes; 0 on a CPU) of one step at MICRO sequences, or None when it runs out of memory."""
    free(device)
    step = None
    try:
        step = Step(model, micro, seq, device, ac, False)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    except torch.OutOfMemoryError:
        return None
    finally:
        step = None
        model.zero_grad(set_to_none=True)
        free(device)


def largest_micro(model, seq, device, ac, cap: int, headroom: float = 0.95) -> int:
    """The largest power-of-two micro-batch (up to CAP) whose step runs (0: not even one sequence).

    On a GPU: the peaks of 1 and 2 sequences give the fixed and per-sequence memory; the largest power of two they
    predict within HEADROOM of the device's memory is tried, then halved until it runs. Each new micro-batch
    compiles FlexAttention's kernels again, so this tries three or four sizes where doubling would try up to seven.
    On a CPU (--check): doubling."""
    if device.type != "cuda":
        micro, best = 1, 0
        while micro <= cap and fits(model, micro, seq, device, ac) is not None:
            best, micro = micro, micro * 2
        return best
    one = fits(model, 1, seq, device, ac)
    if one is None or cap < 2:
        return 0 if one is None else 1
    two = fits(model, 2, seq, device, ac)
    if two is None:
        return 1
    per_seq = max(two - one, 1)
    total = torch.cuda.get_device_properties(device).total_memory * headroom
    guess = 2
    while guess * 2 <= cap and one + (guess * 2 - 1) * per_seq <= total:
        guess *= 2
    while guess > 2 and fits(model, guess, seq, device, ac) is None:
        guess //= 2
    return guess


def measure(model, seq, micro, device, ac, compiled, steps: int, rounds: int) -> dict:
    free(device)
    cfg = model.cfg
    step = Step(model, micro, seq, device, ac, compiled)
    for _ in range(3 if compiled else 2):  # warm up (and compile)
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    tps = micro * seq / statistics.median(times)
    peak = peak_flops(device)
    out = {"micro_batch_size": micro, "activation_checkpointing": ac, "compiled": compiled,
           "tokens_per_s": round(tps, 1), "step_s": round(statistics.median(times), 4),
           "mfu": round(step.model.flops_per_token(seq) * tps / peak, 4) if peak else None}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    t = TrainSettings(tokens_per_step=micro * seq, micro_batch_size=micro, activation_checkpointing=ac)
    gpu = planner_gpu(device)
    plan = cost.plan(cfg, t, seq, 1, 1, "single", gpu, 0.4, "bf16" if device.type == "cuda" else "fp32")
    out["planner_memory_gib"] = plan["memory_gib_per_process"]["total"]
    if "peak_memory_gib" in out:
        out["planner_vs_measured"] = round(out["planner_memory_gib"] / out["peak_memory_gib"], 3)
    del step
    model.zero_grad(set_to_none=True)
    free(device)
    return out


def planner_gpu(device) -> str:
    from slm.devices import gpu_of_device

    if device.type == "cuda":
        g = gpu_of_device(torch.cuda.get_device_name(device))
        if g is not None and g.peak_flops:
            return g.name
    return "h100"  # the planner's memory does not depend on the GPU chosen


def decode(cfg: ModelConfig, device, prompt: int, gen: int, compiled: bool | str) -> dict:
    from slm.model.decode import StaticDecoder

    free(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(cfg, device, seed=0).to(dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    dec = StaticDecoder(model, batch=1, max_len=prompt + gen, compile=compiled)

    def run() -> float:
        dec.reset()
        with torch.no_grad():
            logits = dec.prefill(ids)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(gen - 1):
                logits = dec.step(logits.argmax(-1, keepdim=True))
            sync(device)
        return (gen - 1) / (time.perf_counter() - t0)

    run()  # warm up (and compile)
    rates = [run() for _ in range(3)]
    return {"dtype": str(dtype).replace("torch.", ""), "compiled": bool(compiled),
            "cuda_graphs": compiled == "reduce-overhead", "prompt": prompt, "gen": gen,
            "tokens_per_s": round(statistics.median(rates), 1)}


def mask_cost(cfg: ModelConfig, seq: int, micro: int, device, step_s: float) -> dict:
    """Building a batch's FlexAttention block mask (slm.model.transformer.document_mask: create_block_mask over the
    segment ids, once per forward, not compiled) against the step it serves: whether building it from the
    segments' block structure would be worth it."""
    from slm.model.transformer import document_mask

    _, _, seg = packed_batch(cfg, micro, seq, device)
    document_mask(seg, "flex")  # warm up
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        document_mask(seg, "flex")
        sync(device)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"micro_batch_size": micro, "seq": seq, "ms": round(ms, 3), "fraction_of_step": round(ms / 1e3 / step_s, 4)}


def junit_summary(path: Path) -> dict:
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        status, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status, why = tag, (el.get("message") or "").splitlines()[0][:200] if el.get("message") else ""
        cases.append({"test": case.get("name"), "status": status, "seconds": float(case.get("time") or 0),
                      **({"why": why} if why else {})})
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failure", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def markdown(r: dict) -> str:
    env = r.get("environment", {})
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "cuda", "transformers") if env.get(k) is not None)
    lines = [f"# GPU check: {r['device']}", "",
             f"{r['date']}, torch {r['torch']}{', ' + versions if versions else ''}, `bash benchmarks/gpu.sh`"
             + (f"; carried wheels: {', '.join(env['carried'])}" if env.get("carried") else ""), ""]
    if "tests" in r:
        c = r["tests"]["counts"]
        lines += [f"## Tests (`pytest -m gpu`): {c['passed']} passed, {c['failure'] + c['error']} failed, "
                  f"{c['skipped']} skipped", "", "| test | result | s |", "|---|---|---:|"]
        lines += [f"| {x['test']} | {x['status']}{': ' + x['why'] if x.get('why') else ''} | {x['seconds']:.1f} |"
                  for x in r["tests"]["cases"]]
        lines.append("")
    if r.get("train"):
        lines += ["## Training step (bf16 autocast, packed rows, fused AdamW)", "",
                  "| shape | seq | micro-batch | act. ckpt | compiled | tokens/s | MFU | peak GiB | planner GiB | "
                  "planner / peak |", "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
        for x in r["train"]:
            mfu = f"{x['mfu']:.1%}" if x.get("mfu") is not None else "-"
            lines.append(f"| {x['shape']} | {x['seq']} | {x['micro_batch_size']} | "
                         f"{'on' if x['activation_checkpointing'] else 'off'} | {'yes' if x['compiled'] else 'no'} | "
                         f"{x['tokens_per_s']:,.0f} | {mfu} | {x.get('peak_memory_gib', '-')} | "
                         f"{x['planner_memory_gib']} | {x.get('planner_vs_measured', '-')} |")
        lines.append("")
    if r.get("deterministic"):
        x = r["deterministic"]
        lines += ["## Deterministic mode (train.deterministic)", "",
                  f"{x['shape']}, micro-batch {x['micro_batch_size']}: {x['default_tokens_per_s']:,.0f} tokens/s by "
                  f"default, {x['deterministic_tokens_per_s']:,.0f} deterministic ({abs(x['cost']):.1%} "
                  f"{'slower' if x['cost'] >= 0 else 'faster: noise'})", ""]
    if r.get("decode"):
        lines += ["## Decode (torch backend, static cache)", ""]
        for x in (r["decode"], r.get("decode_cuda_graphs")):
            if x:
                how = "compiled, CUDA graphs" if x.get("cuda_graphs") else "compiled" if x["compiled"] else "eager"
                lines += [f"{x['shape']}, {x['dtype']}, batch 1, prompt {x['prompt']}, {x['gen']} new tokens, "
                          f"{how}: **{x['tokens_per_s']:,.1f} tokens/s**", ""]
    if r.get("block_mask"):
        lines += ["## Building the document block mask (create_block_mask, once per forward)", ""]
        lines += [f"{x['shape']}, micro-batch {x['micro_batch_size']} x {x['seq']}: {x['ms']:,.2f} ms, "
                  f"{x['fraction_of_step']:.1%} of the step" for x in r["block_mask"]] + [""]
    if r.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in r["errors"]] + [""]
    if r.get("skipped"):
        lines += ["## Skipped: past the time budget (SLM_GPU_BUDGET_S)", ""] + [f"- {e}" for e in r["skipped"]] + [""]
    return "\n".join(lines)


def environment() -> dict:
    """What ran the check: the versions a reader needs to compare runs (a lent machine brings its own torch)."""
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "typer"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if os.environ.get("SLM_GPU_CARRIED"):  # the wheels gpu.sh installed (benchmarks/gpu_wheels.sh)
        from importlib.metadata import distributions

        env["carried"] = sorted(f"{d.metadata['Name']} {d.version}"
                                for d in distributions(path=[os.environ["SLM_GPU_CARRIED"]]))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["compute_capability"] = f"{p.major}.{p.minor}"
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--junit", type=Path)
    ap.add_argument("--shapes", nargs="*", default=["stablelm-2-1_6b", "smollm2-360m"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cap", type=int, default=64, help="largest micro-batch tried")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--deadline", type=float, help="Unix time after which no measurement starts (gpu.sh sets it)")
    ap.add_argument("--check", action="store_true", help="the CPU, a tiny shape: checks this script, measures nothing")
    args = ap.parse_args()
    device = torch.device("cpu" if args.check else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device (--check runs it on the CPU at a tiny shape)")
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--check: tiny shape)"
    r = {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
         "environment": environment(), "train": [], "errors": [], "skipped": []}
    if args.junit and args.junit.is_file():
        r["tests"] = junit_summary(args.junit)
    elif args.junit:
        log = args.junit.with_name("gpu-tests.log")
        last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        r["errors"].append(f"tests: no report at {args.junit} ({last[0][:200] if last else 'no log'})")

    def save() -> None:
        (args.out / "gpu.json").write_text(json.dumps(r, indent=1) + "\n")

    def attempt(what: str, fn):
        if args.deadline is not None and time.time() > args.deadline:
            r["skipped"].append(what)
            print(f"gpu: skipped {what}: past the time budget", file=sys.stderr)
            save()
            return None
        try:
            return fn()
        except Exception as e:  # one failed measurement must not lose the others
            r["errors"].append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            print(f"gpu: {r['errors'][-1]}", file=sys.stderr)
            free(device)
            return None
        finally:
            save()

    def record(shape: str, seq: int, x: dict) -> None:
        r["train"].append({"shape": shape, "seq": seq, **x})
        print(f"gpu: {shape} {r['train'][-1]}", file=sys.stderr)

    shapes = {"check": CHECK_SHAPE} if args.check else {s: recipe_shape(s) for s in args.shapes}
    cap = 2 if args.check else args.cap
    steps, rounds = (1, 1) if args.check else (args.steps, args.rounds)
    # What the issue's targets need comes first (eager MFU and memory at each shape, then decode); what a time
    # budget may cut comes last (deterministic mode's cost, the compiled steps).
    # Every micro-batch size tried compiles FlexAttention for that shape; past dynamo's recompile limit (8) it would
    # fall back to the unfused implementation (the full score matrix), so the limit is lifted and the cache cleared
    # between shapes.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    models, best = {}, {}
    for shape, (cfg, seq) in shapes.items():
        torch._dynamo.reset()
        model = attempt(f"{shape} model", lambda: new_model(cfg, device))
        if model is None:
            continue
        models[shape] = model
        for ac in (False, True):
            micro = attempt(f"{shape} micro-batch search (act. ckpt {'on' if ac else 'off'})",
                            lambda: largest_micro(model, seq, device, ac, cap))
            if not micro:
                continue
            x = attempt(f"{shape} step (act. ckpt {'on' if ac else 'off'})",
                        lambda: measure(model, seq, micro, device, ac, False, steps, rounds))
            if x:
                record(shape, seq, x)
                if shape not in best or x["tokens_per_s"] > best[shape]["tokens_per_s"]:
                    best[shape] = x
        if len(shapes) > 1:  # one model on the device at a time
            models.pop(shape)
            del model
            free(device)
    cfg135 = CHECK_SHAPE[0] if args.check else recipe_shape("smollm2-135m")[0]
    x = attempt("decode", lambda: decode(cfg135, device, 16 if args.check else 128, 8 if args.check else 256,
                                         not args.check))
    if x:
        r["decode"] = {"shape": "check" if args.check else "smollm2-135m", **x}
    first = next((x for x in r["train"] if not x["compiled"] and not x["activation_checkpointing"]), None)
    if first:
        cfg, seq = shapes[first["shape"]]

        def deterministic() -> dict:
            model = models.get(first["shape"]) or new_model(cfg, device)
            set_deterministic(True)
            try:
                x = measure(model, seq, first["micro_batch_size"], device, False, False, steps, rounds)
            finally:
                torch.use_deterministic_algorithms(False)
            return {"shape": first["shape"], "micro_batch_size": first["micro_batch_size"],
                    "default_tokens_per_s": first["tokens_per_s"], "deterministic_tokens_per_s": x["tokens_per_s"],
                    "cost": round(1 - x["tokens_per_s"] / first["tokens_per_s"], 4)}

        r["deterministic"] = attempt("deterministic step", deterministic)
    if not args.check:  # the same decoder replayed as a CUDA graph (StaticDecoder(compile="reduce-overhead"))
        x = attempt("decode with CUDA graphs", lambda: decode(cfg135, device, 128, 256, "reduce-overhead"))
        if x:
            r["decode_cuda_graphs"] = {"shape": "smollm2-135m", **x}
    for shape, b in best.items():
        cfg, seq = shapes[shape]
        x = attempt(f"{shape} block mask", lambda: mask_cost(cfg, seq, b["micro_batch_size"], device, b["step_s"]))
        if x:
            r.setdefault("block_mask", []).append({"shape": shape, **x})
    if not args.no_compile:
        for shape, b in best.items():
            cfg, seq = shapes[shape]
            x = attempt(f"{shape} compiled step", lambda: measure(models.get(shape) or new_model(cfg, device), seq,
                                                                  b["micro_batch_size"], device,
                                                                  b["activation_checkpointing"], True, steps, rounds))
            if x:
                record(shape, seq, x)
    save()
    (args.out / "gpu.md").write_text(markdown(r) + "\n")
    print(markdown(r))


if __name__ == "__main__":
    main()
