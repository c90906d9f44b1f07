"""The `slm` command: one thin typer command per stage; each parses, validates, calls the stage, prints the path."""

from __future__ import annotations

import importlib
import os
import sys

from slm.cli.options import app
from slm.errors import SlmError

__all__ = ["app", "main"]

# The commands that compute (and so run an energy meter, slm.energy); help, dry runs and views do not.
COMPUTING = {"tokenize", "pretrain", "cooldown", "sft", "dpo", "selfknow", "quantize", "bench", "eval", "chat-data",
             "mix"}

# Each module adds its commands to `app` when imported; this order (the pipeline's) is the order of `slm --help`.
for _module in ("tokenize", "mix", "train", "post", "selfknow", "deploy", "measure", "inspect"):
    importlib.import_module(f"slm.cli.{_module}")


def main() -> None:
    """Entry point: known errors become one line on stderr and exit code 1, a run stopped by a signal after saving
    exits 75 (slm.errors); SLM_DEBUG=1 shows the traceback."""
    try:
        stage = stage_of(sys.argv)
        if stage is None:
            app(prog_name="slm")
        else:
            from slm import energy  # not for --help, completion or a view: `slm` starts fast

            with energy.Meter(stage):
                app(prog_name="slm")
    except SlmError as e:
        if os.environ.get("SLM_DEBUG"):
            raise
        from rich.text import Text

        from slm.console import err, rank_prefix  # rich: only when there is something to say

        err.print(Text.assemble(rank_prefix(), ("error: " if e.exit_code == 1 else "", "red"), str(e)),
                  soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


def stage_of(argv: list[str]) -> str | None:
    """The computing stage a command line runs (None: not one, or only help / a dry run)."""
    words = [a for a in argv[1:] if not a.startswith("-")][:2]
    if not words or words[0] not in COMPUTING or {"--help", "-h", "--dry-run"} & set(argv):
        return None
    return f"{words[0]} {words[1]}" if words[0] in ("tokenize", "selfknow") and len(words) > 1 else words[0]
