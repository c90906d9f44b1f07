"""What the post-training stages (sft, dpo, selfknow train) share before the loop: where a run starts (resumed, or
from the checkpoint it fine-tunes, with that checkpoint's recipe), the tokenizer with the special tokens a chat
template needs, the model with its embedding grown to them, the schedule over epochs of the data, and the ids that
end an answer; and the Run that puts them together."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slm.errors import POSITIVE, SlmError, UsageError, check_ranges
from slm.formats.chat import ChatTemplate
from slm.formats.checkpoint import Checkpoint
from slm.formats.manifest import atomic_dir, new_manifest, write_json
from slm.formats.tables import plural
from slm.formats.tokenizer import Tokenizer, padded_vocab_size, with_special_tokens
from slm.model.transformer import load_state
from slm.train.batches import StepBatches
from slm.train.chat_batches import Rows
from slm.train.config import resolve
from slm.train.dist import Dist, barrier, broadcast_object
from slm.train.loop import Run
from slm.train.schedules import Schedule
from slm.train.start import (load_weights, make_engine, new_model, post_training_config, resume_point, saved_config,
                             start_or_resume)


@dataclass(kw_only=True)
class PostTrainingConfig:
    """What sft, dpo and selfknow train are given (each stage's config adds its own fields)."""

    model: Path | None
    """The checkpoint (or run directory) to train."""
    data: list[str]
    """Input files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet, saved datasets, directories) or - for stdin."""
    out: Path | None
    recipe: str | None = None
    """Take the stage's settings from this recipe (default: the one the model was trained with)."""
    config_file: Path | None = None
    sets: list[str] = field(default_factory=list)
    skip_bad: bool = False
    steps: int | None = None
    """Stop after this many steps (the schedule still spans the epochs)."""
    device: str = "auto"
    require_resume: bool = False
    requeue: bool = False

    def __post_init__(self):
        check_ranges(self, steps=POSITIVE)


def open_run(cfg: PostTrainingConfig, stage: str, d: Dist, what: str,
             reopen_source: bool = True) -> tuple[Path, Checkpoint | None, dict, Checkpoint | None, dict | None]:
    """(run directory, checkpoint to resume from, resolved config, checkpoint the run started from, plan): a run
    with a checkpoint resumes with its config.yaml and plan (REOPEN_SOURCE: the start checkpoint opened again);
    else cfg.model (WHAT, for the error) is opened and its recipe's STAGE settings resolved with the flags."""
    if cfg.out is None:
        raise UsageError("--out: missing (the run directory)")
    out = Path(cfg.out)
    resume = resume_point(out, stage, d, cfg.require_resume)
    if resume is not None:
        plan = resume.train_state[stage]
        source = Checkpoint.open(plan["from"]) if reopen_source else None
        return out, resume, resolve(None, None, cfg.sets, base=saved_config(out)), source, plan
    if cfg.model is None:
        raise UsageError(f"--model: missing ({what})")
    source = Checkpoint.open(cfg.model)
    return out, None, post_training_config(source, stage, cfg.recipe, cfg.config_file, cfg.sets), source, None


@dataclass
class Epochs:
    """EPOCHS passes over N items (conversations, rows, pairs) in steps of BATCH_SIZE, with its learning rate."""

    per_step: int
    total: int
    """Steps the schedule spans (all the epochs)."""
    end: int
    """Steps this run goes to (--steps may stop it early)."""
    warmup: int
    schedule: Schedule

    def describe(self, s, n: int, unit: str) -> str:
        return (f"{plural(s.epochs, 'epoch', 'epochs')} of {n:,} {unit} = {plural(self.total, 'step')} of {self.per_step}, "
                f"lr {s.lr:g} ({s.schedule}, warmup {self.warmup})")


def epochs(s, n: int, steps: int | None) -> Epochs:
    """The schedule of settings S (epochs, batch_size, lr, lr_min, schedule, warmup_ratio) over N items."""
    total = math.ceil(s.epochs * n / s.batch_size)
    warmup = round(s.warmup_ratio * total)
    return Epochs(per_step=s.batch_size, total=total, end=min(total, steps) if steps is not None else total,
                  warmup=warmup, schedule=Schedule(kind=s.schedule, lr_peak=s.lr, lr_min=s.lr_min,
                                                   warmup_steps=warmup, total_steps=total))


def answer_ends(tok: Tokenizer, template: ChatTemplate) -> int | list[int]:
    """The ids that end an answer (generation_config.json): end of text, and the template's end of turn."""
    eot = tok.spec.special_tokens.get(template.end_of_turn) if template.end_of_turn else None
    return [tok.eos_id, eot] if eot is not None and eot != tok.eos_id else tok.eos_id


def make_run(stage: str, out: Path, d: Dist, model, model_cfg, t, s, ep: Epochs, batches: StepBatches,
             resume: Checkpoint | None, resolved: dict, plan: dict, first_line: str, seq_len: int, tok: Tokenizer,
             tokenizer_dir: Path, template: ChatTemplate, lineage: dict, requeue: bool, **extra) -> Run:
    """The engine around MODEL, the run started or resumed, and the loop's Run (EXTRA: valid, loss_fn)."""
    eng = make_engine(d, model, t, batches)
    resolved["train"] = {**resolved["train"], "micro_batch_size": s.micro_batch_size}
    start, state = start_or_resume(resume, eng, d, out, resolved, first_line, {"tokens_seen": 0, stage: plan})
    return Run(stage=stage, run_dir=out, model=model, model_cfg=model_cfg, train=t, engine=eng, batches=batches,
               dist=d, lr_at=ep.schedule, first_sample_of=lambda step: step * ep.per_step, start_step=start,
               end_step=ep.end, seq_len=seq_len, tokenizer_dir=tokenizer_dir, bos_id=tok.bos_id,
               eos_id=answer_ends(tok, template), lineage=lineage, state=state, requeue=requeue, **extra)


def rows_digest(rows: Rows) -> str:
    h = hashlib.sha256()
    for r in rows.rows:
        for ci in r:
            h.update(rows.convs[ci].ids.astype(np.int64).tobytes())
            h.update(rows.convs[ci].mask.tobytes())
        h.update(b"|")
    return h.hexdigest()


def resize_vocab(model_state: dict, new_vocab: int, first_new: int, tied: bool) -> dict:
    """Embedding (and an untied output matrix) grown to NEW_VOCAB rows; rows from FIRST_NEW on (added tokens and
    padding) start at the mean of the rows before it."""
    out = dict(model_state)
    for key in ("embed_tokens.weight",) + (() if tied else ("lm_head.weight",)):
        w = model_state[key]
        mean = w[:first_new].float().mean(dim=0).to(w.dtype)
        grown = torch.empty((new_vocab, w.shape[1]), dtype=w.dtype)
        grown[:min(w.shape[0], first_new)] = w[:min(w.shape[0], first_new)]
        grown[first_new:] = mean
        out[key] = grown
    if tied and "lm_head.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def tokenizer_for(out: Path, source: Checkpoint | None, template: ChatTemplate, extra: list[str],
                  d: Dist) -> tuple[Tokenizer, list[str], Tokenizer | None]:
    """OUT/tokenizer: SOURCE's tokenizer with the special tokens TEMPLATE writes and EXTRA ones it lacks, and the
    template; (the tokenizer, the tokens added, SOURCE's tokenizer). SOURCE None (a resumed run): the one there."""
    tok_dir = out / "tokenizer"
    added: list[str] = []
    base_tok = None
    if source is not None:
        base_tok = source.tokenizer()
        if base_tok is None:
            raise SlmError(f"--model {source.dir}: no tokenizer (tokenizer.json, or slm's encoding.json)")
        if d.main:
            with atomic_dir(tok_dir) as tmp:
                added, digest = with_special_tokens(base_tok, tmp, template.special_tokens + extra, template.source)
                write_json(tmp / "manifest.json", new_manifest(
                    "tokenizer", {"base": str(base_tok.dir), "template": template.name},
                    inputs=[{"path": str(base_tok.dir), "tokenizer_sha256": base_tok.hash}],
                    counts={"added_special_tokens": len(added)}, tokenizer_sha256=digest,
                    name=base_tok.spec.name, rules=base_tok.spec.rules, added_special_tokens=added,
                    chat_template=template.name))
        barrier(d)
        added = broadcast_object(added, d)
    return Tokenizer(tok_dir), added, base_tok


def model_for(source: Checkpoint | None, base_tok: Tokenizer | None, added: list[str], tok: Tokenizer, resume,
              d: Dist, seed: int):
    """The model to fine-tune and its config: resumed, or SOURCE's weights with the embedding grown to TOK's ids
    (new rows at the mean embedding) when tokens were ADDED or the padded vocabulary grew."""
    if resume is not None:
        model = new_model(resume.model_config, d.device, seed)
        load_weights(model, resume)
        return model, resume.model_config
    base_cfg = source.model_config
    vocab = max(base_cfg.vocab_size, padded_vocab_size(tok.n_vocab))
    model_cfg = base_cfg.__class__.from_dict({**base_cfg.to_dict(), "vocab_size": vocab})
    model = new_model(model_cfg, d.device, seed)
    state = source.state_dict()
    first_new = min(base_tok.n_vocab, base_cfg.vocab_size)
    if added or model_cfg.vocab_size != base_cfg.vocab_size:
        state = resize_vocab(state, model_cfg.vocab_size, first_new if not added else base_tok.n_vocab,
                             model_cfg.tie_embeddings)
    load_state(model, state, str(source.dir))
    model.to(d.device)
    return model, model_cfg
