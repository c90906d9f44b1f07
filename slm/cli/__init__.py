"""The `slm` command: one thin typer command per stage; each parses, validates, calls the stage, prints the path."""

from __future__ import annotations

import os
import sys

import typer

from slm import __version__

app = typer.Typer(
    name="slm",
    help="Train small language models the way StableLM 2 1.6B and SmolLM2 were trained.\n\n"
         "tokenize -> mix -> pretrain -> cooldown -> sft -> dpo -> selfknow -> quantize -> bench -> eval -> carbon\n\n"
         "Each stage reads files or directories, writes one output directory and prints its path on stdout.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"slm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    local_rank: int = typer.Option(None, "--local_rank", "--local-rank", hidden=True,
                                   help="Set by the deepspeed launcher; slm reads LOCAL_RANK from the environment."),
) -> None:
    """slm: from raw text to a quantized, benchmarked, evaluated chat model."""


# Commands register themselves on import, in the order of the pipeline.
from slm.cli import tokenize as _tokenize  # noqa: E402

app.add_typer(_tokenize.app, name="tokenize", rich_help_panel="Data")
from slm.cli import mix as _mix  # noqa: E402,F401
from slm.cli import train as _train  # noqa: E402,F401
from slm.cli import post as _post  # noqa: E402,F401
from slm.cli import selfknow as _selfknow  # noqa: E402

app.add_typer(_selfknow.app, name="selfknow", rich_help_panel="Post-training")
from slm.cli import deploy as _deploy  # noqa: E402,F401
from slm.cli import measure as _measure  # noqa: E402,F401
from slm.cli import inspect as _inspect  # noqa: E402,F401


def main() -> None:
    """Entry point: known errors become one line on stderr and exit code 1, a run stopped by a signal after saving
    exits 75 (slm.errors); SLM_DEBUG=1 shows the traceback."""
    from slm import energy
    from slm.errors import SlmError

    try:
        stage = energy.stage_of(sys.argv)
        if stage is None:
            app(prog_name="slm")
        else:
            with energy.Meter(stage):
                app(prog_name="slm")
    except SlmError as e:
        if os.environ.get("SLM_DEBUG"):
            raise
        from rich.text import Text

        from slm.console import err

        from slm.console import rank_prefix

        err.print(Text.assemble(rank_prefix(), ("error: " if e.exit_code == 1 else "", "red"), str(e)),
                  soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
