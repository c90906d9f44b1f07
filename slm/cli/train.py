"""`slm pretrain | cooldown | generate | plot`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from slm.cli.options import (app, complete_recipe_steps, complete_recipes, Device, PlanFlags, RunFlags, Sets, Steps,
                             TokenizerOpt, Tokens, Valid, emit, grouped)
from slm.errors import SlmError, UsageError


def _tokens(value: str | None) -> int | None:
    if value is None:
        return None
    from slm.recipes import parse_budget

    try:
        return parse_budget(value, "--tokens")
    except SlmError as e:  # a value on the command line: bad usage
        raise UsageError(str(e)) from None


def _plan_or_run(cfg, p: PlanFlags, plan, run) -> None:
    """--dry-run: the plan (on stderr; with --json on stdout too); else the run, and its last checkpoint printed."""
    if not p.dry_run:
        return emit(run(cfg), p.json_out)
    from slm.train.cost import DryRun, print_plan

    result = plan(cfg, DryRun(gpu=p.gpu, gpus=p.gpus, mfu=p.mfu, gpu_hours=p.gpu_hours))
    print_plan(result)
    if p.json_out:
        print(json.dumps(result, indent=2))


@app.command("pretrain", short_help="Pretrain a StableLM 2 or SmolLM2 model on a mix")
@grouped
def pretrain(
    data: Annotated[Optional[Path], typer.Option("--data", help="The mix directory (from `slm mix`).",
                                                 show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The run directory (resumes if it has "
                                                                    "checkpoints).", show_default=False)] = None,
    recipe: Annotated[Optional[str], typer.Option(help="tiny, smollm2-135m, smollm2-360m, smollm2-1_7b, "
                                                       "stablelm-2-1_6b.", autocompletion=complete_recipes)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A YAML file with model: and train: "
                                                                     "sections (wins over the recipe).")] = None,
    set_: Sets = None,
    steps: Steps = None,
    tokens: Tokens = None,
    init: Annotated[Optional[Path], typer.Option(help="Start from these weights (slm or transformers checkpoint).")] = None,
    valid: Valid = None,
    tokenizer: TokenizerOpt = None,
    flags: RunFlags = None,
    planning: PlanFlags = None,
) -> None:
    """Pretrain a StableLM 2 or SmolLM2 model on a mix; prints the last checkpoint.

    Run under torchrun, srun or the deepspeed launcher for several processes (--engine ddp, fsdp or deepspeed). Re-running the same command resumes where it stopped, on any number of processes; SIGTERM / SIGUSR1 save first and exit with code 75. --dry-run prints what the run will cost.

    Examples:

    \b
      slm pretrain --recipe tiny --data mix --valid tokens/valid \\
          --out runs/pretrain
      slm pretrain --recipe smollm2-1_7b --dry-run --gpu h100 --gpus 256
    """
    from slm.stages.pretrain import PretrainConfig, dry_run as plan, run

    _plan_or_run(PretrainConfig(data=data, out=out, recipe=recipe, config_file=config, steps=steps,
                                tokens=_tokens(tokens), init=init, valid=valid, tokenizer=tokenizer,
                                **flags.config(set_)), planning, plan, run)


@app.command("cooldown", short_help="Cool a checkpoint down: the learning rate decays to 0")
@grouped
def cooldown(
    source: Annotated[Path, typer.Option("--from", help="The checkpoint (or run directory) to cool down; with "
                                         "--dry-run, a recipe name plans one before it exists.",
                                         show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", help="The mix to cool down on.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The cooldown's run directory.",
                                                show_default=False)] = None,
    steps: Steps = None,
    tokens: Tokens = None,
    lr_start: Annotated[Optional[float], typer.Option(help="Start here instead of the checkpoint's learning rate.")] = None,
    phase: Annotated[Optional[str], typer.Option(help="Start at this phase of the mix (e.g. decay).")] = None,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", help="RECIPE:STEP: a recipe's cooldown step, its --set values and length (e.g. "
                         "smollm2-1_7b:long_context, the 2k -> 8k context extension); flags win.",
        show_default=False, autocompletion=complete_recipe_steps)] = None,
    set_: Sets = None,
    valid: Valid = None,
    tokenizer: TokenizerOpt = None,
    flags: RunFlags = None,
    planning: PlanFlags = None,
) -> None:
    """Cool a checkpoint down: the learning rate decays linearly to 0; prints the last checkpoint.

    StableLM 2's cooldown and SmolLM2's decay phase. Weights and AdamW moments continue from the checkpoint.

    Example:

    \b
      slm cooldown --from runs/pretrain --data mix --phase decay --steps 30 \\
          --out runs/cooldown
    """
    from slm.stages.cooldown import CooldownConfig, dry_run as plan, run

    _plan_or_run(CooldownConfig(source=source, data=data, out=out, steps=steps, tokens=_tokens(tokens),
                                lr_start=lr_start, phase=phase, recipe=recipe, valid=valid, tokenizer=tokenizer,
                                **flags.config(set_)), planning, plan, run)


@app.command("generate", short_help="Continue a prompt, or answer a chat message")
def generate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint or run directory.", show_default=False)],
    prompt: Annotated[Optional[str], typer.Argument(help="The text to continue; - reads prompts from standard input, "
                                                    "one per line, and prints one JSON line per prompt "
                                                    "({\"prompt\", \"completion\"}).", show_default=False)] = None,
    chat: Annotated[Optional[str], typer.Option("--chat", help="Answer this user message with the checkpoint's chat "
                                                "template, stopping at its end of turn; - reads conversations from "
                                                "standard input, one JSON per line ({\"messages\": [...]}), and "
                                                "prints each continued conversation as a JSON line.",
                                                show_default=False)] = None,
    template: Annotated[Optional[str], typer.Option("--template", help="With --chat: this chat template instead of "
                                                    "the checkpoint's own (chatml, zephyr, or a Jinja file).",
                                                    show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely (0 = all).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the sampler.")] = 1234,
    device: Device = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object ({\"prompt\", \"completion\"}, or "
                                                         "{\"messages\"} with --chat) instead of streaming text.")]
    = False,
) -> None:
    """Continue PROMPT (or answer --chat) with a KV cache, streaming tokens to stdout.

    Examples:

    \b
      slm generate runs/cooldown "def fibonacci(n):" --temperature 0
      slm generate runs/sft --chat "Hi!"
    """
    from slm.inference.generate import GenerateConfig, Generator

    if chat is None and prompt is None:
        raise UsageError("give a PROMPT to continue, or --chat MESSAGE")
    if template is not None and chat is None:
        raise UsageError("--template: only with --chat (a PROMPT is continued as it is)")
    gen = Generator(GenerateConfig(checkpoint=checkpoint, prompt=prompt or "", max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, device=device,
                                   template=template))
    if chat == "-" or (prompt == "-" and chat is None):
        for line in gen.lines(sys.stdin, chat=chat == "-"):
            print(line, flush=True)
        return
    messages = [{"role": "user", "content": chat}] if chat is not None else None
    if json_out:
        text = "".join(gen.text(prompt or "", messages))
        print(json.dumps({"messages": messages + [{"role": "assistant", "content": text}]} if chat is not None
                         else {"prompt": prompt, "completion": text}, ensure_ascii=False))
        return
    for piece in gen.text(prompt or "", messages):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command("plot", short_help="Draw a run's loss curve (loss.png)")
def plot_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUNDIR", help="A run directory (with metrics.jsonl).",
                                            show_default=False)],
    json_out: Annotated[bool, typer.Option("--json", help="Print {\"path\": the plot} as JSON.")] = False,
) -> None:
    """Draw RUNDIR/loss.png from metrics.jsonl; prints its path.

    Example:

    \b
      slm plot runs/pretrain
    """
    from slm.train.metrics import plot

    path = plot(run_dir)
    if path is None:
        raise SlmError(f"{run_dir}: no training steps in metrics.jsonl to plot")
    if json_out:
        print(json.dumps({"path": str(path)}))
    else:
        print(path)
