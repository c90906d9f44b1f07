"""The `slm` typer app and the options its commands share, defined once. An option that sets a config field
(train.keep, sft.epochs, dpo.beta ...) takes its help from the field's docstring in slm/train/config.py, read from
the source (importing the module would load torch for `--help`)."""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from typer.core import TyperGroup

from slm import __version__
from slm.devices import GPUS
from slm.errors import MASS, POSITIVE, UsageError, check_ranges

# `slm --help` lists the commands in the pipeline's order, then the views.
ORDER = ["tokenize", "mix", "pretrain", "cooldown", "sft", "chat-data", "dpo", "selfknow", "generate", "plot",
         "quantize", "bench", "eval", "carbon", "info", "status", "report"]


class PipelineOrder(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        return sorted(super().list_commands(ctx), key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


# Help is click's plain layout (rich_markup_mode=None): it wraps to any width and never cuts an option's name. A
# paragraph after \b keeps its lines (the examples).
app = typer.Typer(
    name="slm", cls=PipelineOrder,
    help="Train small language models the way StableLM 2 1.6B and SmolLM2 were trained.\n\n"
         "tokenize -> mix -> pretrain -> cooldown -> sft -> dpo -> selfknow -> quantize -> bench -> eval -> carbon\n\n"
         "Each stage reads files or directories, writes one output directory and prints its path on stdout; "
         "`slm COMMAND -h` says how to run it.\n\n"
         "Examples:\n\n\b\n"
         "  bash examples/quickstart.sh out     # every stage, embedded corpus, CPU\n"
         "  slm tokenize corpus --out corpus\n"
         "  slm pretrain --recipe smollm2-1_7b --dry-run --gpu h100 --gpus 256\n"
         "  slm info out/release/selfknow-q4_k_m.gguf",
    no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        print(f"slm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    local_rank: int = typer.Option(None, "--local_rank", "--local-rank", hidden=True,
                                   help="Set by the deepspeed launcher; slm reads LOCAL_RANK from the environment."),
) -> None:
    """slm: from raw text to a quantized, benchmarked, evaluated chat model."""


CONFIG_SOURCE = Path(__file__).resolve().parents[1] / "train" / "config.py"
SECTION_OF_CLASS = {"TrainSettings": "train", "SftSettings": "sft", "DpoSettings": "dpo",
                    "SelfknowSettings": "selfknow"}


@functools.cache
def field_docs() -> dict[str, str]:
    """{"section.field": its docstring, on one line} for the settings dataclasses of slm/train/config.py."""
    out: dict[str, str] = {}
    section = name = None
    lines = iter(CONFIG_SOURCE.read_text(encoding="utf-8").splitlines())
    for line in lines:
        if m := re.match(r"class (\w+)", line):
            section, name = SECTION_OF_CLASS.get(m.group(1)), None
        elif section and (m := re.match(r" {4}(\w+): [^=]+=", line)):
            name = m.group(1)
        elif section and name and line.startswith(' ' * 4 + '"""'):
            doc = line.strip()[3:]
            while not doc.endswith('"""'):
                doc += " " + next(lines).strip()
            out[f"{section}.{name}"] = " ".join(doc[:-3].split())
            name = None
        else:
            name = None
    return out


# -- shell completion of option values (what a command's --recipe, --suite, --gpu accept) -------------------------
def complete_recipes(incomplete: str) -> list[str]:
    from slm.recipes import names  # yaml: only when completing this option

    return [n for n in names() if n.startswith(incomplete)]


def complete_recipe_steps(incomplete: str) -> list[str]:
    """RECIPE:STEP for each recipe step with a cooldown: part (cooldown --recipe)."""
    from slm.recipes import load_recipe, names

    steps = [f"{n}:{k}" for n in names() if incomplete.startswith(n) or n.startswith(incomplete.split(":")[0])
             for k, v in load_recipe(n).items() if isinstance(v, dict) and "cooldown" in v]
    return [s for s in steps if s.startswith(incomplete)]


def complete_suites(incomplete: str) -> list[str]:
    import yaml

    suites = yaml.safe_load((Path(__file__).parent.parent / "evaluation" / "suites.yaml").read_text(encoding="utf-8"))
    return [s for s in suites if s.startswith(incomplete)]


def complete_gpus(incomplete: str) -> list[str]:
    return [n for n in GPUS if n.startswith(incomplete.lower())]


def field_help(key: str, note: str = "") -> str:
    """The help of an option that sets KEY ("section.field"): the field's docstring, then KEY and NOTE."""
    return f"{field_docs()[key]} ({key}{'; ' + note if note else ''})"


# -- every command ----------------------------------------------------------------------------------------------
Out = Annotated[Path, typer.Option("--out", "-o", help="The output directory to write (replaced atomically).",
                                   show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout instead of the output path.")]
TextKey = Annotated[str, typer.Option("--text-key", help="The JSON field / column that holds each document's text.")]
TxtMode = Annotated[str, typer.Option("--txt-mode", help=".txt inputs: 'file' = one document per file, "
                                                         "'paragraph' = one per block separated by blank lines.")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu or cuda.")]

# -- the training stages (pretrain, cooldown, sft, dpo, selfknow train) --------------------------------------------
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="SECTION.FIELD=VALUE, e.g. train.save_every=100 "
                                                                 "or train.micro_batch_size=4 (repeatable; wins over "
                                                                 "every other source of settings).")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps to run.")]
StopAfter = Annotated[Optional[int], typer.Option("--steps", help="Stop after this many steps.")]
Tokens = Annotated[Optional[str], typer.Option("--tokens", help="Tokens to train on (e.g. 20M, 2T); rounded up to "
                                                                "whole steps.")]
Valid = Annotated[Optional[Path], typer.Option("--valid", help="Held-out tokens directory: validation loss as it "
                                                               "trains, against the unigram baseline.")]
TokenizerOpt = Annotated[Optional[Path], typer.Option("--tokenizer", help="The data's tokenizer directory, if it moved "
                                                                          "since the data was encoded.")]
Keep = Annotated[Optional[int], typer.Option("--keep", help=field_help("train.keep"))]
Resume = Annotated[bool, typer.Option("--resume", help="Require a checkpoint in the run directory to resume from "
                                                       "(resuming is automatic when there is one).")]
EngineOpt = Annotated[Optional[str], typer.Option("--engine", help=field_help("train.engine"))]
ZeroStage = Annotated[Optional[int], typer.Option("--zero-stage", help=field_help("train.zero_stage"))]
DeepSpeedConfig = Annotated[Optional[Path], typer.Option("--deepspeed-config", help=field_help(
    "train.deepspeed_config", "implies --engine deepspeed"))]
Requeue = Annotated[bool, typer.Option("--requeue", help="Under SLURM: after SIGTERM / SIGUSR1 and the save, run "
                                                         "`scontrol requeue $SLURM_JOB_ID`.")]
RunOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="The run directory.", show_default=False)]
Data = Annotated[list[str], typer.Option("--data", metavar="FILE", help="Input files (.jsonl, .jsonl.gz, .jsonl.zst, "
                                         ".parquet, saved datasets, directories), or - for standard input; "
                                         "repeatable.", show_default=False)]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip records that do not parse, and count them.")]

# -- --dry-run: the plan of a training run -------------------------------------------------------------------------
PLANNING = "Planning (--dry-run)"
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan (parameters, tokens, FLOPs, memory per "
                                                         "process, time, GPU-hours) and train nothing.",
                                         rich_help_panel=PLANNING)]
Gpu = Annotated[str, typer.Option("--gpu", help="Plan for this GPU (slm.devices; the same names as `slm carbon "
                                                "estimate`): " + ", ".join(n for n, g in GPUS.items() if g.peak_flops)
                                                + "; a100 = a100-80gb.", rich_help_panel=PLANNING,
                                                autocompletion=complete_gpus)]
Gpus = Annotated[Optional[int], typer.Option("--gpus", help="Plan for this many GPUs (processes); default "
                                                            "WORLD_SIZE or 1.", rich_help_panel=PLANNING)]
Mfu = Annotated[float, typer.Option("--mfu", help="Model FLOPs utilisation to assume.", rich_help_panel=PLANNING)]
GpuHours = Annotated[Optional[float], typer.Option("--gpu-hours", help="Also print the MFU that this many GPU-hours "
                                                                       "imply (a budget, or a reported figure).",
                                                   rich_help_panel=PLANNING)]
JsonOut = Annotated[bool, typer.Option("--json", help="Print a JSON summary of the last checkpoint on stdout instead "
                                                      "of its path (with --dry-run: the plan).",
                                       rich_help_panel=PLANNING)]


# -- groups: a command takes each as one parameter; `grouped` puts the group's options in its place ----------------
class RunFlags:
    """How a training stage runs: the options that set train.* fields, resuming, requeueing, the device."""

    OPTIONS = {"keep": (Keep, None), "resume": (Resume, False), "engine": (EngineOpt, None),
               "zero_stage": (ZeroStage, None), "deepspeed_config": (DeepSpeedConfig, None),
               "requeue": (Requeue, False), "device": (Device, "auto")}

    def __init__(self, **values):
        self.__dict__.update({k: default for k, (_, default) in RunFlags.OPTIONS.items()}, **values)
        check_ranges(self, keep=POSITIVE)
        if self.zero_stage not in (None, 1, 2, 3):
            raise UsageError(f"--zero-stage {self.zero_stage}: expected 1, 2 or 3")

    def config(self, sets: list[str] | None) -> dict:
        """The stage config's sets (--set, then these options as train.* items), device, require_resume, requeue."""
        out = list(sets or [])
        if self.keep is not None:
            out.append(f"train.keep={self.keep}")
        engine = self.engine
        if self.deepspeed_config is not None:
            out.append(f"train.deepspeed_config={Path(self.deepspeed_config).absolute()}")
            engine = engine or "deepspeed"
        if engine is not None:
            out.append(f"train.engine={engine}")
        if self.zero_stage is not None:
            out.append(f"train.zero_stage={self.zero_stage}")
        return {"sets": out, "device": self.device, "require_resume": self.resume, "requeue": self.requeue}


class NoZeroRunFlags(RunFlags):
    """RunFlags without --zero-stage (selfknow train takes ZeRO settings from --set or --deepspeed-config)."""

    OPTIONS = {k: v for k, v in RunFlags.OPTIONS.items() if k != "zero_stage"}


class PlanFlags:
    """--dry-run and what the plan assumes; json_out: --json."""

    OPTIONS = {"dry_run": (DryRunOpt, False), "gpu": (Gpu, "h100"), "gpus": (Gpus, None), "mfu": (Mfu, 0.4),
               "gpu_hours": (GpuHours, None), "json_out": (JsonOut, False)}

    def __init__(self, **values):
        self.__dict__.update(values)
        check_ranges(self, gpus=POSITIVE, mfu=MASS, gpu_hours=POSITIVE)


def grouped(command: Callable) -> Callable:
    """COMMAND takes option groups (RunFlags, PlanFlags) as parameters; typer sees each group's options there."""
    params, groups = [], {}
    for p in inspect.signature(command, eval_str=True).parameters.values():
        if isinstance(p.annotation, type) and hasattr(p.annotation, "OPTIONS"):
            groups[p.name] = p.annotation
            params += [inspect.Parameter(name, p.kind, default=default, annotation=ann)
                       for name, (ann, default) in p.annotation.OPTIONS.items()]
        else:
            params.append(p)

    @functools.wraps(command)
    def run(**kw):
        for name, group in groups.items():
            kw[name] = group(**{k: kw.pop(k) for k in group.OPTIONS})
        return command(**kw)

    run.__signature__ = inspect.Signature(params)
    return run


def section_sets(sets: list[str], section: str, **values) -> list[str]:
    """SETS and SECTION.FIELD=VALUE for each option given (not None)."""
    return sets + [f"{section}.{k}={v}" for k, v in values.items() if v is not None]


def emit(path: Path, json_out: bool = False) -> None:
    """A stage's stdout: its output path, or with --json a summary of what it wrote (slm.views.info.summary).
    Only rank 0 prints, so that `$(torchrun ... slm pretrain ...)` gets one path."""
    if os.environ.get("RANK", "0") != "0":
        return
    if json_out:
        from slm.views.info import summary

        print(json.dumps(summary(Path(path)), indent=2, default=str), flush=True)
    else:
        print(path, flush=True)
