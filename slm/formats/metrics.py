"""What a training run writes about itself as it trains: RUN/metrics.jsonl and RUN/progress.json.

RUN/metrics.jsonl: one JSON object per line, written by the training loop (rank 0), read by plot, status,
report, info and the stages that summarise a run.

    a step          {"step", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "step_seconds", "memory_gib",
                     ["mfu"], [the loss's own terms]}
    a skipped step  {"step", "skipped": true, "reason", "lr", "tokens_seen", "bad_steps_in_a_row", "bad_steps_total",
                     ["spike_loss", "spikes_total"] (a loss spike: train.spike_window, train.spike_sigma)}
    a validation    {"step", "valid_loss", "tokens_seen", ["unigram_loss"], ["valid_<term>"]}

`step` counts from 0. A run that resumes drops the lines from its resumed step on before it writes again, so the
file always describes one history. The last line of a run killed while writing may be cut short: readers skip it;
any other line that is not JSON is an error naming its line.

RUN/progress.json: where a training run is, written by the run itself (rank 0), read by `slm status`.

    stage, state ("running" | "done" | "stopped" | "failed"), step (steps done), total_steps, start_step,
    tokens_seen, loss, lr, tokens_per_s, step_seconds, eta_s, last_checkpoint, message, host, pid,
    slurm_job_id, started_utc, updated_utc

Written atomically (temp file, rename) at most every few seconds and when the run ends: never half a file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
from pathlib import Path

from slm.errors import SlmError

NAME = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of RUN_DIR/metrics.jsonl ([] when there is none)."""
    p = Path(run_dir) / NAME
    if not p.is_file():
        return []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SlmError(f"{p}: not readable ({e})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                continue  # a line being written when the run was stopped
            raise SlmError(f"{p}:{i}: not a JSON line") from None
        if isinstance(r, dict):
            out.append(r)
    return out


def last_metrics(run_dir: Path) -> dict:
    """A run's last training step and last validation (step, loss, lr, valid_loss, unigram_loss ...). Steps are
    counted as checkpoints and progress.json count them, steps done (metrics.jsonl numbers each from 0)."""
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "valid_loss" in r]
    out = {"run": str(run_dir)}

    def done(r):
        return r["step"] + 1 if isinstance(r.get("step"), int) else None

    if steps:
        out.update(step=done(steps[-1]), loss=steps[-1].get("loss"), lr=steps[-1].get("lr"))
    if valid:
        out.update(valid_loss=valid[-1]["valid_loss"], valid_step=done(valid[-1]),
                   unigram_loss=valid[-1].get("unigram_loss"), tokens_seen=valid[-1].get("tokens_seen"),
                   first_valid_loss=valid[0]["valid_loss"])
    return out


class MetricsLog:
    """The writer (ENABLED on rank 0); a resumed run drops the lines from RESUME_STEP on, a new one (None) all."""

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool):
        self.path = Path(run_dir) / NAME
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) < resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif enabled and resume_step is None:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


PROGRESS = "progress.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ProgressFile:
    def __init__(self, run_dir: Path, stage: str, start_step: int, end_step: int, enabled: bool = True,
                 every_s: float = 5.0):
        self.path = Path(run_dir) / PROGRESS
        self.enabled = enabled
        self.every_s = every_s
        self.last_write = 0.0
        self.data = {"stage": stage, "state": "running", "step": start_step, "start_step": start_step,
                     "total_steps": end_step, "tokens_seen": None, "loss": None, "lr": None, "tokens_per_s": None,
                     "step_seconds": None, "eta_s": None, "last_checkpoint": None, "message": None,
                     "host": socket.gethostname(), "pid": os.getpid(),
                     "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started_utc": _now(), "updated_utc": _now()}
        self._write()

    def _write(self) -> None:
        if not self.enabled:
            return
        self.data["updated_utc"] = _now()
        tmp = self.path.with_name(f".{PROGRESS}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)
        except OSError:  # a full disk must not stop training; the checkpoint code reports it
            tmp.unlink(missing_ok=True)
        self.last_write = time.monotonic()

    def step(self, force: bool = False, **values) -> None:
        self.data.update(values)
        if force or time.monotonic() - self.last_write >= self.every_s:
            self._write()

    def end(self, state: str, **values) -> None:
        self.data.update(values, state=state, eta_s=0 if state == "done" else None)
        self._write()


def read_progress(run_dir: Path) -> dict | None:
    p = Path(run_dir) / PROGRESS
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
