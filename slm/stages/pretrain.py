"""`slm pretrain`: a recipe's model trained on a mix, resumable, on one process or many."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slm.console import info, warn
from slm.errors import POSITIVE, SlmError, UsageError, check_ranges
from slm.evaluation.training import task_scorer
from slm.formats.checkpoint import Checkpoint, model_input
from slm.formats.manifest import input_entry
from slm.formats.tables import plural
from slm.train import start as setup
from slm.train.batches import Batches
from slm.train.config import resolve, train_settings
from slm.train.cost import DryRun, plan_run, recipe_seq_len
from slm.train.dist import Dist, per_process
from slm.train.loop import Run, train
from slm.train.schedules import Schedule

# What a resumed run may change: how long, how often to save and evaluate, how the step is computed. Everything
# else (model, optimizer, schedule, batch) is fixed by the run's config.yaml.
CHANGEABLE = {"steps", "keep", "save_every", "eval_every", "eval_samples", "micro_batch_size", "compile",
              "activation_checkpointing", "attention", "engine", "zero_stage", "deepspeed_config", "max_bad_steps",
              "deterministic", "async_save", "spike_window", "spike_sigma", "eval_tasks", "eval_limit",
              "eval_include_path"}


@dataclass
class PretrainConfig:
    data: Path | None
    """The mix directory (from `slm mix`)."""
    out: Path | None
    """The run directory: config.yaml, metrics.jsonl, loss.png, checkpoints/."""
    recipe: str | None = None
    config_file: Path | None = None
    sets: list[str] = field(default_factory=list)
    steps: int | None = None
    tokens: int | None = None
    init: Path | None = None
    """Start from these weights (an slm or transformers checkpoint) instead of a fresh initialisation."""
    valid: Path | None = None
    """A held-out tokens directory for the validation loss."""
    tokenizer: Path | None = None
    device: str = "auto"
    require_resume: bool = False
    """--resume: fail unless the run directory has a checkpoint to continue from."""
    requeue: bool = False
    """--requeue: after a signal's save, `scontrol requeue $SLURM_JOB_ID` (under SLURM)."""

    def __post_init__(self):
        check_ranges(self, steps=POSITIVE, tokens=POSITIVE)


def _settings(cfg: PretrainConfig, saved: dict | None):
    """(the resolved config, its train settings): the run's config.yaml, else recipe and --config; then --set."""
    if saved is None and cfg.recipe is None and cfg.config_file is None and cfg.init is None:
        raise UsageError("--recipe: missing (or --config FILE, or --init CKPT)")
    resolved = resolve(None, None, cfg.sets, base=saved) if saved is not None else \
        resolve(cfg.recipe, cfg.config_file, cfg.sets)
    return resolved, train_settings(resolved)


def _steps(cfg: PretrainConfig, t) -> int:
    steps = setup.steps_from(cfg.steps, cfg.tokens, t.tokens_per_step) or t.steps or t.total_steps
    if not steps:
        raise SlmError("how long to train: give --steps or --tokens (or train.steps / train.total_steps)")
    return steps


def dry_run(cfg: PretrainConfig, dry: DryRun) -> dict:
    """Resolve the configuration as a run would and return its plan (parameters, tokens, FLOPs, memory per
    process, time and GPU-hours); reads the mix when given, writes nothing."""
    resolved, t = _settings(cfg, setup.saved_config(cfg.out) if cfg.out else None)
    reader, tok = setup.open_data(cfg.data, cfg.tokenizer) if cfg.data else (None, None)
    seq_len = reader.seq_len if reader else recipe_seq_len(resolved.get("recipe"))
    if not seq_len:
        raise UsageError("--data: missing (the plan needs the mix's seq_len; recipes carry one)")
    model_values = Checkpoint.open(cfg.init).model_config.to_dict() if cfg.init else resolved["model"]
    steps = _steps(cfg, t)
    p = plan_run(model_values, tok, t, seq_len, steps, dry)
    if reader is not None and steps * p["samples_per_step"] > len(reader):
        warn(f"{cfg.data}: the mix plans {len(reader)} samples; {steps} steps need {steps * p['samples_per_step']}")
    return p


@per_process
def run(cfg: PretrainConfig, d: Dist) -> Path:
    if cfg.data is None:
        raise UsageError("--data: missing (the mix directory from `slm mix`)")
    if cfg.out is None:
        raise UsageError("--out: missing (the run directory)")
    out = Path(cfg.out)
    reader, tok = setup.open_data(cfg.data, cfg.tokenizer)
    resume = setup.resume_point(out, "pretrain", d, cfg.require_resume)
    saved = setup.saved_config(out)
    if saved is not None and (cfg.recipe is not None or cfg.config_file is not None or cfg.sets):
        asked = resolve(cfg.recipe, cfg.config_file, cfg.sets)
        for section in ("model", "train"):
            for k, v in asked[section].items():
                old = saved.get(section, {}).get(k)
                if k not in CHANGEABLE and old is not None and (list(v) if isinstance(v, tuple) else v) != old:
                    raise SlmError(f"{out}/config.yaml: {section}.{k} is {old!r} in this run, the command asks "
                                   f"for {v!r}; use another --out for a new run")
    resolved, t = _settings(cfg, saved)

    init = Checkpoint.open(cfg.init) if cfg.init and resume is None else None
    if init is not None:
        model_cfg = init.model_config
        if resolved["model"]:
            warn(f"--init {cfg.init}: the architecture comes from the checkpoint; the recipe's model: is ignored")
        init_tok = init.tokenizer()
        if init_tok is not None and init_tok.hash != tok.hash:
            raise SlmError(f"--init {cfg.init}: the checkpoint's tokenizer ({init_tok.hash[:12]}) is not the data's "
                           f"({tok.hash[:12]})")
        resolved["model"] = model_cfg.to_dict()
    else:
        model_cfg = setup.model_config_from(resolved["model"], tok)
        resolved["model"] = model_cfg.to_dict()
    seq_len = reader.seq_len
    setup.check_fits(model_cfg, tok, seq_len, str(cfg.data))

    sps = setup.samples_per_step(t.tokens_per_step, seq_len)
    steps = _steps(cfg, t)
    total = t.total_steps or steps
    if steps * sps > len(reader):
        raise SlmError(f"{cfg.data}: the mix plans {len(reader)} samples of {seq_len} tokens; {steps} steps of "
                       f"{sps} samples need {steps * sps}: plan more tokens with `slm mix` or train fewer steps")
    if t.schedule == "hybrid" and not t.cosine_horizon_steps:
        raise SlmError("train.schedule hybrid needs train.cosine_horizon_steps")
    schedule = Schedule(kind=t.schedule, lr_peak=t.lr_peak, lr_min=t.lr_min, warmup_steps=t.warmup_steps,
                        total_steps=total, decay_fraction=t.decay_fraction, cosine_fraction=t.cosine_fraction,
                        cosine_horizon_steps=t.cosine_horizon_steps)
    resolved["train"] = {**resolved["train"], "steps": steps, "total_steps": total}

    model = setup.new_model(model_cfg, d.device, t.seed)
    if init is not None:
        setup.load_weights(model, init)
    if resume is not None:
        setup.load_weights(model, resume)
    batches = Batches(reader, sps, t.micro_batch_size, d.rank, d.world, d.device)
    eng = setup.make_engine(d, model, t, batches)
    start, state = setup.start_or_resume(
        resume, eng, d, out, resolved,
        f"pretrain: {model_cfg.family} model, {model.num_parameters():,} parameters; {steps} steps of "
        f"{t.tokens_per_step:,} tokens ({sps} x {seq_len}; {plural(batches.accumulation, 'micro-batch')} of "
        f"{batches.micro} per process, {plural(d.world, 'process')}, {eng.describe()}, {d.device})",
        {"tokens_seen": resume.step * t.tokens_per_step if resume is not None else 0})
    if start >= steps and d.main:
        info(f"{out}: already at step {start} of {steps}")

    valid, unigram = setup.valid_set(cfg.valid, seq_len, t.eval_samples, reader, tok)
    lineage = {"stage": "pretrain", "recipe": resolved.get("recipe"), "tokenizer_sha256": tok.hash,
               "mix": {"path": str(Path(cfg.data).absolute()), "plan_sha256": setup.plan_sha256(cfg.data)},
               "parent": str(init.dir) if init is not None else None,
               "inputs": [input_entry(cfg.data, "mix")] + ([input_entry(cfg.valid, "valid")] if cfg.valid else [])
               + ([model_input(init.dir, "init")] if init is not None else [])}
    run = Run(stage="pretrain", run_dir=out, model=model, model_cfg=model_cfg, train=t, engine=eng,
              batches=batches, dist=d, task_scorer=task_scorer,
              lr_at=schedule, first_sample_of=lambda s: s * sps, start_step=start, end_step=steps,
              seq_len=seq_len, tokenizer_dir=tok.dir, bos_id=tok.bos_id, eos_id=tok.eos_id, lineage=lineage,
              state=state, valid=valid, unigram_loss=unigram, requeue=cfg.requeue)
    return train(run)
