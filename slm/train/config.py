"""Run configuration: recipe < --config FILE < --set key=value, checked field by field against dataclasses.

A resolved configuration is a dict {"recipe": name, "model": {...}, "train": {...}} written into the run directory
as config.yaml; a resumed run reads it back.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slm.errors import SlmError, UsageError
from slm.model.transformer import ModelConfig
from slm.recipes import find_recipe, load_recipe, names as recipe_names

ENGINES = ("auto", "single", "ddp", "fsdp", "deepspeed")


@dataclass
class TrainSettings:
    """How a model is trained. Field docs are the reference for --set train.FIELD=VALUE."""

    tokens_per_step: int = 8192
    """Global batch in tokens per optimizer step (StableLM 2: 2^23; SmolLM2 1.7B: 2^21)."""
    micro_batch_size: int = 8
    """Sequences per device per forward/backward; gradient accumulation makes up the rest of the step."""
    steps: int | None = None
    """Steps this stage runs; default: total_steps."""
    total_steps: int | None = None
    """The schedule's horizon in steps (StableLM 2 planned 540k and stopped pre-training at 420k)."""
    lr_peak: float = 1e-3
    lr_min: float = 0.0
    """Where cosine schedules decay to."""
    schedule: str = "cosine"
    """cosine | wsd | hybrid | constant (see slm.train.schedules)."""
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    """wsd: fraction of total_steps spent decaying linearly to 0."""
    cosine_fraction: float = 0.25
    """hybrid: where the inverse-square-root tail takes over from the cosine."""
    cosine_horizon_steps: int | None = None
    """hybrid: the horizon of the cosine (calibrated; see slm.train.schedules)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on weight matrices and embeddings (not on biases and norms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    seed: int = 1234
    """Seeds the initialisation; the data order comes from the mix's seed."""
    dtype: str = "auto"
    """auto (bf16 autocast on a GPU and on CPUs with bf16 units, avx512_bf16 or AMX; fp32 on other CPUs) | fp32 |
    bf16. Weights, gradients and optimizer state stay fp32 either way."""
    compile: bool = False
    """torch.compile the model."""
    deterministic: bool = False
    """Bit-exact reruns and resumes on a GPU: torch's deterministic algorithms (an op without one warns),
    CUBLAS_WORKSPACE_CONFIG=:4096:8, no cuDNN autotuning. Costs some speed (benchmarks/gpu.sh measures it); CPUs
    are deterministic already."""
    attention: str = "auto"
    """Attention for packed documents: auto (FlexAttention on a GPU, SDPA elsewhere: per document on rows of 512
    tokens or more, else masked) | sdpa | flex."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (less memory, ~1/3 more
    compute)."""
    engine: str = "auto"
    """auto (ddp when WORLD_SIZE > 1, else single) | single | ddp | fsdp | deepspeed (slm.train.engine). A run may
    resume under another engine or number of processes."""
    zero_stage: int = 1
    """deepspeed: the ZeRO stage, 1 (optimizer state sharded; StableLM 2's choice), 2 (+ gradients) or 3 (+ weights)."""
    deepspeed_config: str | None = None
    """deepspeed: a DeepSpeed JSON file merged over what train.* gives (buckets, offload, communication); it may
    not set the optimizer, schedule, batch or precision, which slm owns."""
    max_bad_steps: int = 10
    """Steps in a row with a non-finite loss or gradient, or a loss spike (each skipped), before the run stops."""
    spike_window: int = 128
    """Loss spikes: a step whose loss is more than spike_sigma standard deviations above the mean of the last
    spike_window steps' losses is skipped like a non-finite one; checked once half the window has filled; 0: off.
    Defaults: OLMo-core's SkipStepOptimizer (rolling_interval_length 128, sigma_factor 6)."""
    spike_sigma: float = 6.0
    """How far above the window's mean, in its standard deviations, a loss is a spike."""
    save_every: int = 1000
    """Save a checkpoint every this many steps (and at the end)."""
    async_save: bool = False
    """Write the periodic checkpoints in the background: the state is copied to host memory at the step boundary
    and written (manifest, sha256s, atomic rename, keep) while training goes on; at most one write in flight (the
    next save waits for it). The last save, and one on a stop signal, wait for it and then write in the foreground."""
    keep: int = 3
    """Keep the newest this many checkpoints."""
    eval_every: int = 500
    """Validation loss every this many steps when a validation set is given (and at the end)."""
    eval_samples: int = 64
    """Windows of the validation tokens the validation loss averages over."""
    eval_tasks: list = field(default_factory=list)
    """Task scores every eval_every steps and at the end, by `slm eval`'s scoring (lm-eval), on rank 0 while the
    others wait: entries NAME or NAME:LIMIT, NAME an lm-eval task, a suite (slm/evaluation/suites.yaml; slm-local is
    offline) or a task in eval_include_path, LIMIT its examples (default eval_limit). Logged to metrics.jsonl
    (task_scores) and drawn in loss.png."""
    eval_limit: int = 100
    """Examples per task of eval_tasks when an entry does not say."""
    eval_include_path: list = field(default_factory=list)
    """Directories of lm-eval task YAML for eval_tasks (as `slm eval --include-path`)."""


@dataclass
class SftSettings:
    """Supervised fine-tuning on chat data (`slm sft`); optimizer details (betas, weight decay, clipping, dtype,
    engine, saving) come from the train: section."""

    template: str | None = None
    """chatml (SmolLM2-Instruct) | zephyr (StableLM 2 Zephyr) | a Jinja template file; default: the model's own
    chat template (a released instruct model's), else chatml."""
    system_prompt: str | None = None
    """chatml: the system prompt of conversations that have none (SmolLM2-Instruct has one)."""
    epochs: int = 2
    """Passes over the data (StableLM 2: 3; SmolLM2: 2)."""
    lr: float = 1e-4
    """Peak learning rate (SmolLM2: 3e-4 for 1.7B, 1e-3 for 135M and 360M)."""
    lr_min: float = 0.0
    schedule: str = "cosine"
    """cosine | wsd | constant, after a linear warmup of warmup_ratio of the steps."""
    warmup_ratio: float = 0.1
    batch_size: int = 128
    """Sequences per optimizer step, all processes together (SmolLM2: 128)."""
    micro_batch_size: int = 4
    """Sequences per process per forward/backward."""
    max_length: int = 2048
    """Tokens per sequence (SmolLM2: 8192); longer conversations are truncated or dropped (overlong)."""
    max_turns: int | None = None
    """Drop conversations with more user turns than this (StableLM 2: 8)."""
    overlong: str = "truncate"
    """truncate | drop: what happens to a conversation longer than max_length."""
    packing: bool = True
    """Pack several conversations into one sequence (attention and positions restart at each)."""


@dataclass
class DpoSettings:
    """Direct Preference Optimization (`slm dpo`)."""

    beta: float = 0.1
    """Strength of the KL constraint (SmolLM2: 0.5; Zephyr: 0.01)."""
    loss: str = "sigmoid"
    """sigmoid (DPO) | ipo | hinge."""
    epochs: int = 1
    """Passes over the pairs (SmolLM2's paper: 2)."""
    lr: float = 5e-7
    lr_min: float = 0.0
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    batch_size: int = 128
    """Pairs per optimizer step, all processes together (SmolLM2: 128)."""
    micro_batch_size: int = 2
    """Pairs per process per forward/backward (each is two sequences)."""
    max_length: int = 1024
    """Tokens of prompt and answer together (SmolLM2: 1024); the answer is cut to fit."""
    max_prompt_length: int = 512
    """Tokens of the prompt (SmolLM2: 512); longer prompts keep their end."""
    min_chosen_score: float | None = None
    """Drop pairs whose chosen answer scored below this (StableLM 2: 8 of 10)."""
    template: str | None = None
    """The chat template; default: the one the model was fine-tuned with (its tokenizer_config.json)."""


@dataclass
class SelfknowSettings:
    """Self-knowledge training by C-RLFT (`slm selfknow train`; slm/train/crlft.py has the objective)."""

    class_weights: dict = field(default_factory=lambda: {"pos": 1.0, "neg": 0.1})
    """The weight (coarse reward) of each class: pos, the answers given with the facts; neg, without them
    (OpenChat: 1.0 and 0.1)."""
    kl_coef: float = 0.0
    """Coefficient of the KL term towards the reference on positive tokens (0: OpenChat's practice, no reference)."""
    negative_token: str = "<|negative|>"
    """The special token that marks a negative conversation (put before it); added to the tokenizer if absent."""
    epochs: int = 6
    """Passes over the data (StableLM 2's self-knowledge stage: 6; OpenChat: 5)."""
    lr: float = 1e-5
    lr_min: float = 0.0
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    batch_size: int = 64
    """Sequences per optimizer step, all processes together."""
    micro_batch_size: int = 4
    max_length: int = 2048
    """Tokens per sequence; longer conversations are truncated."""
    packing: bool = True
    template: str | None = None
    """The chat template; default: the one the model was fine-tuned with."""


SECTIONS = {"model": ModelConfig, "train": TrainSettings, "sft": SftSettings, "dpo": DpoSettings,
            "selfknow": SelfknowSettings}


def _coerce(value, annotation, where: str):
    """Turn a YAML / command-line value into the annotated type, or fail naming WHERE."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except SlmError:
                continue
        raise SlmError(f"{where}: expected {annotation}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise SlmError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else str
        return tuple(_coerce(v, inner, where) for v in value) if origin is tuple else [_coerce(v, inner, where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise SlmError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise SlmError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise SlmError(f"{where}: expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise SlmError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise SlmError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SlmError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise SlmError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_section(section: str, values: dict, where: str) -> dict:
    """Coerce and validate VALUES against the section's dataclass; unknown keys name the closest known one."""
    cls = SECTIONS[section]
    hints = _hints(cls)
    out = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SlmError(f"{where}: {section}.{key}: unknown field{hint}")
        out[key] = _coerce(value, hints[key], f"{where}: {section}.{key}")
    return out


def parse_set(items: list[str]) -> dict:
    """['train.lr_peak=3e-4', 'model.num_layers=2'] -> {'train': {'lr_peak': '3e-4'}, 'model': {...}}."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise UsageError(f"--set {item!r}: expected SECTION.FIELD=VALUE (e.g. train.lr_peak=3e-4)")
        if section not in SECTIONS:
            raise UsageError(f"--set {item!r}: unknown section {section!r} (expected {', '.join(SECTIONS)})")
        parsed = yaml.safe_load(value) if value.strip() else None
        out.setdefault(section, {})[name] = value if isinstance(parsed, str) else parsed
    return out


def resolve(recipe: str | None, config_file: Path | None = None, sets: list[str] | None = None,
            base: dict | None = None) -> dict:
    """Merge recipe (or BASE), file and flags; returns {"recipe", "model", "train"} with values checked."""
    layers: list[tuple[str, dict]] = []
    if base is not None:
        layers.append(("the run's config.yaml", base))
    elif recipe is not None:
        if find_recipe(recipe) is None:
            raise UsageError(f"--recipe {recipe!r}: no such recipe (recipes: {', '.join(recipe_names())})")
        layers.append((f"recipe {recipe}", load_recipe(recipe)))
    if config_file is not None:
        try:
            data = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise SlmError(f"{config_file}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise SlmError(f"{config_file}{f':{mark.line + 1}' if mark else ''}: not valid YAML") from None
        if not isinstance(data, dict):
            raise SlmError(f"{config_file}: expected a mapping with model: and train: sections")
        layers.append((str(config_file), data))
    if sets:
        layers.append(("--set", parse_set(sets)))
    merged = {"recipe": recipe, **{section: {} for section in SECTIONS}}
    for where, layer in layers:
        for section in SECTIONS:
            values = layer.get(section) or {}
            if not isinstance(values, dict):
                raise SlmError(f"{where}: {section}: expected a mapping")
            merged[section].update(check_section(section, values, where))
        if "recipe" in layer and layer["recipe"]:
            merged["recipe"] = layer["recipe"]
    return merged


def train_settings(resolved: dict) -> TrainSettings:
    t = TrainSettings(**resolved["train"])
    if t.schedule not in ("cosine", "wsd", "hybrid", "constant"):
        raise SlmError(f"train.schedule: expected cosine, wsd, hybrid or constant, got {t.schedule!r}")
    if t.dtype not in ("auto", "fp32", "bf16"):
        raise SlmError(f"train.dtype: expected auto, fp32 or bf16, got {t.dtype!r}")
    if t.attention not in ("auto", "sdpa", "flex"):
        raise SlmError(f"train.attention: expected auto, sdpa or flex, got {t.attention!r}")
    if t.engine not in ENGINES:
        raise SlmError(f"train.engine: expected one of {', '.join(ENGINES)}, got {t.engine!r}")
    if t.zero_stage not in (1, 2, 3):
        raise SlmError(f"train.zero_stage: expected 1, 2 or 3, got {t.zero_stage!r}")
    for name in ("save_every", "eval_every"):  # 0: only at the end
        if getattr(t, name) < 0:
            raise SlmError(f"train.{name}: expected an integer >= 0 (0: only at the end), got {getattr(t, name)}")
    if t.spike_window < 0 or t.spike_window == 1:
        raise SlmError(f"train.spike_window: expected 0 (off) or a window of 2 steps or more, got {t.spike_window}")
    if not t.spike_sigma > 0:
        raise SlmError(f"train.spike_sigma: expected a positive number of standard deviations, got {t.spike_sigma}")
    for name in ("tokens_per_step", "micro_batch_size", "max_bad_steps", "keep", "eval_samples", "eval_limit"):
        if getattr(t, name) < 1:
            raise SlmError(f"train.{name}: expected a positive integer, got {getattr(t, name)}")
    return t


def sft_settings(resolved: dict) -> SftSettings:
    s = SftSettings(**resolved.get("sft", {}))
    if s.overlong not in ("truncate", "drop"):
        raise SlmError(f"sft.overlong: expected truncate or drop, got {s.overlong!r}")
    if s.schedule not in ("cosine", "wsd", "constant"):
        raise SlmError(f"sft.schedule: expected cosine, wsd or constant, got {s.schedule!r}")
    for name in ("epochs", "batch_size", "micro_batch_size", "max_length"):
        if getattr(s, name) < 1:
            raise SlmError(f"sft.{name}: expected a positive integer, got {getattr(s, name)}")
    if s.max_turns is not None and s.max_turns < 1:
        raise SlmError(f"sft.max_turns: expected a positive integer, got {s.max_turns}")
    return s


def selfknow_settings(resolved: dict) -> SelfknowSettings:
    s = SelfknowSettings(**resolved.get("selfknow", {}))
    w = s.class_weights
    if not isinstance(w, dict) or set(w) != {"pos", "neg"} or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in w.values()):
        raise SlmError(f"selfknow.class_weights: expected pos=W,neg=W with weights >= 0, got {w!r}")
    if w["pos"] <= 0:
        raise SlmError("selfknow.class_weights: pos must be positive")
    s.class_weights = {"pos": float(w["pos"]), "neg": float(w["neg"])}
    if s.kl_coef < 0:
        raise SlmError(f"selfknow.kl_coef: expected 0 or more, got {s.kl_coef}")
    if s.schedule not in ("cosine", "wsd", "constant"):
        raise SlmError(f"selfknow.schedule: expected cosine, wsd or constant, got {s.schedule!r}")
    if not re.fullmatch(r"<\|[A-Za-z0-9_]+\|>", s.negative_token):
        raise SlmError(f"selfknow.negative_token: expected a token like <|negative|>, got {s.negative_token!r}")
    for name in ("epochs", "batch_size", "micro_batch_size", "max_length"):
        if getattr(s, name) < 1:
            raise SlmError(f"selfknow.{name}: expected a positive integer, got {getattr(s, name)}")
    return s


def dpo_settings(resolved: dict) -> DpoSettings:
    s = DpoSettings(**resolved.get("dpo", {}))
    if s.loss not in ("sigmoid", "ipo", "hinge"):
        raise SlmError(f"dpo.loss: expected sigmoid, ipo or hinge, got {s.loss!r}")
    if s.schedule not in ("cosine", "wsd", "constant"):
        raise SlmError(f"dpo.schedule: expected cosine, wsd or constant, got {s.schedule!r}")
    if s.beta <= 0:
        raise SlmError(f"dpo.beta: expected a positive number, got {s.beta}")
    for name in ("epochs", "batch_size", "micro_batch_size", "max_length", "max_prompt_length"):
        if getattr(s, name) < 1:
            raise SlmError(f"dpo.{name}: expected a positive integer, got {getattr(s, name)}")
    if s.max_prompt_length >= s.max_length:
        raise SlmError(f"dpo.max_prompt_length {s.max_prompt_length}: must be less than dpo.max_length "
                       f"{s.max_length}")
    return s


def to_yaml(resolved: dict) -> str:
    def plain(v):
        if isinstance(v, tuple):
            return list(v)
        return v

    out = {"recipe": resolved.get("recipe"),
           **{section: {k: plain(v) for k, v in resolved[section].items()}
              for section in SECTIONS if resolved.get(section) or section in ("model", "train")}}
    return yaml.safe_dump(out, sort_keys=False)
