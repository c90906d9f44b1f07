"""`slm eval` and `slm carbon`: what a model scores and what making it cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from slm.cli import app
from slm.cli.train import _print_main


@app.command("eval", rich_help_panel="Measurement")
def eval_(
    models: Annotated[list[Path], typer.Argument(help="Checkpoints, run directories or .gguf files.",
                                                 show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.", show_default=False)],
    suite: Annotated[Optional[str], typer.Option("--suite", help="stablelm2-leaderboard, stablelm2-multilingual, "
                                                 "smollm2-base, smollm2-instruct or slm-local (offline).",
                                                 show_default=False)] = None,
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
) -> None:
    """Score models with lm-evaluation-harness, side by side: checkpoints through its transformers model, GGUF
    files through llama.cpp in this process; papers' suites or local tasks; prints the directory (eval.json has
    the numbers, lm-eval/ its results and per-sample logs).

    Example: slm eval runs/base runs/selfknow release/selfknow-q4_k_m.gguf --suite slm-local --out eval/
    """
    from slm.stages.eval import EvalConfig, run

    _print_main(run(EvalConfig(
        models=list(models), out=out, suite=suite, tasks=[t.strip() for t in (tasks or "").split(",") if t.strip()],
        include_path=list(include_path or []), shots=shots, limit=int(limit) if limit and limit >= 1 else limit,
        batch_size=batch_size, chat_template=chat_template, threads=threads, seed=seed,
        bootstrap_iters=bootstrap_iters, plot=plot_, mt_bench=mt_bench, judge=judge, judge_model=judge_model)))
