"""`slm quantize | bench`: release formats of a checkpoint, what they cost in quality, and how fast they run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from slm.cli.options import app, Json, emit


@app.command("quantize", short_help="GGUF and INT4 files, with what each costs in quality")
def quantize(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint or run directory.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory.", show_default=False)] = None,
    type_: Annotated[Optional[str], typer.Option("--type", help="Comma-separated: f32, f16, bf16, q8_0, q4_0, q4_1 "
                                                 "(GGUF by slm), q5_k_m, q4_k_m (GGUF by llama.cpp), int4 (OpenVINO "
                                                 "IR). Default: f16,q8_0,q4_0,q4_1,q5_k_m,q4_k_m,int4 (none with "
                                                 "--gguf).", show_default=False)] = None,
    gguf: Annotated[Optional[list[Path]], typer.Option("--gguf", help="A GGUF file written elsewhere (llama.cpp's "
                                                       "quantizer, an imatrix run) to score against this checkpoint "
                                                       "too; refused unless it is this checkpoint's model "
                                                       "(repeatable).", show_default=False)] = None,
    valid: Annotated[Optional[list[str]], typer.Option("--valid", metavar="FILE|DIR", help="Held-out text for the "
                     "quality report (.jsonl with text or chat messages, .txt, or a tokens directory); default: "
                     "held-out text of the embedded corpus.", show_default=False)] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Held-out tokens the report scores.")] = 4096,
    window: Annotated[int, typer.Option("--window", help="Tokens per scored window (at most the context).")] = 256,
    no_report: Annotated[bool, typer.Option("--no-report", help="Write the files only.")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="File name stem (default: the run's name).",
                                                show_default=False)] = None,
    int4_group_size: Annotated[int, typer.Option("--int4-group-size", help="Input channels per int4 scale (falls "
                                                 "back to 64, 32 or per-row when it does not divide).")] = 128,
    int4_asymmetric: Annotated[bool, typer.Option("--int4-asymmetric", help="INT4_ASYM (with zero points) "
                                                  "instead of INT4_SYM.")] = False,
    int4_all_layers: Annotated[bool, typer.Option("--int4-all-layers", help="The embedding and output matrix in 4 "
                                                  "bits too (NNCF keeps them 8-bit by default).")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for llama.cpp and OpenVINO.",
                                                   show_default=False)] = None,
    json_out: Json = False,
) -> None:
    """Write a checkpoint as GGUF files and an INT4 OpenVINO IR, and report what each costs: perplexity, KL
    divergence and top-1 agreement against the fp32 model on held-out tokens, size and bits per weight; prints the
    directory (quantize.json has the numbers).

    Example:

    \b
      slm quantize runs/selfknow --type f16,q8_0,q4_k_m,int4 \\
          --valid chat/valid.jsonl --out release
    """
    from slm.stages.quantize import DEFAULT_TYPES, QuantizeConfig, parse_types, run

    types = parse_types(type_) if type_ is not None else ([] if gguf else list(DEFAULT_TYPES))
    emit(run(QuantizeConfig(checkpoint=checkpoint, out=out, types=types, gguf=list(gguf or []), valid=list(valid or []),
                            eval_tokens=eval_tokens, window=window, threads=threads, name=name,
                            int4_group_size=int4_group_size, int4_symmetric=not int4_asymmetric,
                            int4_all_layers=int4_all_layers, report=not no_report)), json_out)


@app.command("bench", short_help="Tokens/s, latency and memory of models (as llama-bench)")
def bench(
    models: Annotated[list[Path], typer.Argument(help="Checkpoints, .gguf files or INT4 directories.",
                                                 show_default=False)],
    backend: Annotated[str, typer.Option("--backend", help="auto (by file), torch, llama.cpp or openvino.")] = "auto",
    prompt: Annotated[int, typer.Option("--prompt", help="Prompt tokens (random ids).")] = 512,
    gen: Annotated[int, typer.Option("--gen", help="Generated tokens.")] = 128,
    repeat: Annotated[int, typer.Option("--repeat", help="Measured runs after a warm-up.")] = 5,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all this process may "
                                                   "use).", show_default=False)] = None,
    batch: Annotated[int, typer.Option("--batch", help="Sequences at once (torch backend).")] = 1,
    dtype: Annotated[str, typer.Option("--dtype", help="torch backend: fp32 or bf16.")] = "fp32",
    compile_: Annotated[bool, typer.Option("--compile", help="torch backend: compile the decode step with "
                                           "torch.compile (tens of seconds once, in the warm-up; faster steps).")] = False,
    bandwidth: Annotated[Optional[float], typer.Option("--bandwidth", help="Memory bandwidth in GB/s for the bound "
                                                       "(default: measured).", show_default=False)] = None,
    format_: Annotated[str, typer.Option("--format", help="md, json or csv: what stdout gets without --out.")] = "md",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write bench.json, .md, .csv and .png here and "
                                                "print the directory.", show_default=False)] = None,
    plot_: Annotated[Optional[Path], typer.Option("--plot", help="Also draw generation tokens/s against the bound "
                                                  "into this PNG.", show_default=False)] = None,
    json_out: Json = False,
) -> None:
    """Prompt-processing and generation tokens/s (mean ± std), time to first token, peak memory and size of each
    model, with the memory-bandwidth bound of generation and the fraction reached; like llama-bench's table.

    Example:

    \b
      slm bench runs/selfknow release/selfknow-q4_k_m.gguf --prompt 128 \\
          --gen 32 --out bench
    """
    from slm.stages.bench import BenchConfig, run, table

    cfg = BenchConfig(models=list(models), backend=backend, prompt=prompt, gen=gen, repeat=repeat, threads=threads,
                      batch=batch, dtype=dtype, compile=compile_, bandwidth=bandwidth, out=out, plot=plot_,
                      format="json" if json_out and out is None else format_)
    if out is not None:
        emit(run(cfg), json_out)
    else:
        print(table(cfg))
