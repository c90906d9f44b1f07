"""The `slm` command: one thin typer command per stage; each parses, validates, calls the stage, prints the path."""

from __future__ import annotations

import importlib
import os
import signal
import sys

from slm.cli.options import app
from slm.errors import EX_TEMPFAIL, SlmError, UsageError

__all__ = ["app", "main"]

# The commands that compute (and so run an energy meter, slm.energy); help, dry runs and views do not.
COMPUTING = {"tokenize", "pretrain", "cooldown", "sft", "dpo", "selfknow", "quantize", "bench", "eval", "chat-data",
             "mix"}

# Each module adds its commands to `app` when imported; this order (the pipeline's) is the order of `slm --help`.
for _module in ("tokenize", "mix", "train", "post", "selfknow", "deploy", "measure", "inspect"):
    importlib.import_module(f"slm.cli.{_module}")


def main() -> None:
    """Entry point: a known error is one line on stderr and its exit code (slm.errors: 1 an error, 2 bad usage, 75
    stopped by a signal after saving); SLM_DEBUG=1 shows the traceback."""
    stage = stage_of(sys.argv)
    if stage is None and hasattr(signal, "SIGPIPE"):  # a view or generate piped into `head`: stop quietly, as cat does
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if stage is None:
            code = _app()
        else:
            from slm import energy  # not for --help, completion or a view: `slm` starts fast

            with energy.Meter(stage):
                code = _app()
    except SlmError as e:
        _fail(str(e), e.exit_code)
    except BrokenPipeError:  # stdout's reader left (`| head`): stop quietly, as a process SIGPIPE ends
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes it
        sys.exit(128 + 13)
    except OSError as e:  # what the system refused outside a stage's own checks: a full disk, a permission
        _fail(f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e), 1)
    except KeyboardInterrupt:  # outside a training loop, which saves at Ctrl-C: nothing to keep
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    """MESSAGE as one line on stderr ("error: ..." unless the run saved and stopped), then exit CODE; SLM_DEBUG=1:
    the traceback instead."""
    if os.environ.get("SLM_DEBUG"):
        raise
    from rich.text import Text

    from slm.console import err, rank_prefix  # rich: only when there is something to say

    err.print(Text.assemble(rank_prefix(), ("error: " if code != EX_TEMPFAIL else "", "red"), message), soft_wrap=True)
    sys.exit(code)


def _app():
    """Run the app, a usage error (unknown option, missing argument: typer draws them in a box of many lines) as
    UsageError's one line; `slm` alone prints its help on stderr and exits 2."""
    try:
        return app(prog_name="slm", standalone_mode=False)
    except Exception as e:  # typer's usage errors are click's UsageError: recognised by what they carry
        if getattr(e, "exit_code", None) != 2 or not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        cmd = ctx.command_path if ctx is not None else "slm"
        if len(sys.argv) <= 1 or type(e).__name__ == "NoArgsIsHelpError":
            sys.stderr.write(ctx.get_help() + "\n" if ctx is not None else "")
            raise UsageError(f"{cmd}: give a command (slm -h lists them)") from None
        raise UsageError(f"{cmd}: {e.format_message()} (see {cmd} -h)") from None


def stage_of(argv: list[str]) -> str | None:
    """The computing stage a command line runs (None: not one, or only help / a dry run)."""
    words = [a for a in argv[1:] if not a.startswith("-")][:2]
    if not words or words[0] not in COMPUTING or {"--help", "-h", "--dry-run"} & set(argv):
        return None
    return f"{words[0]} {words[1]}" if words[0] in ("tokenize", "selfknow") and len(words) > 1 else words[0]
