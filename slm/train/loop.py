"""The one training loop, shared by pretrain and cooldown (and later sft, dpo, selfknow).

The stages differ in what they hand it: the learning rate at each step, which samples each step reads, and what
goes into a checkpoint's lineage. The loop owns the step: micro-batches with gradient accumulation (the loss of a
step is the sum of token losses over every micro-batch and rank divided by the step's token count), clipping,
AdamW, logging, evaluation, checkpoints, and stopping cleanly on SIGTERM / SIGUSR1 (a checkpoint is written at
the end of the current step).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from slm.console import Heartbeat, err, info, progress
from slm.errors import SlmError
from slm.formats.checkpoint import write_checkpoint
from slm.model.transformer import ModelConfig, Transformer
from slm.train import engine
from slm.train.batches import Batches, ValidSet
from slm.train.config import TrainSettings
from slm.train.metrics import MetricsLog, memory_gib, peak_flops


class Stopped(SlmError):
    """The run was asked to stop (SIGTERM / SIGUSR1) and saved a checkpoint first."""


def make_optimizer(model: Transformer, t: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and embeddings, none on biases and norms (GPT-NeoX, nanotron)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": t.lr_peak, "betas": tuple(t.betas), "eps": t.eps}
    try:  # one fused kernel per step (CUDA; CPUs since torch 2.4): about 5x faster than the foreach version on a CPU
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def autocast_for(t: TrainSettings, device: torch.device):
    dtype = t.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class Run:
    """Everything the loop needs; the stage fills it in."""

    stage: str
    run_dir: Path
    model: Transformer  # the unwrapped model
    model_cfg: ModelConfig
    train: TrainSettings
    optimizer: torch.optim.Optimizer
    batches: Batches
    dist: engine.Dist
    lr_at: Callable[[int], float]
    first_sample_of: Callable[[int], int]
    start_step: int
    end_step: int
    seq_len: int
    tokenizer_dir: Path
    bos_id: int | None
    eos_id: int | None
    lineage: dict
    state: dict = field(default_factory=dict)  # tokens_seen etc., carried into train_state/state.json
    valid: ValidSet | None = None
    unigram_loss: float | None = None


def evaluate(run: Run, model: torch.nn.Module) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.dist.device)
    with torch.no_grad(), autocast_for(run.train, run.dist.device)():
        for mb in run.valid.batches(run.train.micro_batch_size, run.dist.rank, run.dist.world, run.dist.device):
            s, n = run.model(mb.input_ids, segment_ids=mb.segment_ids, targets=mb.targets)
            total += torch.stack([s.double(), n.double()])
    engine.all_reduce_sum(total, run.dist)
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def save(run: Run, step_done: int, lr: float) -> Path:
    """Checkpoint after STEP_DONE steps (rank 0 writes; everyone waits)."""
    path = None
    if run.dist.main:
        state = dict(run.state, step=step_done, stage=run.stage, lr=lr,
                     samples_seen=run.first_sample_of(step_done))
        path = write_checkpoint(
            run.run_dir, step_done, model_cfg=run.model_cfg, state_dict=run.model.state_dict(),
            tokenizer_dir=run.tokenizer_dir, lineage=dict(run.lineage, step=step_done,
                                                         tokens_seen=state.get("tokens_seen")),
            train_state=state, optimizer_state=run.optimizer.state_dict(), rng_state=rng_state(run.dist.device),
            keep=run.train.keep, bos_id=run.bos_id, eos_id=run.eos_id)
    engine.barrier(run.dist)
    return path or run.run_dir / "checkpoints" / f"step-{step_done:08d}"


def train(run: Run) -> Path:
    """Run steps [start_step, end_step); returns the last checkpoint."""
    d, t = run.dist, run.train
    model = engine.wrap(run.model, d)
    if t.compile:
        model = torch.compile(model)
    run.model.attention_backend = t.attention
    run.model.activation_checkpointing = t.activation_checkpointing
    model.train()
    autocast = autocast_for(t, d.device)
    params = [p for p in run.model.parameters() if p.requires_grad]
    flops_per_token = run.model.flops_per_token(run.seq_len)
    peak = peak_flops(d.device)
    resumed = run.state.pop("resumed", False)
    log = MetricsLog(run.run_dir, run.start_step if resumed else None, d.main)
    tokens_per_step = run.batches.samples_per_step * run.seq_len
    run.state.setdefault("tokens_seen", 0)

    stop = {"signal": None}
    previous = {}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        with contextlib.suppress(ValueError):  # not in the main thread
            previous[sig] = signal.signal(sig, on_signal)

    last_ckpt = None
    heartbeat = Heartbeat()
    started = time.perf_counter()
    lr = run.lr_at(max(run.start_step - 1, 0))
    bar_ctx = progress() if d.main else contextlib.nullcontext()
    try:
        with bar_ctx as bar:
            task = bar.add_task(run.stage, total=run.end_step - run.start_step, loss="-", lr="-", tps="-") if bar else None
            for step in range(run.start_step, run.end_step):
                t0 = time.perf_counter()
                lr = run.lr_at(step)
                for g in run.optimizer.param_groups:
                    g["lr"] = lr
                mbs = run.batches.step(run.first_sample_of(step))
                n_local = torch.tensor(float(sum(mb.n_tokens for mb in mbs)), device=d.device)
                n_global = engine.all_reduce_sum(n_local.clone(), d)
                loss_sum = torch.zeros((), device=d.device, dtype=torch.float32)
                for i, mb in enumerate(mbs):
                    with engine.no_sync(model, i == len(mbs) - 1), autocast():
                        s, _ = model(mb.input_ids, segment_ids=mb.segment_ids, targets=mb.targets)
                    # DDP averages gradients over ranks: scale so the step's gradient is of sum / global tokens.
                    (s * (d.world / n_global)).backward()
                    loss_sum += s.detach().float()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                loss = float(engine.all_reduce_sum(loss_sum, d) / n_global)
                if not math.isfinite(loss):
                    raise SlmError(f"step {step}: the loss is {loss}; lower train.lr_peak or check the data")
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                dt = time.perf_counter() - t0
                run.state["tokens_seen"] += tokens_per_step
                tps = tokens_per_step / dt
                record = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
                          "tokens_seen": run.state["tokens_seen"], "tokens_per_s": round(tps, 1),
                          "step_seconds": round(dt, 4), "memory_gib": round(memory_gib(d.device), 3)}
                if peak:
                    record["mfu"] = round(flops_per_token * tps / (peak * d.world), 4)
                log.write(record)
                status = (f"{run.stage} step {step + 1}/{run.end_step} loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s"
                          + (f" MFU {record['mfu']:.1%}" if peak else ""))
                if bar:
                    bar.update(task, advance=1, description=status)
                done = step + 1
                if d.main:
                    left = (time.perf_counter() - started) / (done - run.start_step) * (run.end_step - done)
                    heartbeat(f"{status} ETA {left / 60:.1f} min", force=done == run.start_step + 1)
                last = done == run.end_step
                if run.valid is not None and (last or (t.eval_every and done % t.eval_every == 0)):
                    vl = evaluate(run, model)
                    rec = {"step": step, "valid_loss": round(vl, 6), "tokens_seen": run.state["tokens_seen"]}
                    if run.unigram_loss is not None:
                        rec["unigram_loss"] = round(run.unigram_loss, 6)
                    log.write(rec)
                    if d.main:
                        info(f"step {done}: valid loss {vl:.4f}" + (
                            f" (unigram baseline {run.unigram_loss:.4f})" if run.unigram_loss is not None else ""))
                stopping = engine.any_rank(stop["signal"] is not None, d)
                if last or stopping or (t.save_every and done % t.save_every == 0):
                    last_ckpt = save(run, done, lr)
                if stopping and not last:
                    raise Stopped(f"stopped by {stop['signal'] or 'a signal'} after step {done}; checkpoint "
                                  f"{last_ckpt} saved; run the same command again to resume")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if last_ckpt is None:  # nothing to do: already at end_step
        from slm.formats.checkpoint import latest_checkpoint

        last_ckpt = latest_checkpoint(run.run_dir)
    if d.main:
        err.print(f"{run.stage}: {run.end_step - run.start_step} steps done; checkpoint {last_ckpt}")
    return last_ckpt
