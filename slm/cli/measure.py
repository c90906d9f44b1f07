"""`slm eval` and `slm carbon`: what a model scores and what making it cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from slm.cli.options import app, complete_gpus, complete_suites, emit
from slm.devices import GPUS
from slm.errors import SlmError, UsageError


@app.command("eval", short_help="Score models with lm-evaluation-harness, side by side")
def eval_(
    models: Annotated[list[Path], typer.Argument(help="Checkpoints, run directories or .gguf files.",
                                                 show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.", show_default=False)],
    suite: Annotated[Optional[str], typer.Option("--suite", help="stablelm2-leaderboard, stablelm2-multilingual, "
                                                 "smollm2-base, smollm2-instruct or slm-local (offline).",
                                                 show_default=False, autocompletion=complete_suites)] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated lm-eval task names (also "
                                                 "slm_heldout, slm_cloze, slm_arith).", show_default=False)] = None,
    include_path: Annotated[Optional[list[Path]], typer.Option("--include-path", help="A directory of lm-eval YAML "
                            "tasks (over local JSONL, for example).", show_default=False)] = None,
    shots: Annotated[Optional[int], typer.Option("--shots", help="Few-shot examples for every task (default: the "
                                                 "suite's, else the task's).", show_default=False)] = None,
    limit: Annotated[Optional[float], typer.Option("--limit", help="Score only this many documents per task (or "
                                                   "this fraction, below 1).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size of the transformers model.")] = 8,
    chat_template: Annotated[Optional[bool], typer.Option("--chat-template/--no-chat-template", help="Render "
                             "prompts with each model's chat template (default: the suite's setting, else off).",
                             show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of few-shot sampling and generation.")] = 1234,
    bootstrap_iters: Annotated[int, typer.Option("--bootstrap-iters", help="lm-eval's bootstrap resamples for "
                                                 "standard errors of non-mean metrics (0: none).")] = 1000,
    plot_: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the scores as a bar chart PNG.",
                                                  show_default=False)] = None,
    mt_bench: Annotated[Optional[Path], typer.Option("--mt-bench", help="MT-Bench-style questions (JSONL: "
                        "question_id, category, turns) to answer and have judged.", show_default=False)] = None,
    judge: Annotated[Optional[str], typer.Option("--judge", help="The judge for --mt-bench: a checkpoint, a .gguf "
                     "file, or an OpenAI-compatible endpoint URL (http://host:port/v1).", show_default=False)] = None,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="The model name an HTTP judge "
                           "expects.", show_default=False)] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print eval.json on stdout instead of the directory.")] = False,
) -> None:
    """Score models with lm-evaluation-harness, side by side: checkpoints through its transformers model, GGUF
    files through llama.cpp in this process; papers' suites or local tasks; prints the directory (eval.json has
    the numbers, lm-eval/ its results and per-sample logs).

    Example:

    \b
      slm eval runs/base runs/selfknow release/selfknow-q4_k_m.gguf \\
          --suite slm-local --out eval/
    """
    from slm.stages.eval import EvalConfig, run

    done = (run(EvalConfig(
        models=list(models), out=out, suite=suite, tasks=[t.strip() for t in (tasks or "").split(",") if t.strip()],
        include_path=list(include_path or []), shots=shots, limit=int(limit) if limit and limit >= 1 else limit,
        batch_size=batch_size, chat_template=chat_template, threads=threads, seed=seed,
        bootstrap_iters=bootstrap_iters, plot=plot_, mt_bench=mt_bench, judge=judge, judge_model=judge_model)))
    if json_:
        print((done / "eval.json").read_text())
    else:
        emit(done)


class CarbonCommand(TyperCommand):
    """`slm carbon`, whose first argument may be `estimate`: `slm carbon estimate --help` then shows the estimate's
    own usage, text and options."""

    ESTIMATE = {"gpu_hours", "gpu", "power", "pue", "intensity", "region", "json_", "help"}
    ESTIMATE_HELP = ("The carbon of a run from its GPU-hours, as papers publish it: GPU-hours x power x PUE x grid "
                     "intensity, with the same at other places for the range.\n\nExample:\n\n\b\n"
                     "  slm carbon estimate --gpu-hours 92000 --gpu a100-40gb --pue 1.2 \\\n"
                     "      --region USA:virginia")

    def parse_args(self, ctx, args):
        ctx.meta["slm.estimate"] = args[:1] == ["estimate"]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter) -> None:
        if not ctx.meta.get("slm.estimate"):
            return super().format_help(ctx, formatter)
        formatter.write_usage(f"{ctx.command_path} estimate", "[OPTIONS]")
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(self.ESTIMATE_HELP)
        rows = [p.get_help_record(ctx) for p in self.get_params(ctx) if p.name in self.ESTIMATE]
        with formatter.section("Options"):
            formatter.write_dl([(a, b[10].upper() + b[11:] if b.startswith("estimate: ") else b)
                                for a, b in filter(None, rows)])


@app.command("carbon", cls=CarbonCommand, short_help="The energy and carbon bill, or a GPU-hours estimate")
def carbon(
    dirs: Annotated[list[str], typer.Argument(help="Stage or run directories (or directories holding them); or "
                                              "`estimate` for the GPU-hours estimate.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write carbon.json, carbon.md and a manifest "
                                                "here and print the directory.", show_default=False)] = None,
    pue: Annotated[float, typer.Option("--pue", help="Power usage effectiveness of the data centre (total / IT "
                                       "energy; the meters measure the machine).")] = 1.0,
    intensity: Annotated[Optional[float], typer.Option("--intensity", help="Grid intensity in g CO2eq/kWh (default: "
                         "each record's place, from codecarbon's data).", show_default=False)] = None,
    region: Annotated[Optional[str], typer.Option("--region", help="A place for the intensity: USA, FRA, "
                      "USA:oregon, SWE:SE3, gcp:us-central1, world.", show_default=False)] = None,
    gpu_hours: Annotated[Optional[float], typer.Option("--gpu-hours", help="estimate: GPU-hours of the run.",
                                                       show_default=False)] = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="estimate: the GPU whose board power to take from its "
                                               "datasheet (slm.devices; as `--dry-run --gpu`): " + ", ".join(GPUS)
                                               + "; a100 = a100-80gb.", show_default=False,
                                               autocompletion=complete_gpus)] = None,
    power: Annotated[Optional[float], typer.Option("--power", help="estimate: average watts per GPU instead of "
                                                   "--gpu's board power.", show_default=False)] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """The energy and carbon bill: per stage and in total (energy, time, device-hours, kg CO2eq) from what each
    stage's meter measured, with the assumptions and a paragraph for a model card; or `estimate`: GPU-hours x power
    x PUE x grid intensity, as papers publish it.

    Examples:

    \b
      slm carbon runs/ tokens/ release/ eval/ --pue 1.1 --out carbon/
      slm carbon estimate --gpu-hours 92000 --gpu a100-40gb --pue 1.2 \\
          --region USA:virginia
    """
    from slm.stages import carbon as c

    if dirs and dirs[0] == "estimate":
        if len(dirs) > 1:
            raise UsageError(f"carbon estimate: unexpected argument {dirs[1]!r}")
        if gpu_hours is None:
            raise UsageError("carbon estimate: give --gpu-hours")
        print(json.dumps(c.estimate(gpu_hours, gpu, power, pue, intensity, region), indent=2) if json_
              else c.estimate_text(gpu_hours, gpu, power, pue, intensity, region))
        return
    for flag, value in (("--gpu-hours", gpu_hours), ("--gpu", gpu), ("--power", power)):
        if value is not None:
            raise SlmError(f"{flag}: only with `slm carbon estimate`")
    cfg = c.CarbonConfig(dirs=[Path(d) for d in dirs], pue=pue, intensity=intensity, region=region, out=out)
    if out is not None:
        emit(c.run(cfg))
    elif json_:
        print(json.dumps(c.report(cfg), indent=2))
    else:
        print(c.text(cfg))
