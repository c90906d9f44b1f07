"""`slm tokenize build | train | encode | corpus`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from slm.cli.options import app as slm_app, Json, Out, TextKey, TxtMode, emit

app = typer.Typer(help="Tokenizers (Arcade100k, or trained on your text), and text -> Megatron .bin/.idx shards."
                       "\n\nExamples:\n\n\b\n"
                       "  slm tokenize build --out arcade100k\n"
                       "  slm tokenize corpus --out corpus\n"
                       "  slm tokenize encode --tokenizer arcade100k corpus/code --out tokens/code",
                  no_args_is_help=True)
slm_app.add_typer(app, name="tokenize", short_help="Tokenizers, and text -> Megatron .bin/.idx shards")


@app.command("build", short_help="Build Arcade100k, StableLM 2's tokenizer")
def build(
    out: Out,
    base: Annotated[str, typer.Option(help="Base ranks: cl100k_base gives Arcade100k, StableLM 2's tokenizer.")] = "cl100k_base",
    ranks: Annotated[Optional[Path], typer.Option(
        help="A local cl100k_base.tiktoken(.gz), checked against the published sha256. Default: tiktoken's cache, "
             "or a download when online.")] = None,
    json_out: Json = False,
) -> None:
    """Build Arcade100k, StableLM 2's tokenizer; prints its directory.

    cl100k_base's ranks, every digit its own token, NFC, 32 special tokens at ids 100257-100288.

    Example:

    \b
      slm tokenize build --out arcade100k [--ranks cl100k_base.tiktoken.gz]
    """
    from slm.stages.tokenize import BuildConfig, run

    emit(run(BuildConfig(out=out, base=base, ranks=ranks)), json_out)


@app.command("train", short_help="Train a byte-level BPE tokenizer on your text")
def train(
    corpus: Annotated[list[str], typer.Option("--corpus", help="Training text (files, directories, globs); repeatable.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Total vocabulary, special tokens included.")],
    out: Out,
    rules: Annotated[str, typer.Option(help="'arcade' (StableLM 2: cl100k regex, digits split, 32 specials after the "
                                            "ranks) or 'smollm' (SmolLM2: GPT-2 regex, digits split, 17 specials first).")] = "arcade",
    text_key: TextKey = "text",
    txt_mode: TxtMode = "file",
    min_frequency: Annotated[int, typer.Option(help="Minimum count of a pair to be merged.")] = 2,
    max_mb: Annotated[Optional[float], typer.Option(help="Train on at most this many MB of text.")] = None,
    json_out: Json = False,
) -> None:
    """Train a byte-level BPE on your text; prints its directory.

    Hugging Face tokenizers' trainer with Arcade100k's or SmolLM2's pre-tokenizer and special tokens.

    Example:

    \b
      slm tokenize train --corpus 'data/*.jsonl' --vocab-size 49152 \\
          --rules smollm --out tok
    """
    from slm.stages.tokenize import TrainConfig, run

    emit(run(TrainConfig(corpus=corpus, vocab_size=vocab_size, out=out, rules=rules, text_key=text_key,
                               txt_mode=txt_mode, min_frequency=min_frequency, max_mb=max_mb)), json_out)


@app.command("encode", short_help="Encode documents into Megatron .bin/.idx shards")
def encode(
    inputs: Annotated[list[str], typer.Argument(help="Files, directories or globs: .jsonl .jsonl.gz .jsonl.zst "
                                                     ".parquet .txt, datasets saved with save_to_disk, or - (standard "
                                                     "input: JSONL records, or text when it does not start with {).",
                                                show_default=False)],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="Tokenizer directory.", show_default=False)],
    out: Out,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes (0 = one per CPU).")] = 0,
    text_key: TextKey = "text",
    no_eos: Annotated[bool, typer.Option("--no-eos", help="Do not append the end-of-document token.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip and count bad records and empty inputs.")] = False,
    txt_mode: TxtMode = "file",
    shard_mb: Annotated[float, typer.Option(help="Input MB per shard for inputs that can be cut.")] = 256.0,
    json_out: Json = False,
) -> None:
    """Encode documents into Megatron .bin/.idx shards; prints the tokens directory.

    uint16 or int32 ids, an end-of-document token after each document, worker processes; a re-run reuses the shards
    of unchanged inputs and a failed run resumes where it stopped.

    Examples:

    \b
      slm tokenize encode --tokenizer tok data/ --out tokens/web
      zcat x.jsonl.gz | slm tokenize encode -t tok - -o tokens/x
    """
    from slm.stages.encode import EncodeConfig, run, summary

    path = run(EncodeConfig(tokenizer=tokenizer, inputs=inputs, out=out, workers=workers, text_key=text_key,
                            eos=not no_eos, skip_bad=skip_bad, txt_mode=txt_mode, shard_mb=shard_mb))
    print(json.dumps(summary(path)) if json_out else str(path), flush=True)


@app.command("corpus", short_help="Build the embedded default corpus (Python's stdlib)")
def corpus(
    out: Out,
    stdlib: Annotated[Optional[Path], typer.Option(help="Standard library to read (default: this Python's).")] = None,
    heldout_percent: Annotated[float, typer.Option(help="Percent of files in the held-out split.")] = 2.0,
    no_tests: Annotated[bool, typer.Option("--no-tests", help="Leave out the standard library's test suite.")] = False,
    json_out: Json = False,
) -> None:
    """Build the embedded default corpus from this machine's Python standard library; prints its directory.

    code/ and prose/ sources, each with train.jsonl and valid.jsonl. Nothing is downloaded.

    Example:

    \b
      slm tokenize corpus --out corpus
    """
    from slm.stages.corpus import CorpusConfig, run

    emit(run(CorpusConfig(out=out, stdlib=stdlib, heldout_percent=heldout_percent, include_tests=not no_tests)),
         json_out)
