"""`slm quantize` (and later `slm bench`): release formats of a checkpoint and their cost in quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from slm.cli import app
from slm.cli.train import _print_main


@app.command("quantize", rich_help_panel="Deployment")
def quantize(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint or run directory.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory.", show_default=False)] = None,
    type_: Annotated[str, typer.Option("--type", help="Comma-separated: f32, f16, bf16, q8_0, q4_0, q4_1 (GGUF by "
                                       "slm), q5_k_m, q4_k_m (GGUF by llama.cpp), int4 (OpenVINO IR).")] =
    "f16,q8_0,q4_0,q4_1,q5_k_m,q4_k_m,int4",
    valid: Annotated[Optional[list[str]], typer.Option("--valid", metavar="FILE|DIR", help="Held-out text for the "
                     "quality report (.jsonl with text, .txt, or a tokens directory); default: held-out text of the "
                     "embedded corpus.", show_default=False)] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Held-out tokens the report scores.")] = 4096,
    window: Annotated[int, typer.Option("--window", help="Tokens per scored window (at most the context).")] = 256,
    no_report: Annotated[bool, typer.Option("--no-report", help="Write the files only.")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="File name stem (default: the run's name).",
                                                show_default=False)] = None,
    int4_group_size: Annotated[int, typer.Option("--int4-group-size", help="Input channels per int4 scale (falls "
                                                 "back to 64, 32 or per-row when it does not divide).")] = 128,
    int4_asymmetric: Annotated[bool, typer.Option("--int4-asymmetric", help="INT4_ASYM (with zero points) "
                                                  "instead of INT4_SYM.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for llama.cpp and OpenVINO.",
                                                   show_default=False)] = None,
) -> None:
    """Write a checkpoint as GGUF files and an INT4 OpenVINO IR, and report what each costs: perplexity, KL
    divergence and top-1 agreement against the fp32 model on held-out tokens, size and bits per weight; prints the
    directory (quantize.json has the numbers)."""
    from slm.errors import SlmError
    from slm.stages.quantize import QuantizeConfig, parse_types, run

    for flag, value in (("--eval-tokens", eval_tokens), ("--window", window), ("--int4-group-size", int4_group_size)):
        if value < 2:
            raise SlmError(f"{flag} {value}: expected at least 2")
    _print_main(run(QuantizeConfig(checkpoint=checkpoint, out=out, types=parse_types(type_), valid=list(valid or []),
                                   eval_tokens=eval_tokens, window=window, threads=threads, name=name,
                                   int4_group_size=int4_group_size, int4_symmetric=not int4_asymmetric,
                                   report=not no_report)))
