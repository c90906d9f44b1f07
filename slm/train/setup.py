"""What pretrain and cooldown both need before the loop: the data and its tokenizer, the model, resuming."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from slm.errors import SlmError
from slm.console import warn
from slm.formats.checkpoint import Checkpoint, list_checkpoints, newest_verified
from slm.formats.manifest import read_json, sha256_file
from slm.formats.mixplan import MixReader
from slm.formats.tokenizer import Tokenizer, padded_vocab_size
from slm.model.transformer import ModelConfig, Transformer, build
from slm.train import engine
from slm.train.batches import ValidSet
from slm.train.loop import set_rng_state


def open_data(mix_dir: Path, tokenizer_dir: Path | None = None) -> tuple[MixReader, Tokenizer]:
    """The mix and the tokenizer its sources were encoded with (found through the tokens manifests)."""
    reader = MixReader(mix_dir)
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [Path(s.manifest["tokenizer"]["path"])
                                                                for s in reader.sources]
    for c in candidates:
        if (c / "encoding.json").is_file():
            tok = Tokenizer(c)
            if tok.hash != reader.tokenizer_sha256:
                raise SlmError(f"{c}: this tokenizer ({tok.hash[:12]}) is not the one {mix_dir} was encoded with "
                               f"({reader.tokenizer_sha256[:12]})")
            return reader, tok
    raise SlmError(f"{mix_dir}: the tokenizer its sources were encoded with ({candidates[0]}) is gone; "
                   "pass its directory with --tokenizer")


def plan_sha256(mix_dir: Path) -> str:
    return sha256_file(Path(mix_dir) / "plan.json")


def check_fits(model_cfg: ModelConfig, tok: Tokenizer, seq_len: int, where: str) -> None:
    if tok.n_vocab > model_cfg.vocab_size:
        raise SlmError(f"{where}: the tokenizer has {tok.n_vocab} ids, more than the model's vocab_size "
                       f"{model_cfg.vocab_size}")
    if seq_len > model_cfg.max_seq_len:
        raise SlmError(f"{where}: the mix's seq_len {seq_len} is longer than the model's max_seq_len "
                       f"{model_cfg.max_seq_len}")


def model_config_from(resolved_model: dict, tok: Tokenizer) -> ModelConfig:
    values = dict(resolved_model)
    values.setdefault("vocab_size", padded_vocab_size(tok.n_vocab))
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise SlmError(str(e)) from None


def new_model(cfg: ModelConfig, device: torch.device, seed: int) -> Transformer:
    """Initialised on the CPU from SEED (the same weights on every device), then moved."""
    model = build(cfg, "cpu", seed=seed)
    return model.to(device)


def load_weights(model: Transformer, ckpt: Checkpoint) -> None:
    state = ckpt.state_dict()
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise SlmError(f"{ckpt.dir}: weight {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("rotary.")]
    if missing or unexpected:
        raise SlmError(f"{ckpt.dir}: weights do not match the model (missing {missing[:2]}, unexpected {unexpected[:2]})")


def resume_point(run_dir: Path, stage: str, d: engine.Dist, required: bool = False) -> Checkpoint | None:
    """The checkpoint a STAGE run directory resumes from, or None for a fresh run: the newest one whose files all
    match its manifest (size and sha256). Rank 0 checks, every rank gets its answer. Newer ones that do not verify
    are named on stderr and left as they are."""
    from slm import energy

    energy.attach(run_dir)  # the node's energy record goes to RUN_DIR/energy/ when the process ends
    found = None
    if d.main:
        found = newest_verified(run_dir, on_skip=lambda p, why: warn(f"{p}: skipped, it does not verify ({why}); "
                                                                      "resuming from an older checkpoint"))
        found = str(found) if found else None
    found = engine.broadcast_object(found, d)
    if found is None:
        existing = list_checkpoints(run_dir, complete_only=False)
        if existing:
            raise SlmError(f"{run_dir}: none of its {len(existing)} checkpoint(s) verifies (see above); move "
                           "checkpoints/ aside to start over")
        if required:
            raise SlmError(f"--resume: {run_dir} has no checkpoint to resume from")
        return None
    ckpt = Checkpoint(Path(found))
    if ckpt.train_state is None:
        raise SlmError(f"{found}: no train_state/: cannot resume from it")
    if ckpt.train_state.get("stage") != stage:
        raise SlmError(f"{run_dir}: its checkpoints come from `slm {ckpt.train_state.get('stage')}`, not {stage}")
    return ckpt


def post_training_config(source: Checkpoint, section: str, recipe: str | None, config_file: Path | None,
                         sets: list[str]) -> dict:
    """The resolved configuration of a post-training stage (sft, dpo) starting from SOURCE: its architecture, the
    train: settings of its run and its recipe (less pre-training's batch and schedule, which SECTION: gives), and
    SECTION: from the recipe (--recipe, else the one SOURCE was trained with), then --config and --set."""
    from slm.recipes import find_recipe, load_recipe
    from slm.train.config import resolve

    if recipe is not None and find_recipe(recipe) is None:
        resolve(recipe)  # the one-line error naming the recipes
    parent = saved_config(source.dir.parent.parent) or {}
    recipe = recipe or parent.get("recipe")
    from_recipe = load_recipe(recipe) if recipe and find_recipe(recipe) else {}
    train = {**parent.get("train", {}), **(from_recipe.get("train") or {})}
    for k in ("steps", "total_steps", "tokens_per_step", "micro_batch_size", "lr_peak", "lr_min", "schedule",
              "warmup_steps"):
        train.pop(k, None)
    base = {"recipe": recipe, "model": source.model_config.to_dict(), "train": train,
            section: from_recipe.get(section) or {}}
    return resolve(None, config_file, sets, base=base)


def samples_per_step(tokens_per_step: int, seq_len: int) -> int:
    if tokens_per_step % seq_len:
        raise SlmError(f"train.tokens_per_step {tokens_per_step} is not a multiple of the mix's seq_len {seq_len}")
    return tokens_per_step // seq_len


def steps_from(steps: int | None, tokens: int | None, tokens_per_step: int) -> int | None:
    """--steps or --tokens (rounded up to whole steps)."""
    if steps is not None and tokens is not None:
        raise SlmError("give --steps or --tokens, not both")
    return steps or (math.ceil(tokens / tokens_per_step) if tokens else None)


def make_engine(d: engine.Dist, model: Transformer, t, accumulation: int) -> engine.Engine:
    """The engine train.engine names, around MODEL (whose weights are already loaded), with its optimizer;
    ACCUMULATION micro-batches per step and process."""
    name = engine.resolve_engine(t.engine, d)
    user, where = None, ""
    if name == "deepspeed" and t.deepspeed_config:
        where = t.deepspeed_config
        user = read_json(Path(where), "DeepSpeed config")
        if not isinstance(user, dict):
            raise SlmError(f"{where}: expected a JSON object (a DeepSpeed config)")
    return engine.build(name, d, model, t, accumulation=accumulation,
                        micro_batch_size=t.micro_batch_size, deepspeed_user_config=user, deepspeed_where=where)


def restore(ckpt: Checkpoint, eng: engine.Engine, d: engine.Dist) -> None:
    """AdamW's state and the RNG from CKPT, into ENG (any engine, any number of processes)."""
    opt = ckpt.optimizer_state(legacy_order=engine.optimizer_order(eng.model))
    if opt is None:
        raise SlmError(f"{ckpt.dir}: no train_state/optimizer.safetensors: cannot resume exactly")
    eng.load_optimizer_state(opt, str(ckpt.dir))
    rng = ckpt.rng_state()
    if rng is not None:
        set_rng_state(rng, d.device)


def post_training_start(stage: str, plan: dict, resume: Checkpoint | None, eng: engine.Engine, d: engine.Dist,
                        out: Path, resolved: dict, first_line: str) -> tuple[int, dict]:
    """Where a post-training run (sft, dpo, selfknow) starts: a resumed run's step, optimizer, RNG and counters; or
    step 0, with (on rank 0) RESOLVED written to OUT/config.yaml and FIRST_LINE told. Returns (step, run state)."""
    from slm.console import info
    from slm.train.config import to_yaml

    if resume is not None:
        restore(resume, eng, d)
        ts = resume.train_state
        if d.main:
            info(f"resuming {out} at step {resume.step}")
        return resume.step, {"tokens_seen": ts.get("tokens_seen", 0), stage: plan, "resumed": True,
                             "bad_steps_total": ts.get("bad_steps_total", 0),
                             "bad_steps_in_a_row": ts.get("bad_steps_in_a_row", 0)}
    if d.main:
        (Path(out) / "config.yaml").write_text(to_yaml(resolved))
        info(first_line)
    return 0, {"tokens_seen": 0, stage: plan}


def saved_config(run_dir: Path) -> dict | None:
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        return None
    return yaml.safe_load(p.read_text())


def valid_set(path: Path | None, seq_len: int, n: int, reader: MixReader, tok: Tokenizer) -> tuple[ValidSet | None, float | None]:
    if path is None:
        return None, None
    vs = ValidSet(path, seq_len, n)
    if vs.tokens.tokenizer_sha256 != tok.hash:
        raise SlmError(f"{path}: encoded with another tokenizer than the training data")
    return vs, vs.unigram_loss(reader.sources, tok.n_vocab)


@dataclass
class DryRun:
    """--dry-run: resolve the configuration and print the plan (slm.train.cost) without training."""

    gpu: str = "h100"
    """The GPU to plan for (a name in slm.train.metrics.GPUS)."""
    gpus: int | None = None
    """How many processes (one per GPU); default WORLD_SIZE, else 1."""
    mfu: float = 0.4
    """The model FLOPs utilisation to assume."""
    gpu_hours: float | None = None
    """A budget (or a reported figure): the plan then also gives the MFU it implies."""


def recipe_seq_len(recipe: str | None) -> int | None:
    """The sequence length of a recipe's mix, for a plan made before the data exists."""
    if not recipe:
        return None
    from slm.recipes import find_recipe, load_recipe

    if find_recipe(recipe) is None:
        return None
    return (load_recipe(recipe).get("mix") or {}).get("seq_len")


def plan(model_values: dict, tok: Tokenizer | None, t, seq_len: int, steps: int, dry: DryRun) -> dict:
    """The plan of a run: model from MODEL_VALUES (vocab from TOK unless fixed), STEPS of train.tokens_per_step."""
    import os

    from slm.train.cost import plan as cost_plan

    values = dict(model_values)
    if "vocab_size" not in values:
        if tok is None:
            raise SlmError("model.vocab_size: the recipe takes it from the data's tokenizer; give --data, or "
                           "--set model.vocab_size=N")
        values["vocab_size"] = padded_vocab_size(tok.n_vocab)
    try:
        model_cfg = ModelConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise SlmError(str(e)) from None
    world = dry.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise SlmError(f"--gpus {world}: expected a positive number")
    name = engine.resolve_engine(t.engine, engine.Dist(world=world))
    dtype = t.dtype if t.dtype != "auto" else "bf16"  # a plan is for GPUs: auto is bf16 there
    return cost_plan(model_cfg, t, seq_len, steps, world, name, dry.gpu, dry.mfu, dtype, dry.gpu_hours)
