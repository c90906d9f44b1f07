"""RUN/metrics.jsonl: one JSON object per line, written by the training loop (rank 0), read by plot, status,
report, info and the stages that summarise a run.

    a step          {"step", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "step_seconds", "memory_gib",
                     ["mfu"], [the loss's own terms]}
    a skipped step  {"step", "skipped": true, "reason", "lr", "tokens_seen", "bad_steps_in_a_row", "bad_steps_total"}
    a validation    {"step", "valid_loss", "tokens_seen", ["unigram_loss"], ["valid_<term>"]}

`step` counts from 0. A run that resumes drops the lines from its resumed step on before it writes again, so the
file always describes one history. The last line of a run killed while writing may be cut short: readers skip it;
any other line that is not JSON is an error naming its line.
"""

from __future__ import annotations

import json
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
    """A run's last training step and last validation: {run, step, loss, lr, valid_loss, valid_step, unigram_loss,
    tokens_seen, first_valid_loss} (the parts it has)."""
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "valid_loss" in r]
    out = {"run": str(run_dir)}
    if steps:
        out.update(step=steps[-1].get("step"), loss=steps[-1].get("loss"), lr=steps[-1].get("lr"))
    if valid:
        out.update(valid_loss=valid[-1]["valid_loss"], valid_step=valid[-1].get("step"),
                   unigram_loss=valid[-1].get("unigram_loss"), tokens_seen=valid[-1].get("tokens_seen"),
                   first_valid_loss=valid[0]["valid_loss"])
    return out


class MetricsLog:
    """The writer. RESUME_STEP: lines from that step on are dropped first (None: a new run, an empty file).
    ENABLED is False on every rank but 0."""

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
