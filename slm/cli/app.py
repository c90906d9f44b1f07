"""The `slm` typer application and its root options; each module of slm.cli adds its commands to it."""

from __future__ import annotations

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
