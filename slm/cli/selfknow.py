"""`slm selfknow generate | train`: self-knowledge by RLCD pairs and C-RLFT (StableLM 2's third post-training stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from slm.cli.options import (app as slm_app, Device, Json, NoZeroRunFlags, RunOut, Sets, SkipBad, StopAfter, emit,
                             complete_recipes, field_help, grouped)
from slm.errors import UsageError

app = typer.Typer(help="Teach a chat model who it is: RLCD pairs from a FACTS file (generate), then C-RLFT (train)."
                       "\n\nExamples:\n\n\b\n"
                       "  slm selfknow generate --base runs/cooldown --chat runs/dpo \\\n"
                       "      --facts facts.yaml --out pairs\n"
                       "  slm selfknow train --model runs/dpo --data pairs --out runs/selfknow",
                  no_args_is_help=True)
slm_app.add_typer(app, name="selfknow", short_help="Teach a chat model who it is (RLCD pairs, C-RLFT)")

Facts = Annotated[Optional[Path], typer.Option("--facts", help="FACTS.yaml: name, maker, training data, limits, "
                                                               "examples (slm/formats/facts.py).", show_default=False)]


@app.command("generate", short_help="Make self-knowledge pairs (RLCD) from a FACTS file")
def generate(
    chat: Annotated[Optional[Path], typer.Option("--chat", help="The chat checkpoint that answers.",
                                                 show_default=False)] = None,
    facts: Facts = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory.", show_default=False)] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="The base checkpoint that writes the first user "
                                                 "messages.", show_default=False)] = None,
    n: Annotated[int, typer.Option("--n", help="Distinct first messages the base model writes (StableLM 2: about "
                                               "10k); FACTS' example messages come on top.")] = 10_000,
    temperature: Annotated[float, typer.Option("--temperature", help="Answers: sampling temperature (RLCD: 1).")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Answers: nucleus mass.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Answers: keep the k likeliest tokens (0: all).")] = 0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Answers: longest answer "
                                                                          "(RLCD: 300).")] = 300,
    message_temperature: Annotated[float, typer.Option("--message-temperature", help="First messages: sampling "
                                                                                     "temperature.")] = 1.0,
    message_top_p: Annotated[float, typer.Option("--message-top-p", help="First messages: nucleus mass.")] = 0.95,
    message_max_tokens: Annotated[int, typer.Option("--message-max-tokens", help="First messages: longest "
                                                                                 "message.")] = 64,
    shots: Annotated[int, typer.Option("--shots", help="Example messages in each of the base model's prompts.")] = 8,
    near_duplicate: Annotated[float, typer.Option("--near-duplicate", help="Character 4-gram Jaccard similarity from "
                                                  "which two messages are near duplicates.")] = 0.7,
    seed_messages: Annotated[bool, typer.Option("--seed-messages/--no-seed-messages", help="Answer FACTS' example "
                                                "messages too.")] = True,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences generated at once.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling.")] = 0,
    device: Device = "auto",
    json_out: Json = False,
) -> None:
    """Make self-knowledge pairs (RLCD): the base model writes first user messages (deduplicated), the chat model
    answers each with the facts in its system prompt (chosen) and without (rejected); prints the directory.

    OUT/pairs.jsonl is valid `slm dpo` input; OUT/messages.jsonl, OUT/facts.yaml and OUT/manifest.json (models,
    facts hash, sampling settings, counts) come with it.

    Example:

    \b
      slm selfknow generate --base runs/cooldown --chat runs/dpo \\
          --facts examples/facts.yaml --out selfknow
    """
    from slm.inference.chat import Sampling
    from slm.stages.selfknow_pairs import GenerateConfig, run

    emit(run(GenerateConfig(
        base=base, chat=chat, facts=facts, out=out, n=n, answer=Sampling(temperature, top_p, top_k, max_new_tokens),
        message=Sampling(message_temperature, message_top_p, 0, message_max_tokens), shots=shots, seed=seed,
        near_duplicate=near_duplicate, seed_messages=seed_messages, batch_size=batch_size, device=device)), json_out)


def class_weights(text: str) -> str:
    """pos=1.0,neg=0.1 -> a YAML mapping for --set selfknow.class_weights=..."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("pos", "neg"):
            raise UsageError(f"--class-weights {text!r}: expected pos=W,neg=W (e.g. pos=1.0,neg=0.1)")
        try:
            out[key] = float(value)
        except ValueError:
            raise UsageError(f"--class-weights {text!r}: {key}: expected a number, got {value!r}") from None
    if set(out) != {"pos", "neg"}:
        raise UsageError(f"--class-weights {text!r}: expected both pos and neg")
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in out.items()) + "}"


@app.command("train", short_help="Train a chat model on self-knowledge pairs (C-RLFT)")
@grouped
def train(
    model: Annotated[Optional[Path], typer.Option("--model", help="The chat checkpoint (or run directory).",
                                                  show_default=False)] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", metavar="DIR|FILE", help="A `slm selfknow generate` "
                                                      "directory, or preference files (repeatable).",
                                                      show_default=False)] = None,
    out: RunOut = None,
    facts: Annotated[Optional[Path], typer.Option("--facts", help="FACTS.yaml for the before/after check on its "
                                                  "held-out questions (default: the data directory's).",
                                                  show_default=False)] = None,
    class_weights_: Annotated[Optional[str], typer.Option("--class-weights", help=field_help(
        "selfknow.class_weights", "as pos=W,neg=W"), show_default=False)] = None,
    kl_coef: Annotated[Optional[float], typer.Option("--kl-coef", help=field_help("selfknow.kl_coef"),
                                                     show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help=field_help("selfknow.epochs"),
                                                  show_default=False)] = None,
    negative_token: Annotated[Optional[str], typer.Option("--negative-token", help=field_help(
        "selfknow.negative_token"), show_default=False)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Take selfknow: settings from this recipe "
                                                                  "(default: the model's).",
                                                                  autocompletion=complete_recipes)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A YAML with selfknow: / train: sections.")] = None,
    steps: StopAfter = None,
    skip_bad: SkipBad = False,
    set_: Sets = None,
    flags: NoZeroRunFlags = None,
    json_out: Json = False,
) -> None:
    """Train a chat model on self-knowledge pairs by C-RLFT; prints the last checkpoint.

    Chosen answers are trained as SFT with weight pos; rejected ones with weight neg after the negative-class token
    (added to the tokenizer and the embedding when absent); --kl-coef > 0 adds a KL term towards the starting model,
    whose log-probabilities are cached in OUT/reference_logprobs/. With FACTS' held-out questions, OUT/selfknow.json
    tells how many answers state the name and maker before and after.

    Example:

    \b
      slm selfknow train --model runs/dpo --data selfknow --recipe tiny \\
          --out runs/selfknow
    """
    from slm.stages.selfknow import TrainConfig, run

    sets = list(set_ or [])
    if class_weights_ is not None:
        sets.append(f"selfknow.class_weights={class_weights(class_weights_)}")
    sets += [f"selfknow.{k}={v}" for k, v in (("kl_coef", kl_coef), ("epochs", epochs),
                                                ("negative_token", negative_token)) if v is not None]
    emit(run(TrainConfig(model=model, data=list(data or []), out=out, facts=facts, recipe=recipe, config_file=config,
                         skip_bad=skip_bad, steps=steps, **flags.config(sets))), json_out)
