"""`slm mix`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from slm.cli.options import app, Json
from slm.errors import UsageError


@app.command("mix", short_help="Plan a data mixture and print its token ledger")
def mix(
    mixture: Annotated[str, typer.Argument(metavar="MIX", help="A mixture YAML file, a recipe name "
                                                               "(tiny, smollm2-1_7b, stablelm-2-1_6b), or a recipe's "
                                                               "step (smollm2-1_7b:long_context).",
                                           show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The mix directory to write.")] = None,
    source: Annotated[Optional[list[str]], typer.Option(
        "--source", "-s", help="NAME=TOKENS_DIR: set a source's path (repeatable).")] = None,
    source_root: Annotated[Optional[Path], typer.Option(
        help="Bind every source without a path to SOURCE_ROOT/NAME.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Override the mixture's sequence length.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Override the mixture's seed.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the ledger; write nothing.")] = False,
    json_out: Json = False,
) -> None:
    """Plan a data mixture and print its token ledger.

    Per phase and source: the weight, tokens drawn, tokens available and epochs (on stderr). The data order is a
    pure function of (plan, seed, sample number), so any process reads any range of samples.

    Examples:

    \b
      slm mix tiny --source code=tokens/code --source prose=tokens/prose \\
          --out mix
      slm mix smollm2-1_7b --source-root tokens --dry-run
    """
    from slm.stages.mix import MixConfig, dry_run as plan, run

    bindings = {}
    for item in source or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--source {item!r}: expected NAME=TOKENS_DIR")
        bindings[name] = path
    cfg = MixConfig(mix=mixture, out=out, sources=bindings, source_root=source_root, seq_len=seq_len, seed=seed)
    if dry_run:
        p = plan(cfg)
        if json_out:
            print(json.dumps(p, indent=2), flush=True)
        return
    path = run(cfg)
    print(json.dumps(json.loads((path / "plan.json").read_text()), indent=2) if json_out else str(path), flush=True)
