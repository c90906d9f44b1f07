"""What every training stage (pretrain, cooldown, sft, dpo, selfknow) does before the loop: open the data and its
tokenizer, build the model and load its weights, find the checkpoint a run resumes from, build the engine, and start
the run there (its optimizer, RNG and counters) or at its beginning (its config.yaml written)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from slm import energy
from slm.console import info, warn
from slm.errors import SlmError, UsageError
from slm.formats.checkpoint import Checkpoint, list_checkpoints, newest_verified
from slm.formats.manifest import read_json, sha256_file
from slm.formats.mixplan import MixReader
from slm.formats.tables import plural
from slm.formats.tokenizer import Tokenizer, padded_vocab_size
from slm.model.transformer import ModelConfig, Transformer, build, load_state
from slm.recipes import find_recipe, load_recipe
from slm.train import engine
from slm.train.batches import StepBatches, ValidSet
from slm.train.config import resolve, to_yaml
from slm.train.dist import Dist, broadcast_object
from slm.train.loop import set_rng_state


def open_data(mix_dir: Path, tokenizer_dir: Path | None = None) -> tuple[MixReader, Tokenizer]:
    """The mix and the tokenizer its sources were encoded with (found through the tokens manifests)."""
    reader = MixReader(mix_dir)
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [Path(s.manifest["tokenizer"]["path"])
                                                                for s in reader.sources]
    for c in candidates:
        if (c / "encoding.json").is_file() or (c / "tokenizer.json").is_file():
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
    load_state(model, ckpt.state_dict(), str(ckpt.dir))


def resume_point(run_dir: Path, stage: str, d: Dist, required: bool = False) -> Checkpoint | None:
    """The checkpoint a STAGE run directory resumes from, or None for a fresh run: the newest one whose files all
    match its manifest (size and sha256). Rank 0 checks, every rank gets its answer. Newer ones that do not verify
    are named on stderr and left as they are."""
    energy.attach(run_dir)  # the node's energy record goes to RUN_DIR/energy/ when the process ends
    found = None
    if d.main:
        found = newest_verified(run_dir, on_skip=lambda p, why: warn(f"{p}: skipped, it does not verify ({why}); "
                                                                      "resuming from an older checkpoint"))
        found = str(found) if found else None
    found = broadcast_object(found, d)
    if found is None:
        existing = list_checkpoints(run_dir, complete_only=False)
        if existing:
            raise SlmError(f"{run_dir}: none of its {plural(len(existing), 'checkpoint')} verifies (see above); move "
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
    if recipe is not None and find_recipe(recipe) is None:
        resolve(recipe)  # the one-line error naming the recipes
    parent = saved_config(source.run_dir) or {}
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
        raise UsageError("give --steps or --tokens, not both")
    return steps if steps is not None else math.ceil(tokens / tokens_per_step) if tokens is not None else None


def make_engine(d: Dist, model: Transformer, t, batches: StepBatches) -> engine.Engine:
    """The engine train.engine names, around MODEL (whose weights are already loaded), with its optimizer; each
    step in BATCHES' micro-batches."""
    name = engine.resolve_engine(t.engine, d)
    user, where = None, ""
    if name == "deepspeed" and t.deepspeed_config:
        where = t.deepspeed_config
        user = read_json(Path(where), "DeepSpeed config")
        if not isinstance(user, dict):
            raise SlmError(f"{where}: expected a JSON object (a DeepSpeed config)")
    return engine.build(name, d, model, t, accumulation=batches.accumulation, micro_batch_size=batches.micro,
                        deepspeed_user_config=user, deepspeed_where=where)


def restore(ckpt: Checkpoint, eng: engine.Engine, d: Dist) -> None:
    """AdamW's state and the RNG from CKPT, into ENG (any engine, any number of processes)."""
    opt = ckpt.optimizer_state(legacy_order=engine.optimizer_order(eng.model))
    if opt is None:
        raise SlmError(f"{ckpt.dir}: no train_state/optimizer.safetensors: cannot resume exactly")
    eng.load_optimizer_state(opt, str(ckpt.dir))
    rng = ckpt.rng_state()
    if rng is not None:
        set_rng_state(rng, d.device)


def start_or_resume(resume: Checkpoint | None, eng: engine.Engine, d: Dist, out: Path, resolved: dict,
                    first_line: str, state: dict, fresh_step: int = 0) -> tuple[int, dict]:
    """(the first step, the run's state). Resumed: RESUME's step, its optimizer, RNG and counters put back (and
    said). Fresh: FRESH_STEP, RESOLVED written to OUT/config.yaml, FIRST_LINE told. STATE goes into every
    checkpoint (tokens_seen, the stage's plan)."""
    if resume is None:
        if d.main:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "config.yaml").write_text(to_yaml(resolved))
            info(first_line)
        return fresh_step, state
    restore(resume, eng, d)
    ts = resume.train_state
    if d.main:
        info(f"resuming {out} at step {resume.step} ({eng.describe()}, {plural(d.world, 'process')}; the checkpoint "
             f"was written by {ts.get('engine', 'single')} on {plural(ts.get('world_size', 1), 'process')})")
    return resume.step, {**state, "tokens_seen": ts.get("tokens_seen", state.get("tokens_seen", 0)), "resumed": True,
                         "bad_steps_total": ts.get("bad_steps_total", 0),
                         "bad_steps_in_a_row": ts.get("bad_steps_in_a_row", 0),
                         "spikes_total": ts.get("spikes_total", 0), "loss_window": ts.get("loss_window", [])}


def saved_config(run_dir: Path | None) -> dict | None:
    """RUN_DIR/config.yaml (None for no run: a released model stands alone)."""
    if run_dir is None:
        return None
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
