"""stderr for people, stdout for results: the rich console and progress bars every stage uses."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

err = Console(stderr=True, highlight=False)

# "[rank R/W] " before every line a process of a multi-process run writes (set by slm.train.dist.setup).
_rank_prefix = ""


def set_rank(rank: int, world: int) -> None:
    global _rank_prefix
    _rank_prefix = f"[rank {rank}/{world}] " if world > 1 else ""


def rank_prefix() -> str:
    return _rank_prefix


def warn(message: str) -> None:
    err.print(f"{escape(_rank_prefix)}[yellow]warning:[/] {message}", soft_wrap=True)


def info(message: str) -> None:
    if not os.environ.get("SLM_QUIET"):
        err.print(escape(_rank_prefix) + message, soft_wrap=True)


def table(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column table (what, how many) on stderr."""
    from rich.table import Table

    t = Table(title=title, title_style="bold", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    for k, v in rows:
        t.add_row(escape(str(k)), escape(str(v)))
    err.print(t)


class RateColumn(ProgressColumn):
    """Shows a rate of a task field (e.g. bytes or tokens) per second, with a unit."""

    def __init__(self, field: str, unit: str, scale: float = 1.0):
        super().__init__()
        self.field, self.unit, self.scale = field, unit, scale

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        value = task.fields.get(self.field, task.completed if self.field == "completed" else 0)
        if elapsed <= 0:
            return Text(f"- {self.unit}", style="progress.data.speed")
        rate = value / elapsed / self.scale
        return Text(f"{rate:,.1f} {self.unit}", style="progress.data.speed")


def progress(*rates: RateColumn, transient: bool = False) -> Progress:
    """A progress bar on stderr with ETA and the given rate columns. Silent when stderr is not a terminal
    unless SLM_PROGRESS=1 (rich then prints the final state only)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), *rates,
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=transient,
                    disable=not (err.is_terminal or os.environ.get("SLM_PROGRESS")))


@contextlib.contextmanager
def stdout_to_stderr():
    """Send what a library prints on standard output to stderr instead (file descriptor 1 included, for
    subprocesses and C code): stdout carries slm's results only. DeepSpeed, for one, prints its build messages."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class Heartbeat:
    """Where no progress bar is drawn (stderr is a file: SLURM logs, CI), a plain line at most every SECONDS
    (SLM_LOG_SECONDS, default 30) so that long work still reports how far it is."""

    def __init__(self, seconds: float | None = None):
        import time

        self._time = time.monotonic
        self.seconds = float(os.environ.get("SLM_LOG_SECONDS", seconds if seconds is not None else 30))
        self.enabled = not err.is_terminal
        self.last = self._time()  # the first line comes after SECONDS (or when forced)

    def __call__(self, message: str, force: bool = False) -> None:
        now = self._time()
        if self.enabled and (force or now - self.last >= self.seconds):
            self.last = now
            info(message)
