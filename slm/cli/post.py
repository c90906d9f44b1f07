"""`slm sft | dpo | chat-data`: post-training on chat and preference data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from slm.cli.options import (app, complete_recipes, Data, Json, RunFlags, RunOut, Sets, SkipBad, StopAfter, emit,
                             field_help, grouped, section_sets)


@app.command("sft", short_help="Fine-tune a checkpoint on conversations")
@grouped
def sft(
    model: Annotated[Optional[Path], typer.Option("--model", help="The checkpoint (or run directory) to fine-tune.",
                                                  show_default=False)] = None,
    data: Data = None,
    out: RunOut = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Take sft: settings from this recipe (default: "
                                                                  "the model's).",
                                                                  autocompletion=complete_recipes)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A YAML with sft: / train: sections.")] = None,
    template: Annotated[Optional[str], typer.Option("--template", help=field_help("sft.template"))] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help=field_help("sft.epochs"))] = None,
    max_turns: Annotated[Optional[int], typer.Option("--max-turns", help=field_help("sft.max_turns"))] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help=field_help("sft.max_length"))] = None,
    overlong: Annotated[Optional[str], typer.Option("--overlong", help=field_help("sft.overlong"))] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help=field_help("sft.packing"),
                                                    show_default=False)] = None,
    valid: Annotated[Optional[list[str]], typer.Option("--valid", metavar="FILE", help="Held-out chat files: validation loss on "
                                                                       "assistant tokens.")] = None,
    steps: StopAfter = None,
    skip_bad: SkipBad = False,
    set_: Sets = None,
    flags: RunFlags = None,
    json_out: Json = False,
) -> None:
    """Fine-tune a checkpoint on conversations (loss on the assistant's tokens); prints the last checkpoint.

    Chat records: {"messages": [{"role", "content"}...]} or ShareGPT's {"conversations": [{"from", "value"}...]}.
    The chat template goes into the checkpoint's tokenizer, so transformers' apply_chat_template and
    `slm generate --chat` use it. Resumes like pretrain; SIGTERM / SIGUSR1 save and exit 75.

    Example:

    \b
      slm sft --model runs/cooldown --recipe tiny --data chat/train.jsonl \\
          --valid chat/valid.jsonl --out runs/sft
    """
    from slm.stages.sft import SftConfig, run

    sets = section_sets(list(set_ or []), "sft", template=template, epochs=epochs, max_turns=max_turns,
                        overlong=overlong, max_length=max_length, packing=None if packing is None else str(packing).lower())
    emit(run(SftConfig(model=model, data=list(data or []), out=out, recipe=recipe, config_file=config,
                       valid=list(valid or []), skip_bad=skip_bad, steps=steps, **flags.config(sets))), json_out)


@app.command("chat-data", short_help="Make small chat and preference sets (quickstart, tests)")
def chat_data(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.", show_default=False)],
    n: Annotated[int, typer.Option("--n", help="Questions in the training split.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed.")] = 0,
    facts: Annotated[Optional[Path], typer.Option("--facts", help="A FACTS.yaml (slm selfknow): 30% of the persona "
                                                  "conversations are under its system prompt.",
                                                  show_default=False)] = None,
    persona_fraction: Annotated[float, typer.Option("--persona-fraction", help="Persona conversations, as a fraction "
                                                    "of --n.")] = 0.4,
    json_out: Json = False,
) -> None:
    """Make small chat and preference sets (arithmetic, unit conversions, this machine's Python code) with
    held-out splits: OUT/chat/{train,valid}.jsonl, OUT/pairs/{train,valid}.jsonl. For the quickstart and tests.

    Example:

    \b
      slm chat-data --n 1000 --facts examples/facts.yaml --out chatdata
    """
    from slm.stages.chat_data import ChatDataConfig, run

    emit(run(ChatDataConfig(out=out, n=n, seed=seed, facts=facts, persona_fraction=persona_fraction)),
         json_out)


@app.command("dpo", short_help="Direct Preference Optimization of a chat checkpoint")
@grouped
def dpo(
    model: Annotated[Optional[Path], typer.Option("--model", help="The fine-tuned checkpoint (or run directory).",
                                                  show_default=False)] = None,
    data: Data = None,
    out: RunOut = None,
    ref: Annotated[Optional[Path], typer.Option("--ref", help="The reference checkpoint (default: --model).")] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Take dpo: settings from this recipe (default: "
                                                                  "the model's).",
                                                                  autocompletion=complete_recipes)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A YAML with dpo: / train: sections.")] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", help=field_help("dpo.beta"))] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help=field_help("dpo.loss"))] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help=field_help("dpo.epochs"))] = None,
    min_chosen_score: Annotated[Optional[float], typer.Option("--min-chosen-score",
                                                              help=field_help("dpo.min_chosen_score"))] = None,
    template: Annotated[Optional[str], typer.Option("--template", help=field_help("dpo.template"))] = None,
    valid: Annotated[Optional[list[str]], typer.Option("--valid", metavar="FILE", help="Held-out preference files: accuracy and "
                                                                       "rewards as it trains, before and after.")] = None,
    steps: StopAfter = None,
    skip_bad: SkipBad = False,
    set_: Sets = None,
    flags: RunFlags = None,
    json_out: Json = False,
) -> None:
    """Direct Preference Optimization of a fine-tuned checkpoint; prints the last checkpoint.

    Pairs: {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} (chosen / rejected as text or as
    conversations, UltraFeedback's shape) or Intel Orca pairs' {"system", "question", "chosen", "rejected"}. The
    reference's log-probabilities are computed once into OUT/reference_logprobs/ and reused.

    Example:

    \b
      slm dpo --model runs/sft --recipe tiny --data pairs/train.jsonl \\
          --valid pairs/valid.jsonl --out runs/dpo
    """
    from slm.stages.dpo import DpoConfig, run

    sets = section_sets(list(set_ or []), "dpo", beta=beta, loss=loss, epochs=epochs,
                        min_chosen_score=min_chosen_score, template=template)
    emit(run(DpoConfig(model=model, data=list(data or []), out=out, ref=ref, recipe=recipe, config_file=config,
                       valid=list(valid or []), skip_bad=skip_bad, steps=steps, **flags.config(sets))), json_out)
