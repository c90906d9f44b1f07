"""stderr for people, stdout for results: the rich console and progress bars every stage uses."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

err = Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def info(message: str) -> None:
    if not os.environ.get("SLM_QUIET"):
        err.print(message, soft_wrap=True)


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
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        *rates,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=not (err.is_terminal or os.environ.get("SLM_PROGRESS")),
    )


def stdout(line: str) -> None:
    """Results only: a path or a JSON document."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
