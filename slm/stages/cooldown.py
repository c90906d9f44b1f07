"""`slm cooldown`: continue a checkpoint with the learning rate decaying linearly to 0.

StableLM 2 cooled down from its step-420k checkpoint, from lr 2.529e-4 to 0, on a different mix; SmolLM2's decay
phase is the same thing. The weights and the AdamW moments continue from the checkpoint; the learning rate starts
where the checkpoint's schedule was (or --lr-start) and reaches exactly 0 on the last step. Step numbers and tokens
seen continue the checkpoint's. The data: the phase named by --phase, else where the checkpoint stopped if it is
the same mix, else the new mix from its first sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from slm.console import warn
from slm.errors import POSITIVE, SlmError, UsageError, check_ranges
from slm.evaluation.training import task_scorer
from slm.formats.checkpoint import Checkpoint, model_input
from slm.formats.manifest import input_entry
from slm.recipes import find_recipe, load_recipe, load_step, parse_budget
from slm.train import engine, start as setup
from slm.train.batches import Batches
from slm.train.config import resolve, train_settings
from slm.train.cost import DryRun, plan_run, recipe_seq_len
from slm.train.dist import Dist, per_process
from slm.train.loop import Run, train
from slm.train.schedules import linear_to_zero


@dataclass
class CooldownConfig:
    source: Path
    """The checkpoint (or run directory) to cool down."""
    data: Path | None
    out: Path | None
    steps: int | None = None
    tokens: int | None = None
    lr_start: float | None = None
    phase: str | None = None
    recipe: str | None = None
    """RECIPE:STEP: a recipe step's `cooldown:` part gives `set` (SECTION.FIELD: value) and `tokens` defaults."""
    sets: list[str] = field(default_factory=list)
    valid: Path | None = None
    tokenizer: Path | None = None
    device: str = "auto"
    require_resume: bool = False
    """--resume: fail unless the run directory has a checkpoint to continue from."""
    requeue: bool = False
    """--requeue: after a signal's save, `scontrol requeue $SLURM_JOB_ID` (under SLURM)."""

    def __post_init__(self):
        check_ranges(self, steps=POSITIVE, tokens=POSITIVE, lr_start=POSITIVE)


# What a cooldown may change in the checkpoint's model: the context it trains at and RoPE's base (SmolLM2's
# 2k -> 8k extension raised theta from 10k to 130k); every other field shapes or means the weights.
MODEL_CHANGES = {"max_seq_len", "rope_theta"}


# The schedule settings a cooldown does not use: its learning rate goes linearly from --lr-start to 0.
UNUSED_SCHEDULE = {"train.lr_peak", "train.lr_min", "train.schedule", "train.warmup_steps", "train.decay_fraction",
                   "train.cosine_fraction", "train.cosine_horizon_steps"}


def with_recipe_step(cfg: CooldownConfig) -> CooldownConfig:
    """CFG with a recipe step's settings under its own flags (flags win); a --set of a schedule setting, which a
    cooldown would not use, is refused."""
    for item in cfg.sets:
        key = item.split("=", 1)[0].strip()
        if key in UNUSED_SCHEDULE:
            raise UsageError(f"--set {item}: a cooldown does not use {key} (its learning rate decays linearly from "
                             "--lr-start, default the checkpoint's, to 0); give --lr-start instead")
    if not cfg.recipe:
        return cfg
    step = load_step(cfg.recipe, "--recipe").get("cooldown")
    if not isinstance(step, dict):
        raise SlmError(f"--recipe {cfg.recipe!r}: the step has no cooldown: section")
    sets = step.get("set") or {}
    if not isinstance(sets, dict):
        raise SlmError(f"--recipe {cfg.recipe!r}: cooldown.set: expected a mapping of SECTION.FIELD: value")
    tokens = cfg.tokens
    if cfg.steps is None and tokens is None and step.get("tokens") is not None:
        tokens = parse_budget(step["tokens"], f"--recipe {cfg.recipe}: cooldown.tokens")
    return replace(cfg, sets=[f"{k}={v}" for k, v in sets.items()] + list(cfg.sets), tokens=tokens, recipe=None)


def check_model_changes(before: dict, after: dict, where: str) -> list[str]:
    """The changes of the model config a cooldown makes, as 'field a -> b'; refuses any outside MODEL_CHANGES."""
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    for k in changed:
        if k not in MODEL_CHANGES:
            raise SlmError(f"--set model.{k}: a cooldown continues {where}'s weights and may change only "
                           f"{', '.join(sorted(MODEL_CHANGES))} (model.{k} is {before.get(k)!r} there)")
    return [f"{k} {before.get(k)} -> {after.get(k)}" for k in changed]


def dry_run(cfg: CooldownConfig, dry: DryRun) -> dict:
    """The plan of the cooldown (the checkpoint's model and its run's training settings); writes nothing."""
    step_mix = (load_step(cfg.recipe, "--recipe").get("mix") or {}) if cfg.recipe else {}
    cfg = with_recipe_step(cfg)
    if not Path(cfg.source).exists() and find_recipe(str(cfg.source)) is not None:
        # Planning before the checkpoint exists: the recipe's model and training settings stand for it.
        recipe = load_recipe(str(cfg.source))
        base = {"recipe": str(cfg.source), "model": recipe.get("model", {}), "train": recipe.get("train", {})}
    else:
        source = Checkpoint.open(cfg.source)
        parent_cfg = setup.saved_config(source.run_dir) or {}
        base = {"recipe": parent_cfg.get("recipe"), "model": source.model_config.to_dict(),
                "train": parent_cfg.get("train", {})}
    resolved = resolve(None, None, cfg.sets, base=base)
    t = train_settings(resolved)
    reader, tok = setup.open_data(cfg.data, cfg.tokenizer) if cfg.data else (None, None)
    seq_len = reader.seq_len if reader else step_mix.get("seq_len") or recipe_seq_len(resolved.get("recipe"))
    if not seq_len:
        raise UsageError("--data: missing (the plan needs the mix's seq_len)")
    steps = setup.steps_from(cfg.steps, cfg.tokens, t.tokens_per_step)
    if not steps:
        raise SlmError("how long to cool down: give --steps or --tokens")
    return plan_run(resolved["model"], tok, t, seq_len, steps, dry)


@per_process
def run(cfg: CooldownConfig, d: Dist) -> Path:
    cfg = with_recipe_step(cfg)
    if cfg.data is None or cfg.out is None:
        raise UsageError(f"--{'data' if cfg.data is None else 'out'}: missing")
    out = Path(cfg.out)
    reader, tok = setup.open_data(cfg.data, cfg.tokenizer)
    resume = setup.resume_point(out, "cooldown", d, cfg.require_resume)
    if resume is not None:
        plan = resume.train_state["cooldown"]
        resolved = resolve(None, None, cfg.sets, base=setup.saved_config(out))
        source = None
    else:
        source = Checkpoint.open(cfg.source)
        src_tok = source.tokenizer()
        if src_tok is not None and src_tok.hash != tok.hash:
            raise SlmError(f"--from {cfg.source}: the checkpoint's tokenizer ({src_tok.hash[:12]}) is not the one "
                           f"{cfg.data} was encoded with ({tok.hash[:12]})")
        parent_cfg = setup.saved_config(source.run_dir) or {}
        base = {"recipe": parent_cfg.get("recipe"), "model": source.model_config.to_dict(),
                "train": parent_cfg.get("train", {})}
        resolved = resolve(None, None, cfg.sets, base=base)
        plan = None
    t = train_settings(resolved)
    model_cfg = setup.model_config_from(resolved["model"], tok)
    changes = [] if source is None else check_model_changes(source.model_config.to_dict(), model_cfg.to_dict(),
                                                             str(source.dir))
    seq_len = reader.seq_len
    setup.check_fits(model_cfg, tok, seq_len, str(cfg.data))
    sps = setup.samples_per_step(t.tokens_per_step, seq_len)

    model = setup.new_model(model_cfg, d.device, t.seed)
    setup.load_weights(model, source if plan is None else resume)
    batches = Batches(reader, sps, t.micro_batch_size, d.rank, d.world, d.device)
    eng = setup.make_engine(d, model, t, batches)
    if plan is None:
        plan = _plan(cfg, source, reader, t)
        _continue_optimizer(source, model, eng, t)
    start, state = setup.start_or_resume(
        resume, eng, d, out, {**resolved, "model": model_cfg.to_dict()},
        f"cooldown: from {plan['from']} (step {plan['start_step']}), {plan['steps']} steps, lr {plan['lr_start']:.3e} "
        f"-> 0, data from sample {plan['data_start']}{'; model ' + ', '.join(changes) if changes else ''}",
        {"tokens_seen": (source.train_state or {}).get("tokens_seen", 0) if source is not None else 0,
         "cooldown": plan}, fresh_step=plan["start_step"])
    end = plan["start_step"] + plan["steps"]
    if plan["data_start"] + plan["steps"] * sps > len(reader):
        raise SlmError(f"{cfg.data}: the cooldown needs samples up to {plan['data_start'] + plan['steps'] * sps}, "
                       f"the mix plans {len(reader)}")

    valid, unigram = setup.valid_set(cfg.valid, seq_len, t.eval_samples, reader, tok)
    lineage = {"stage": "cooldown", "recipe": resolved.get("recipe"), "tokenizer_sha256": tok.hash,
               "mix": {"path": str(Path(cfg.data).absolute()), "plan_sha256": setup.plan_sha256(cfg.data)},
               "parent": plan["from"],
               "inputs": [model_input(plan["from"], "parent"), input_entry(cfg.data, "mix")]
               + ([input_entry(cfg.valid, "valid")] if cfg.valid else [])}
    run = Run(stage="cooldown", run_dir=out, model=model, model_cfg=model_cfg, train=t, engine=eng,
              batches=batches, dist=d, task_scorer=task_scorer,
              lr_at=lambda s: linear_to_zero(s, plan["lr_start"], plan["start_step"], plan["steps"]),
              first_sample_of=lambda s: plan["data_start"] + (s - plan["start_step"]) * sps,
              start_step=start, end_step=end, seq_len=seq_len, tokenizer_dir=tok.dir, bos_id=tok.bos_id,
              eos_id=tok.eos_id, lineage=lineage, state=state, valid=valid, unigram_loss=unigram,
              requeue=cfg.requeue)
    return train(run)


def _plan(cfg: CooldownConfig, source: Checkpoint, reader, t) -> dict:
    """The cooldown's fixed course: the step it starts at, how many it runs, the learning rate it decays from, and
    the mix's sample it reads first (--phase, else where the checkpoint stopped in the same mix, else 0)."""
    steps = setup.steps_from(cfg.steps, cfg.tokens, t.tokens_per_step)
    if not steps:
        raise SlmError("how long to cool down: give --steps or --tokens")
    ts = source.train_state or {}
    lr_start = cfg.lr_start if cfg.lr_start is not None else ts.get("lr")
    if lr_start is None:
        raise SlmError(f"--lr-start: {source.dir} does not record its learning rate; give it")
    if cfg.phase is not None:
        names = [p.name for p in reader.plan.phases]
        if cfg.phase not in names:
            raise SlmError(f"--phase {cfg.phase!r}: the mix has phases {', '.join(names)}")
        data_start = int(reader.plan.phase_starts[names.index(cfg.phase)])
    elif (source.manifest or {}).get("mix", {}).get("plan_sha256") == setup.plan_sha256(cfg.data):
        data_start = int(ts.get("samples_seen", 0))
    else:
        data_start = 0
    return {"start_step": source.step, "steps": steps, "lr_start": lr_start, "data_start": data_start,
            "from": str(source.dir)}


def _continue_optimizer(source: Checkpoint, model, eng, t) -> None:
    """AdamW's moments from SOURCE (zero, and said so, when it has none that fit), this run's betas and eps."""
    opt_state = source.optimizer_state(legacy_order=engine.optimizer_order(model))
    if opt_state is not None:
        try:
            eng.load_optimizer_state(opt_state, str(source.dir))
        except SlmError as e:
            warn(f"{e}; AdamW starts from zero moments")
    else:
        warn(f"{source.dir}: no optimizer state (not an slm checkpoint); AdamW starts from zero moments")
    for g in eng.optimizer.param_groups:  # hyper-parameters from this run, moments from the checkpoint
        g["betas"], g["eps"] = tuple(t.betas), t.eps
