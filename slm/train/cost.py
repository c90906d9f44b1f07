"""What a training run will cost, before it starts (`--dry-run`): FLOPs, memory per process, time and GPU-hours.

FLOPs per token for training: 6N + 12 x layers x hidden x sequence (PaLM, arXiv 2204.02311, appendix B), N the
parameters that multiply (the input embedding is a lookup; a tied output matrix still multiplies). Time = FLOPs /
(GPUs x peak bf16 FLOP/s x MFU).

Memory per process, in bytes, P parameters, W processes (the engine's own layout; activation memory an estimate
within about a third, the allocator's slack and CUDA's context left out):
    weights       fp32 master weights: 4P (fsdp: 4P / W; ZeRO-3: 4P / W and ZeRO's fp32 partition 4P / W)
    gradients     fp32: 4P (ddp, ZeRO-1); 4P / W (fsdp, ZeRO-2, ZeRO-3)
    optimizer     AdamW's two fp32 moments: 8P (single, ddp); 8P / W (fsdp); ZeRO-1/2 also keep an fp32 copy of
                  their partition: 12P / W
    buffers       fsdp: two blocks gathered at once (in the compute dtype); ZeRO-2/3: the reduce bucket
                  (DeepSpeed's default 5e8 elements, or P) in fp32; ZeRO-3 also its prefetch bucket
    activations   per micro-batch token and block, kept for the backward pass, c bytes per element of the compute
                  dtype, h hidden, k the key/value width, i the SwiGLU width: 8h (the fp32 residual stream at both
                  norms) + c(5h + 3k + 4i) (norm outputs, q/k/v, rotated q/k, attention output, gate/up, SwiGLU);
                  flash attention keeps no (T x T) scores. Plus the fused output-layer loss: the gradient of the
                  output matrix (4 V h) and of the last hidden states (c h per token). With activation checkpointing:
                  each block's fp32 input (4h per token) plus one block's full activations at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from slm import devices
from slm.console import table, warn
from slm.errors import SlmError, UsageError
from slm.formats.tables import human, plural
from slm.formats.tokenizer import padded_vocab_size
from slm.model.loss import CHUNK_ELEMENTS
from slm.model.transformer import ModelConfig, build
from slm.recipes import find_recipe, load_recipe
from slm.train.batches import fit_micro_batch
from slm.train.dist import Dist
from slm.train.engine import resolve_engine

DEEPSPEED_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size (elements)
DEEPSPEED_PREFETCH = 5e7  # ZeRO-3's default stage3_prefetch_bucket_size (elements)


def gib(n: float) -> float:
    return n / 2**30


def memory_bytes(model_cfg: ModelConfig, t, seq_len: int, micro: int, world: int, engine: str,
                 compute_dtype: str, model=None) -> dict[str, float]:
    """Bytes per process of one training step: weights, gradients, optimizer, buffers and activations (what
    autograd keeps for the backward of MICRO sequences, tests/test_cost.py measures it), for ENGINE on WORLD
    processes. MODEL: the config's model on the meta device, if the caller has built it."""
    model = model if model is not None else build(model_cfg, "meta")
    P = model.num_parameters()
    c = 2 if compute_dtype == "bf16" else 4
    W = world
    zero = t.zero_stage if engine == "deepspeed" else None
    block = sum(p.numel() for p in model.layers[0].parameters())
    mem = {"weights": 4 * P, "gradients": 4 * P, "optimizer": 8 * P, "buffers": 0}
    if engine == "fsdp":
        mem = {"weights": 4 * P / W, "gradients": 4 * P / W, "optimizer": 8 * P / W, "buffers": 2 * block * c}
    elif zero in (1, 2):
        mem["optimizer"] = 12 * P / W
        if zero == 2:
            mem["gradients"] = 4 * P / W
            mem["buffers"] = 4 * min(DEEPSPEED_BUCKET, P)
    elif zero == 3:
        mem = {"weights": 8 * P / W, "gradients": 4 * P / W, "optimizer": 8 * P / W,
               "buffers": 4 * min(DEEPSPEED_BUCKET, P) + 4 * min(DEEPSPEED_PREFETCH, P) + 2 * block * 4}
    h, L, i = model_cfg.hidden_size, model_cfg.num_layers, model_cfg.intermediate_size
    k = model_cfg.num_kv_heads * model_cfg.head_dim
    tokens_micro = micro * seq_len
    per_block_token = 8 * h + c * (5 * h + 3 * k + 4 * i)
    # torch.autocast's bf16 copy of a block's weights, which each linear layer saves for its backward: every block's
    # until the backward, or with checkpointing the recomputed block's only (FSDP computes in its gathered bf16
    # weights, counted in its buffers, and frees them after each block)
    casts = 2 * block if compute_dtype == "bf16" and engine != "fsdp" else 0
    if t.activation_checkpointing:
        act = tokens_micro * (L * 4 * h + per_block_token) + casts
    else:
        act = tokens_micro * L * per_block_token + L * casts
    act += 4 * model_cfg.vocab_size * h + tokens_micro * (c + 4) * h
    # the fused loss's chunk of logits (fp32; in bf16 also the product's output and the gradient's bf16 copy)
    act += min(CHUNK_ELEMENTS["cuda"], tokens_micro * model_cfg.vocab_size) * (8 if c == 2 else 4)
    mem["activations"] = act
    return mem


def plan(model_cfg: ModelConfig, t, seq_len: int, steps: int, world: int, engine: str, gpu: str, mfu: float,
         compute_dtype: str, gpu_hours: float | None = None) -> dict:
    """The plan of a run of STEPS steps of train.tokens_per_step on WORLD processes of GPU at MFU."""
    device = devices.gpu(gpu, planning=True)
    if not 0 < mfu <= 1:
        raise UsageError(f"--mfu {mfu}: expected a fraction in (0, 1], e.g. 0.4")
    if t.tokens_per_step % seq_len:
        raise SlmError(f"train.tokens_per_step {t.tokens_per_step} is not a multiple of seq_len {seq_len}")
    samples = t.tokens_per_step // seq_len
    if samples % world:
        raise SlmError(f"train.tokens_per_step gives {samples} samples per step, not divisible by {world} processes")
    per_rank = samples // world
    micro = fit_micro_batch(per_rank, t.micro_batch_size, "train.micro_batch_size", "samples", world, True)
    model = build(model_cfg, "meta")
    P = model.num_parameters()
    flops_per_token = model.flops_per_token(seq_len)
    tokens = steps * t.tokens_per_step
    total_flops = flops_per_token * tokens
    peak, memory_gib = device.peak_flops, device.memory_gib
    seconds = total_flops / (world * peak * mfu)

    mem = memory_bytes(model_cfg, t, seq_len, micro, world, engine, compute_dtype, model)
    zero = t.zero_stage if engine == "deepspeed" else None
    total = sum(mem.values())
    out = {
        "parameters": P, "seq_len": seq_len, "steps": steps, "tokens_per_step": t.tokens_per_step, "tokens": tokens,
        "samples_per_step": samples, "processes": world, "micro_batch_size": micro,
        "accumulation_steps": per_rank // micro, "engine": engine + (f" ZeRO-{zero}" if zero else ""),
        "compute_dtype": compute_dtype, "activation_checkpointing": t.activation_checkpointing,
        "flops_per_token": flops_per_token, "flops": total_flops,
        "memory_gib_per_process": {key: round(gib(v), 3) for key, v in mem.items()} | {"total": round(gib(total), 3)},
        "gpu": device.name, "gpu_peak_tflops": peak / 1e12, "gpu_memory_gib": memory_gib, "fits": gib(total) <= memory_gib,
        "mfu": mfu, "hours": seconds / 3600, "gpu_hours": seconds * world / 3600,
    }
    # A background save (train.async_save) keeps a host copy of the full fp32 weights and AdamW moments on rank 0.
    out["checkpoints"] = {"save_every": t.save_every, "async_save": t.async_save,
                          "host_copy_gib": round(gib(12 * P), 3) if t.async_save else 0.0}
    out["spikes"] = {"window": t.spike_window, "sigma": t.spike_sigma}
    out["task_scores"] = {"tasks": [str(x) for x in t.eval_tasks], "every": t.eval_every, "limit": t.eval_limit}
    if gpu_hours:
        out["given_gpu_hours"] = gpu_hours
        out["implied_mfu"] = total_flops / (gpu_hours * 3600 * peak)
    return out


def print_plan(p: dict) -> None:
    m = p["memory_gib_per_process"]
    rows = [
        ("parameters", f"{p['parameters']:,}"),
        ("tokens", f"{human(p['tokens'])} ({p['steps']:,} steps x {p['tokens_per_step']:,} tokens)"),
        ("a step", f"{p['samples_per_step']:,} x {p['seq_len']:,} tokens = {plural(p['processes'], 'process')} x "
                   f"{plural(p['accumulation_steps'], 'micro-batch')} of {p['micro_batch_size']}"),
        ("engine", f"{p['engine']}, {p['compute_dtype']}"
                   + (", activation checkpointing" if p["activation_checkpointing"] else "")),
        ("FLOPs per token", f"{human(p['flops_per_token'])} (6N + 12 L H T)"), ("FLOPs", f"{p['flops']:.3e}"),
        ("memory per process", f"{m['total']:,.1f} GiB of {p['gpu_memory_gib']} "
                               f"({'fits' if p['fits'] else 'does NOT fit'})"),
        ("  weights / gradients", f"{m['weights']:,.2f} / {m['gradients']:,.2f} GiB"),
        ("  optimizer / buffers", f"{m['optimizer']:,.2f} / {m['buffers']:,.2f} GiB"),
        ("  activations", f"{m['activations']:,.2f} GiB"),
        ("GPU", f"{p['processes']:,} x {p['gpu']} ({p['gpu_peak_tflops']:,.0f} TFLOP/s bf16) at {p['mfu']:.1%} MFU"),
        ("time", f"{p['hours']:,.1f} hours ({p['hours'] / 24:,.1f} days)"), ("GPU-hours", f"{p['gpu_hours']:,.0f}")]
    if "implied_mfu" in p:
        rows.append((f"MFU that {p['given_gpu_hours']:,.0f} GPU-hours imply", f"{p['implied_mfu']:.1%}"))
    c, s = p["checkpoints"], p["spikes"]
    rows.append(("checkpoints", (f"every {c['save_every']:,} steps" if c["save_every"] else "at the end only")
                 + (f", written in the background (train.async_save; a {c['host_copy_gib']:,.2f} GiB host copy "
                    "on rank 0, no stall)" if c["async_save"] else ", the step waits for each (train.async_save: "
                                                                    "write in the background)")))
    rows.append(("loss spikes", f"skipped above {s['sigma']:g} sigma over the last {s['window']:,} steps"
                 if s["window"] else "not checked (train.spike_window 0)"))
    ts = p["task_scores"]
    if ts["tasks"]:
        rows.append(("task scores", f"{', '.join(ts['tasks'])} (default limit {ts['limit']}) every "
                                    f"{ts['every']:,} steps and at the end, on rank 0 (the others wait): each "
                                    "costs what `slm eval` of a checkpoint on them costs, said after each"))
    else:
        rows.append(("task scores", "none (train.eval_tasks: lm-eval tasks or suites scored as the run goes)"))
    table("the plan (--dry-run: nothing was trained or written)", rows)
    if not p["fits"]:
        warn(f"about {m['total']:,.1f} GiB per process does not fit in one {p['gpu']} ({p['gpu_memory_gib']} GiB): "
             "lower train.micro_batch_size, set train.activation_checkpointing=true, or shard more (--engine fsdp, "
             "--zero-stage 3)")


@dataclass
class DryRun:
    """--dry-run: resolve the configuration and print the plan without training."""

    gpu: str = "h100"
    """The GPU to plan for (a name or alias in slm.devices.GPUS)."""
    gpus: int | None = None
    """How many processes (one per GPU); default WORLD_SIZE, else 1."""
    mfu: float = 0.4
    """The model FLOPs utilisation to assume."""
    gpu_hours: float | None = None
    """A budget (or a reported figure): the plan then also gives the MFU it implies."""


def recipe_seq_len(recipe: str | None) -> int | None:
    """The sequence length of a recipe's mix, for a plan made before the data exists."""
    if not recipe:
        return None
    if find_recipe(recipe) is None:
        return None
    return (load_recipe(recipe).get("mix") or {}).get("seq_len")


def plan_run(model_values: dict, tok, t, seq_len: int, steps: int, dry: DryRun) -> dict:
    """The plan of a run: model from MODEL_VALUES (vocab from TOK unless fixed), STEPS of train.tokens_per_step."""
    values = dict(model_values)
    if "vocab_size" not in values:
        if tok is None:
            raise SlmError("model.vocab_size: the recipe takes it from the data's tokenizer; give --data, or "
                           "--set model.vocab_size=N")
        values["vocab_size"] = padded_vocab_size(tok.n_vocab)
    try:
        model_cfg = ModelConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise SlmError(str(e)) from None
    world = dry.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise UsageError(f"--gpus {world}: expected a positive number")
    name = resolve_engine(t.engine, Dist(world=world))
    dtype = t.dtype if t.dtype != "auto" else "bf16"  # a plan is for GPUs: auto is bf16 there
    return plan(model_cfg, t, seq_len, steps, world, name, dry.gpu, dry.mfu, dtype, dry.gpu_hours)
