"""The one training loop, shared by pretrain, cooldown, sft, dpo and selfknow.

The stages differ in what they hand it: the learning rate at each step, which samples each step reads, and what
goes into a checkpoint's lineage. The loop owns the step: micro-batches with gradient accumulation (the loss of a
step is the sum of token losses over every micro-batch and rank divided by the step's token count), clipping,
AdamW through the engine (slm.train.engine: single, ddp, fsdp, deepspeed), logging, evaluation and checkpoints.

Faults it survives:
- SIGTERM / SIGUSR1 (a scheduler's preemption or time limit): the current step finishes, a checkpoint is saved
  and the run exits with code 75 ("run the same command again"); with `requeue`, under SLURM, it first asks
  `scontrol requeue $SLURM_JOB_ID`.
- A step whose loss or gradient norm is not finite is skipped (weights and AdamW moments stay as they were) and
  counted in metrics.jsonl; train.max_bad_steps of them in a row stop the run, naming the last good checkpoint.
- A checkpoint that cannot be written (a full disk) stops every process with one line; the previous ones stay.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import copy
import dataclasses
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from slm.console import Heartbeat, err, info, progress, warn
from slm.errors import Interrupted, SlmError, Stopped
from slm.formats.checkpoint import checkpoints_dir, latest_checkpoint, write_checkpoint, write_model_dir
from slm.formats.manifest import new_manifest, write_json
from slm.formats.metrics import MetricsLog, ProgressFile
from slm.formats.tables import plural
from slm.model.transformer import ModelConfig, Transformer
from slm.train import engine
from slm.train.batches import Batches, ValidSet
from slm.train.config import TrainSettings
from slm.train.dist import Dist, all_reduce_sum, any_rank, broadcast_object
from slm.train.engine import compute_dtype, cpu_has_bf16  # noqa: F401 (part of this module's interface)
from slm.train.metrics import memory_gib, peak_flops, plot

__all__ = ["Run", "Stopped", "train", "autocast_for", "compute_dtype", "cpu_has_bf16", "rng_state", "set_rng_state"]


def set_deterministic(on: bool) -> None:
    """train.deterministic: the same bits from the same state on a GPU (CPU kernels are deterministic already)."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by torch at each cuBLAS call
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def autocast_for(t: TrainSettings, device: torch.device):
    if compute_dtype(t, device) == "bf16":
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
    engine: engine.Engine  # owns the optimizer and the wrapped model
    batches: Batches
    dist: Dist
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
    requeue: bool = False
    """After a signal's save, `scontrol requeue $SLURM_JOB_ID` (under SLURM)."""
    writer: BackgroundWriter = field(default_factory=lambda: BackgroundWriter())
    spike: str | None = None  # why the step being taken is a loss spike (take_step), for its record
    task_scorer: Callable | None = None
    """(run) -> the scorer of train.eval_tasks (describe(), score(write_model) -> (scores, seconds), close()); the
    stages that offer task scores set it (slm.evaluation.training.task_scorer: evaluation sits above training)."""
    loss_fn: Callable | None = None
    """(model, micro-batch) -> (the loss summed over the micro-batch's units, {name: sum} to log); default: the
    language-model loss summed over target tokens. The step's loss is the sum over all processes' micro-batches
    divided by the step's units (mb.n_tokens: target tokens, or pairs for dpo); so are the logged sums."""


def lm_loss(model, mb):
    s, _ = model(mb.input_ids, segment_ids=mb.segment_ids, targets=mb.targets)
    return s, {}


def evaluate(run: Run) -> tuple[float, dict]:
    model = run.engine.forward_model
    model.eval()
    compute = run.loss_fn or lm_loss
    names: list[str] = []
    total = None
    with torch.no_grad(), autocast_for(run.train, run.dist.device)():
        for mb in run.valid.batches(run.train.micro_batch_size, run.dist.rank, run.dist.world, run.dist.device):
            s, stats = compute(model, mb)
            names = sorted(stats)
            part = torch.stack([s.double(), torch.tensor(float(mb.n_tokens), dtype=torch.float64, device=s.device)]
                               + [stats[k].double() for k in names])
            total = part if total is None else total + part
    if total is None:  # this process had no validation batch; the others may
        total = torch.zeros(2 + len(names), dtype=torch.float64, device=run.dist.device)
    all_reduce_sum(total, run.dist)
    model.train()
    n = total[1].clamp(min=1)
    return float(total[0] / n), {k: float(total[2 + i] / n) for i, k in enumerate(names)}


class BackgroundWriter:
    """train.async_save on rank 0: one checkpoint write at a time in a thread; a failure is kept until the next
    save (or the end), where every rank hears of it."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        self.written: Path | None = None  # the last write that completed, not yet reported

    def wait(self) -> str | None:
        """Wait for the write in flight; its error (once), if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        return error

    def submit(self, write: Callable[[], Path]) -> None:
        def work():
            try:  # yield the cores to the training step first (Linux: a thread's own nice value)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            except (OSError, AttributeError):
                pass
            try:
                self.written = write()
            except SlmError as e:
                self.error = str(e)
            except Exception as e:  # an unexpected failure still reaches the training thread as one line
                self.error = f"background checkpoint write failed: {type(e).__name__}: {e}"

        self.thread = threading.Thread(target=work, name="slm-checkpoint-writer", daemon=False)
        self.thread.start()

    def take_written(self) -> Path | None:
        """The checkpoint the last background write completed, once (to report it)."""
        if self.thread is not None and self.thread.is_alive():
            return None
        path, self.written = self.written, None
        return path


def _host_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy in host memory that the next steps cannot change (full_weights may return the live CPU tensors)."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in tensors.items()}


def save(run: Run, step_done: int, lr: float, background: bool = False) -> Path:
    """Checkpoint after STEP_DONE steps: every rank helps gather the full state, rank 0 writes it (BACKGROUND:
    from a host copy, in a thread, after the previous background write). A failure on rank 0 (a full disk)
    becomes the same one-line error on every rank: at this save, or at the next one for a background write."""
    d = run.dist
    weights = run.engine.full_weights()
    optimizer = run.engine.full_optimizer_state()
    path, error = None, None
    writer = run.writer
    if d.main:
        error = writer.wait()  # at most one write in flight; the previous one's failure is reported now
        state = dict(run.state, step=step_done, stage=run.stage, lr=lr, samples_seen=run.first_sample_of(step_done),
                     engine=run.engine.describe(), world_size=d.world)
        if background:
            weights = _host_copy(weights)
            if optimizer is not None:
                optimizer = dataclasses.replace(optimizer, moments={n: _host_copy(m) for n, m in
                                                                    optimizer.moments.items()})
            state = copy.deepcopy(state)

        def write() -> Path:
            return write_checkpoint(
                run.run_dir, step_done, model_cfg=run.model_cfg, state_dict=weights,
                tokenizer_dir=run.tokenizer_dir, lineage=dict(run.lineage, step=step_done,
                                                             tokens_seen=state.get("tokens_seen")),
                train_state=state, optimizer=optimizer, rng_state=rng_state(d.device), keep=run.train.keep,
                bos_id=run.bos_id, eos_id=run.eos_id,
                on_replace=lambda old, new: warn(f"{old} did not verify when this run resumed; kept as {new}"))

        if error is None and background:
            writer.submit(write)
        elif error is None:
            try:
                path = write()
            except SlmError as e:
                error = str(e)
    error = broadcast_object(error, d)
    if error is not None:
        raise SlmError(error if d.main else f"rank 0 could not save the checkpoint: {error}")
    return path or run.run_dir / "checkpoints" / f"step-{step_done:08d}"


def requeue_job(why: str) -> None:
    """Ask SLURM to requeue this job (it will then stop this one and start it again, which resumes). WHY (the stop
    and the checkpoint saved) is said first: SLURM's requeue kills the job's processes, often before they print
    anything more."""
    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):  # an array task is named JOB_TASK
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if not job:
        warn("--requeue: not running under SLURM (no SLURM_JOB_ID); not requeued")
        return
    info(f"{why}; requeueing SLURM job {job}")
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        warn(f"--requeue: scontrol requeue {job} failed ({e})")
        return
    if proc.returncode != 0:
        warn(f"--requeue: scontrol requeue {job} failed: {proc.stderr.strip() or proc.returncode}")


@contextlib.contextmanager
def stop_signals(announce: bool):
    """Inside, SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) set the yielded dict's "signal": the loop saves and stops after
    the step. The same signal again stops at once, unsaved (Interrupted; "step": the step then running). Another
    kind does not: torchrun answers a terminal's Ctrl-C, which every worker gets too, with a SIGTERM to each.
    ANNOUNCE: say so on stderr (the main process)."""
    stop, previous = {"signal": None, "step": None}, {}

    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if stop["signal"] == name:
            raise Interrupted(f"stopped at once by a second {name} during step {stop['step']}, without saving; "
                              "run the same command again to resume from the last checkpoint", signum)
        if stop["signal"] is None:
            stop["signal"] = name
            if announce:  # os.write: a handler may run while a print holds stderr's buffer
                again = "press Ctrl-C again" if name == "SIGINT" else f"send {name} again"
                os.write(2, f"\n{name}: saving a checkpoint after step {stop['step']}, then stopping ({again} to "
                            "stop at once, without saving)\n".encode())

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not in the main thread
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def loss_spike(run: Run, loss: float) -> str | None:
    """Why LOSS is a spike against the window of recent losses (run.state["loss_window"]), or None. Every rank
    decides alike: the loss is all-reduced and the window is the same everywhere. As OLMo-core's SkipStepOptimizer:
    the window holds every finite loss (spikes too, so that a lasting shift of the loss stops counting as one after
    a while) and the check starts once it is half full."""
    t, window = run.train, run.state.get("loss_window") or []
    if not t.spike_window or len(window) < max(2, t.spike_window // 2) or not math.isfinite(loss):
        return None
    mean, std = statistics.fmean(window), statistics.stdev(window)
    if loss - mean <= t.spike_sigma * std:
        return None
    sigmas = f"{(loss - mean) / std:.1f} sigma" if std > 0 else "far"
    return f"loss spike {loss:.4f}: {sigmas} above the mean {mean:.4f} of the last {len(window)} steps"


def remember_loss(run: Run, loss: float) -> None:
    if run.train.spike_window and math.isfinite(loss):
        window = run.state.setdefault("loss_window", [])
        window.append(round(loss, 6))
        del window[:-run.train.spike_window]


def take_step(run: Run, model, mbs: list, autocast, compute) -> tuple[float, dict, float, bool]:
    """Forward and backward over the step's micro-batches, then clip and update unless the loss is not finite or
    is a spike: (the step's loss, its other logged terms, the gradient norm, whether the update was applied)."""
    d, eng = run.dist, run.engine
    poison = getattr(eng, "poison", None)
    n_global = all_reduce_sum(torch.tensor(float(sum(mb.n_tokens for mb in mbs)), device=d.device), d)
    loss_sum = torch.zeros((), device=d.device, dtype=torch.float32)
    stat_sums: dict[str, torch.Tensor] = {}
    loss, step_stats = float("nan"), {}
    run.spike = None
    for i, mb in enumerate(mbs):
        last = i == len(mbs) - 1
        with eng.accumulating(last):
            with autocast():
                s, stats = compute(model, mb)
            loss_sum += s.detach().float()
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0) + v.detach().float()
            if last:  # the step's loss, known before its last backward
                names = sorted(stat_sums)
                sums = all_reduce_sum(torch.stack([loss_sum] + [stat_sums[k] for k in names]), d)
                loss = float(sums[0] / n_global)
                step_stats = {k: round(float(sums[1 + j] / n_global), 6) for j, k in enumerate(names)}
                run.spike = loss_spike(run, loss)
                if (not math.isfinite(loss) or run.spike) and poison is not None:
                    s = poison(s)  # DeepSpeed then sees a non-finite gradient and skips the update
            # DDP averages gradients over ranks: scale so the step's gradient is of sum / global tokens.
            eng.backward(s * (d.world / n_global), last)
    grad_norm, applied = eng.finish_step(math.isfinite(loss) and not run.spike)
    remember_loss(run, loss)
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    return loss, step_stats, grad_norm, applied


def step_record(run: Run, step: int, lr: float, loss: float, stats: dict, grad_norm: float, applied: bool,
                dt: float, tps: float, mfu_per_token_s: float | None) -> tuple[dict, str]:
    """The step's metrics.jsonl record and progress line; a skipped step is counted (and said, on rank 0)."""
    head = f"{run.stage} step {step + 1}/{run.end_step}"
    if applied:
        run.state["bad_steps_in_a_row"] = 0
        record = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                  "tokens_seen": run.state["tokens_seen"], "tokens_per_s": round(tps, 1),
                  "step_seconds": round(dt, 4), "memory_gib": round(memory_gib(run.dist.device), 3), **stats}
        if mfu_per_token_s:
            record["mfu"] = round(mfu_per_token_s * tps, 4)
        return record, (f"{head} loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s"
                        + (f" MFU {record['mfu']:.1%}" if mfu_per_token_s else ""))
    run.state["bad_steps_in_a_row"] += 1
    run.state["bad_steps_total"] += 1
    spike = run.spike
    if spike:
        run.state["spikes_total"] = run.state.get("spikes_total", 0) + 1
    why = spike or (f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}")
    if run.dist.main:
        warn(f"step {step}: {why}; the update is skipped ({run.state['bad_steps_in_a_row']} in a "
             f"row, train.max_bad_steps {run.train.max_bad_steps})")
    return {"step": step, "skipped": True, "reason": why, "lr": lr, "tokens_seen": run.state["tokens_seen"],
            **({"spike_loss": round(loss, 6), "spikes_total": run.state["spikes_total"]} if spike else {}),
            "bad_steps_in_a_row": run.state["bad_steps_in_a_row"],
            "bad_steps_total": run.state["bad_steps_total"]}, f"{head} skipped ({why})"


def start_task_scores(run: Run):
    """train.eval_tasks: rank 0's TaskScorer, its tasks and datasets checked before the first step (a missing one
    is one line on every rank); None without eval_tasks."""
    t, d = run.train, run.dist
    if not t.eval_tasks:
        return None
    if run.task_scorer is None:
        raise SlmError(f"train.eval_tasks: {run.stage} does not score tasks as it goes (pretrain and cooldown do); "
                       "score its checkpoints with slm eval")
    scorer, error = None, None
    if d.main:
        try:
            scorer = run.task_scorer(run)
            info(f"task scores every {plural(t.eval_every, 'step') if t.eval_every else 'run'} and at the end: "
                 f"{scorer.describe()}")
        except SlmError as e:
            error = str(e)
    error = broadcast_object(error, d)
    if error is not None:
        raise SlmError(error)
    return scorer


def task_scores(run: Run, step: int, log: MetricsLog, scorer) -> None:
    """The model after STEP scored on train.eval_tasks by `slm eval`'s code (rank 0; the others wait for it)."""
    d = run.dist
    weights = run.engine.full_weights()  # collective: every rank helps gather
    error = None
    if d.main:
        try:
            scores, seconds = scorer.score(lambda directory: write_model_dir(
                directory, weights, run.model_cfg, run.tokenizer_dir, run.bos_id, run.eos_id))
            log.write({"step": step, "task_scores": {k: round(float(v), 6) for k, v in scores.items()},
                       "tokens_seen": run.state["tokens_seen"], "task_eval_seconds": round(seconds, 2)})
            info(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                 + f" ({seconds:.1f} s of task scoring)")
        except SlmError as e:
            error = str(e)
    error = broadcast_object(error, d)
    if error is not None:
        raise SlmError(error)


def validate(run: Run, step: int, log: MetricsLog) -> None:
    """The held-out loss after STEP, logged (and said, against the unigram baseline)."""
    vl, vstats = evaluate(run)
    rec = {"step": step, "valid_loss": round(vl, 6), "tokens_seen": run.state["tokens_seen"],
           **{f"valid_{k}": round(v, 6) for k, v in vstats.items()}}
    if run.unigram_loss is not None:
        rec["unigram_loss"] = round(run.unigram_loss, 6)
    log.write(rec)
    if run.dist.main:
        info(f"step {step + 1}: valid loss {vl:.4f}" + (
            f" (unigram baseline {run.unigram_loss:.4f})" if run.unigram_loss is not None else ""))


def write_run_manifest(run: Run) -> None:
    """RUN_DIR/manifest.json (kind "run"): the stage, its inputs and lineage, the step it goes to; rewritten by each
    session, so that `slm info` describes a run before (or without) a checkpoint."""
    lineage = {k: v for k, v in run.lineage.items() if k != "inputs"}
    write_json(run.run_dir / "manifest.json", new_manifest(
        "run", {"train": asdict(run.train)}, inputs=run.lineage.get("inputs", []),
        counts={"start_step": run.start_step, "end_step": run.end_step}, **lineage))


def train(run: Run) -> Path:
    """Run steps [start_step, end_step); returns the last checkpoint."""
    d, t, eng = run.dist, run.train, run.engine
    set_deterministic(t.deterministic)
    # dynamic=False: every training micro-batch has the same shape (rows of seq_len), so the graph is static; an
    # odd shape (a short last validation batch) compiles once more instead of turning sizes symbolic. torch 2.13's
    # automatic dynamic shapes (which also follow a forward compiled earlier in the same process) failed in
    # inductor's range analysis on the document-masked forward ("Exponent must be non-negative").
    model = torch.compile(eng.forward_model, dynamic=False) if t.compile else eng.forward_model
    run.model.attention_backend = t.attention
    run.model.activation_checkpointing = t.activation_checkpointing
    model.train()
    autocast, compute = autocast_for(t, d.device), run.loss_fn or lm_loss
    peak = peak_flops(d.device)
    mfu_per_token_s = run.model.flops_per_token(run.seq_len) / (peak * d.world) if peak else None
    log = MetricsLog(run.run_dir, run.start_step if run.state.pop("resumed", False) else None, d.main)
    if d.main:
        write_run_manifest(run)
    for key in ("tokens_seen", "bad_steps_total", "bad_steps_in_a_row"):
        run.state.setdefault(key, 0)
    last_ckpt = None
    prog = ProgressFile(run.run_dir, run.stage, run.start_step, run.end_step, enabled=d.main)
    prog.step(tokens_seen=run.state["tokens_seen"], last_checkpoint=str(latest_checkpoint(run.run_dir) or "") or None,
              force=True)
    heartbeat = Heartbeat()
    started = time.perf_counter()
    lr = run.lr_at(max(run.start_step - 1, 0))
    scorer = start_task_scores(run)
    try:
        with stop_signals(d.main) as stop, (progress() if d.main else contextlib.nullcontext()) as bar:
            task = bar.add_task(run.stage, total=run.end_step - run.start_step) if bar else None
            for step in range(run.start_step, run.end_step):
                stop["step"] = step + 1  # counted from 1, as checkpoints are
                t0 = time.perf_counter()
                lr = run.lr_at(step)
                eng.set_lr(lr)
                loss, stats, grad_norm, applied = take_step(run, model, run.batches.step(run.first_sample_of(step)),
                                                            autocast, compute)
                dt = time.perf_counter() - t0
                run.state["tokens_seen"] += run.batches.samples_per_step * run.seq_len
                tps = run.batches.samples_per_step * run.seq_len / dt
                record, status = step_record(run, step, lr, loss, stats, grad_norm, applied, dt, tps, mfu_per_token_s)
                log.write(record)
                done = step + 1
                if not applied and run.state["bad_steps_in_a_row"] >= t.max_bad_steps:
                    good = last_ckpt or latest_checkpoint(run.run_dir)
                    raise SlmError(f"{run.state['bad_steps_in_a_row']} steps in a row (up to step {step}) had a "
                                   f"non-finite loss or gradient, or a loss spike; the last good checkpoint is "
                                   f"{good or 'none (no checkpoint was saved)'}: lower train.lr_peak or check the "
                                   "data, then resume from it")
                if bar:
                    bar.update(task, advance=1, description=status)
                if d.main:
                    left = (time.perf_counter() - started) / (done - run.start_step) * (run.end_step - done)
                    heartbeat(f"{status} ETA {left / 60:.1f} min", force=done == run.start_step + 1)
                    prog.step(step=done, tokens_seen=run.state["tokens_seen"], lr=lr, tokens_per_s=round(tps, 1),
                              step_seconds=round(dt, 4), eta_s=round(left, 1),
                              loss=round(loss, 6) if math.isfinite(loss) else None, force=done == run.start_step + 1)
                last = done == run.end_step
                if run.valid is not None and (last or (t.eval_every and done % t.eval_every == 0)):
                    validate(run, step, log)
                if scorer is not None and (last or (t.eval_every and done % t.eval_every == 0)):
                    task_scores(run, step, log, scorer)
                stopping = any_rank(stop["signal"] is not None, d)
                if d.main and (written := run.writer.take_written()) is not None:  # a background write finished
                    prog.step(last_checkpoint=str(written), force=True)
                if last or stopping or (t.save_every and done % t.save_every == 0):
                    background = t.async_save and not last and not stopping  # the last one waits, then writes
                    last_ckpt = save(run, done, lr, background)
                    if not background:
                        prog.step(last_checkpoint=str(last_ckpt), force=True)
                if stopping and not last:
                    why = f"stopped by {stop['signal'] or 'a signal'} after step {done}"
                    prog.end("stopped", message=f"{why}; run the same command again to resume")
                    saved = f"{why}; checkpoint {last_ckpt} saved"
                    if run.requeue and d.main:
                        requeue_job(saved)
                    raise Stopped(f"{saved}; run the same command again to resume")
    except SlmError as e:
        if prog.data["state"] == "running":
            prog.end("stopped" if isinstance(e, Interrupted) else "failed", message=str(e))
        raise
    finally:  # a failing or interrupted run still finishes the write in flight (a whole checkpoint, or none)
        if (error := run.writer.wait()) is not None and d.main:
            warn(error)
        if scorer is not None:
            scorer.close()
        eng.close()
    if last_ckpt is None and (found := latest_checkpoint(run.run_dir)) is not None:  # already at end_step
        last_ckpt = checkpoints_dir(run.run_dir) / found.name  # named as a save names it: under the run as given
    prog.end("done", step=run.end_step, last_checkpoint=str(last_ckpt) if last_ckpt else None)
    if d.main:
        err.print(f"{run.stage}: {plural(run.end_step - run.start_step, 'step')} done; checkpoint {last_ckpt}",
                  soft_wrap=True)
        plot(run.run_dir)
    return last_ckpt
