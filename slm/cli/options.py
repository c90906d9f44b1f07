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
