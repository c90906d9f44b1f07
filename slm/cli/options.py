"""Option types shared by the commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Out = Annotated[Path, typer.Option("--out", "-o", help="The output directory to write (replaced atomically).",
                                   show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout instead of the output path.")]
TextKey = Annotated[str, typer.Option("--text-key", help="The JSON field / column that holds each document's text.")]
TxtMode = Annotated[str, typer.Option("--txt-mode", help=".txt inputs: 'file' = one document per file, "
                                                         "'paragraph' = one per block separated by blank lines.")]


def emit(path: Path, json_out: bool = False) -> None:
    """A stage's stdout: its output path, or with --json a summary of what it wrote (slm.stages.info.summary).
    Only rank 0 prints, so that `$(torchrun ... slm pretrain ...)` gets one path."""
    import json
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    if json_out:
        from slm.stages.info import summary

        print(json.dumps(summary(Path(path)), indent=2, default=str), flush=True)
    else:
        print(path, flush=True)
