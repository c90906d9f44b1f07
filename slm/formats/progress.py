"""RUN/progress.json: where a training run is, written by the run itself (rank 0), read by `slm status`.

    stage, state ("running" | "done" | "stopped" | "failed"), step (steps done), total_steps, start_step,
    tokens_seen, loss, lr, tokens_per_s, step_seconds, eta_s, last_checkpoint, message, host, pid,
    slurm_job_id, started_utc, updated_utc

Written atomically (temp file, rename) at most every few seconds while running and always when the run ends, so a
reader never sees half a file, and the cost is nothing next to a step.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
from pathlib import Path

NAME = "progress.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ProgressFile:
    def __init__(self, run_dir: Path, stage: str, start_step: int, end_step: int, enabled: bool = True,
                 every_s: float = 5.0):
        self.path = Path(run_dir) / NAME
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
        tmp = self.path.with_name(f".{NAME}.tmp-{os.getpid()}")
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


def read(run_dir: Path) -> dict | None:
    p = Path(run_dir) / NAME
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
