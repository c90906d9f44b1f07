"""`slm info | status | report`: read-only views of what slm wrote (slm.views): what an artifact is and where it
came from, where a run is, and one summary of a pipeline's results."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from slm.cli.options import app
from slm.errors import AT_LEAST_0, POSITIVE, check_ranges


@app.command("info", short_help="What an artifact is and where it came from")
def info(
    path: Annotated[Path, typer.Argument(help="A directory slm wrote, a run directory, a checkpoint or a .gguf file.",
                                         show_default=False)],
    json_: Annotated[bool, typer.Option("--json", help="Print the manifest summary and ancestry as JSON.")] = False,
    depth: Annotated[int, typer.Option("--depth", help="How many generations of inputs to follow.")] = 8,
) -> None:
    """Print an artifact's manifest summary and its ancestry: the tokenizer, data, mix and checkpoints that made it
    (from each manifest's inputs, parent and mix), as a tree, or as JSON for jq.

    Examples:

    \b
      slm info runs/selfknow
      slm info release/selfknow-q4_k_m.gguf --json | jq .from
    """
    from slm.views import info as info_view

    check_ranges({"depth": depth}, depth=AT_LEAST_0)
    node = info_view.describe(path, depth)
    if json_:
        print(json.dumps(node, indent=2, default=str))
    else:
        from rich.console import Console

        out = Console(highlight=False)
        if not sys.stdout.isatty():  # a pipe or a file: whole lines, no terminal width
            out = Console(highlight=False, width=100_000, no_color=True)
        out.print(info_view.render(node), crop=False)


@app.command("status", short_help="Where a training run is: step, loss, ETA, process")
def status(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory (pretrain, cooldown, sft, dpo, selfknow "
                                            "train).", show_default=False)],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Update until the run ends (Ctrl-C to leave).")] =
    False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between updates with --follow.")] = 2.0,
    json_: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Where a run is: step of total, tokens, loss, learning rate, tokens/s, ETA, last checkpoint, and whether its
    process (or SLURM job) is still there; from the run's own progress.json, for local runs and SLURM jobs alike.

    Example:

    \b
      slm status runs/pretrain --follow
    """
    from slm.views import status as status_view

    check_ranges({"interval": interval}, interval=POSITIVE)
    p = status_view.status(run_dir)
    if not follow:
        print(status_view.as_json(p) if json_ else status_view.render(run_dir, p))
        return
    try:
        while True:
            print(status_view.as_json(p) if json_ else status_view.render(run_dir, p) + "\n", flush=True)
            if p.get("state") != "running":
                break
            time.sleep(interval)
            p = status_view.status(run_dir)
    except KeyboardInterrupt:
        pass


@app.command("report", short_help="One summary of everything slm made under a directory")
def report(
    directory: Annotated[Path, typer.Argument(help="A directory holding slm's outputs (a pipeline's working "
                                              "directory).", show_default=False)],
    json_: Annotated[bool, typer.Option("--json", help="Print the report's data as JSON.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the Markdown report to this "
                                                "file.", show_default=False)] = None,
) -> None:
    """One summary of everything slm made under a directory: held-out losses of each training run against the
    unigram baseline, DPO's preference accuracy before and after, the self-knowledge check, the quantization
    quality table, the bench table, the eval table and the carbon bill; read from the files the stages wrote.

    Examples:

    \b
      slm report quickstart-out
      slm report . --json | jq '.dpo[0].preference_accuracy_after'
    """
    from slm.views import report as report_view

    data = report_view.collect(directory)
    text = report_view.render(data)
    if out is not None:
        report_view.write(Path(out), text)
    print(json.dumps(data, indent=2, default=str) if json_ else text, end="" if not json_ else "\n")
