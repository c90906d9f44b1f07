"""`slm status RUNDIR`: where a training run is, from the run's own files, for local runs and SLURM jobs alike.

The run writes RUN/progress.json as it goes (slm.formats.metrics): step of total, tokens, loss, learning rate,
tokens/s, ETA, last checkpoint, state. `slm status` adds whether the process is still there: on the same host, by
its pid; under SLURM, by `squeue` when it is on PATH (PENDING, RUNNING, REQUEUED ...); otherwise by how long ago the
file was last updated. Runs without progress.json (written by an older slm) are read from metrics.jsonl and the
checkpoints.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

from slm.errors import SlmError
from slm.formats.metrics import read_metrics, read_progress


def _age_s(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        t = _dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    return (_dt.datetime.now(_dt.timezone.utc) - t).total_seconds()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_state(job: str) -> str | None:
    if not shutil.which("squeue"):
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    state = out.stdout.strip().splitlines()
    return state[0] if out.returncode == 0 and state else None


def status(run_dir: Path) -> dict:
    from slm.formats.checkpoint import list_checkpoints  # torch: not for every `slm --help`

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SlmError(f"{run_dir}: no such directory")
    p = read_progress(run_dir)
    ckpts = list_checkpoints(run_dir)
    if p is None:
        if not (run_dir / "metrics.jsonl").is_file() and not ckpts:
            raise SlmError(f"{run_dir}: not a training run (no progress.json, metrics.jsonl or checkpoints/)")
        steps = [r for r in read_metrics(run_dir) if "loss" in r]
        last = steps[-1] if steps else {}
        p = {"stage": None, "state": "unknown (no progress.json)", "step": last.get("step", -1) + 1,
             "total_steps": None, "tokens_seen": last.get("tokens_seen"), "loss": last.get("loss"),
             "lr": last.get("lr"), "tokens_per_s": last.get("tokens_per_s"), "eta_s": None,
             "last_checkpoint": str(ckpts[-1]) if ckpts else None}
        return p
    p = dict(p)
    p["checkpoints"] = len(ckpts)
    p["updated_s_ago"] = _age_s(p.get("updated_utc"))
    if p.get("state") == "running":
        job = p.get("slurm_job_id")
        sl = _slurm_state(job) if job else None
        if sl is not None:
            p["slurm_state"] = sl
        elif p.get("host") == socket.gethostname() and isinstance(p.get("pid"), int):
            if not _pid_alive(p["pid"]):
                p["state"] = "died (its process is gone; run the same command again to resume)"
        elif job:
            p["slurm_state"] = "not in the queue (finished, failed or cancelled)"
            if (p["updated_s_ago"] or 0) > 60:
                p["state"] = "died (not in SLURM's queue; run the job again to resume)"
        elif (p["updated_s_ago"] or 0) > max(300, 20 * float(p.get("step_seconds") or 0)):
            p["state"] = f"stale (no update for {p['updated_s_ago'] / 60:.0f} min; another host)"
    return p


def _fmt_s(s) -> str:
    if s is None:
        return "-"
    s = float(s)
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def render(run_dir: Path, p: dict) -> str:
    total = p.get("total_steps")
    step = p.get("step")
    done = f"{step}/{total} ({step / total:.0%})" if total else f"{step}"
    rows = [("run", str(run_dir)), ("stage", p.get("stage") or "-"), ("state", p.get("state") or "-"),
            ("step", done), ("tokens", f"{p['tokens_seen']:,}" if p.get("tokens_seen") is not None else "-"),
            ("loss", f"{p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else "-"),
            ("lr", f"{p['lr']:.3g}" if isinstance(p.get("lr"), (int, float)) else "-"),
            ("tokens/s", f"{p['tokens_per_s']:,.0f}" if isinstance(p.get("tokens_per_s"), (int, float)) else "-"),
            ("ETA", _fmt_s(p.get("eta_s"))), ("last checkpoint", p.get("last_checkpoint") or "-")]
    if p.get("slurm_job_id"):
        rows.append(("SLURM job", f"{p['slurm_job_id']} ({p.get('slurm_state', '-')})"))
    if p.get("updated_s_ago") is not None:
        rows.append(("updated", f"{_fmt_s(p['updated_s_ago'])} ago on {p.get('host')} (pid {p.get('pid')})"))
    if p.get("message"):
        rows.append(("message", p["message"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def as_json(p: dict) -> str:
    return json.dumps(p, indent=2, default=str)
