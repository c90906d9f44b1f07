"""`slm sft`: supervised fine-tuning of a checkpoint on chat data, through the shared training loop.

The conversations are rendered with a chat template (ChatML, StableLM 2 Zephyr's, or a Jinja file), the loss is
taken on the assistant's tokens only, and conversations are packed into sequences with attention and positions
restarting at each. Special tokens the template needs and the tokenizer lacks are added to the tokenizer (written
to OUT/tokenizer, with the template in its tokenizer_config.json) and to the embedding, whose new rows start at the
mean embedding. Filters run before training and their counts are printed and kept in the manifest.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slm.console import table
from slm.errors import SlmError
from slm.formats.chat import ChatTemplate, iter_objects, parse_chat
from slm.formats.checkpoint import Checkpoint
from slm.formats.manifest import atomic_dir, new_manifest, write_json
from slm.formats.records import BadRecord
from slm.formats.tokenizer import Tokenizer, padded_vocab_size, with_special_tokens
from slm.train import engine, setup
from slm.train.chat_data import ChatBatches, ChatValid, Encoded, Rows, encode_chat, pack, user_turns
from slm.train.config import resolve, sft_settings, train_settings
from slm.train.loop import Run, train
from slm.train.metrics import plot
from slm.train.schedules import Schedule


@dataclass
class SftConfig:
    model: Path | None
    """The checkpoint (or run directory) to fine-tune."""
    data: list[str]
    """Chat files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet, saved datasets, directories) or - for stdin."""
    out: Path | None
    recipe: str | None = None
    config_file: Path | None = None
    sets: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    """Held-out chat files: the validation loss on assistant tokens."""
    skip_bad: bool = False
    steps: int | None = None
    """Stop after this many steps (the schedule still spans the epochs)."""
    device: str = "auto"
    require_resume: bool = False
    requeue: bool = False


def read_conversations(specs: list[str], skip_bad: bool, counts: dict) -> list[list[dict]]:
    out = []
    for where, obj in iter_objects(specs, skip_bad, counts):
        try:
            out.append(parse_chat(obj, where))
        except BadRecord:
            if not skip_bad:
                raise
            counts["bad"] = counts.get("bad", 0) + 1
    return out


def prepare(convs: list[list[dict]], tok: Tokenizer, template: ChatTemplate, max_length: int,
            max_turns: int | None, overlong: str, counts: dict) -> list[Encoded]:
    """Filter and encode: drop conversations over MAX_TURNS, truncate or drop those over MAX_LENGTH tokens, drop
    those left with no assistant token; COUNTS gets each reason."""
    kept = []
    for messages in convs:
        if max_turns is not None and user_turns(messages) > max_turns:
            counts["dropped: more than max_turns"] = counts.get("dropped: more than max_turns", 0) + 1
            continue
        e = encode_chat(tok, template, messages)
        if len(e.ids) > max_length:
            if overlong == "drop":
                counts["dropped: longer than max_length"] = counts.get("dropped: longer than max_length", 0) + 1
                continue
            e = Encoded(e.ids[:max_length], e.mask[:max_length])
            counts["truncated to max_length"] = counts.get("truncated to max_length", 0) + 1
        if not e.mask[1:].any():
            counts["dropped: no assistant token"] = counts.get("dropped: no assistant token", 0) + 1
            continue
        kept.append(e)
    counts["kept"] = len(kept)
    return kept


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
                  d: engine.Dist) -> tuple[Tokenizer, list[str], Tokenizer | None]:
    """OUT/tokenizer: SOURCE's tokenizer with the special tokens TEMPLATE writes and EXTRA ones it lacks, and the
    template; (the tokenizer, the tokens added, SOURCE's tokenizer). SOURCE None (a resumed run): the one there."""
    tok_dir = out / "tokenizer"
    added: list[str] = []
    base_tok = None
    if source is not None:
        base_tok = source.tokenizer()
        if base_tok is None:
            raise SlmError(f"--model {source.dir}: no slm tokenizer (encoding.json) in the checkpoint")
        if d.main:
            with atomic_dir(tok_dir) as tmp:
                added, digest = with_special_tokens(base_tok, tmp, template.special_tokens + extra, template.source)
                write_json(tmp / "manifest.json", new_manifest(
                    "tokenizer", {"base": str(base_tok.dir), "template": template.name},
                    inputs=[{"path": str(base_tok.dir), "tokenizer_sha256": base_tok.hash}],
                    counts={"added_special_tokens": len(added)}, tokenizer_sha256=digest,
                    name=base_tok.spec.name, rules=base_tok.spec.rules, added_special_tokens=added,
                    chat_template=template.name))
        engine.barrier(d)
        added = engine.broadcast_object(added, d)
    return Tokenizer(tok_dir), added, base_tok


def model_for(source: Checkpoint | None, base_tok: Tokenizer | None, added: list[str], tok: Tokenizer, resume,
              d: engine.Dist, seed: int):
    """The model to fine-tune and its config: resumed, or SOURCE's weights with the embedding grown to TOK's ids
    (new rows at the mean embedding) when tokens were ADDED or the padded vocabulary grew."""
    if resume is not None:
        model = setup.new_model(resume.model_config, d.device, seed)
        setup.load_weights(model, resume)
        return model, resume.model_config
    base_cfg = source.model_config
    vocab = max(base_cfg.vocab_size, padded_vocab_size(tok.n_vocab))
    model_cfg = base_cfg.__class__.from_dict({**base_cfg.to_dict(), "vocab_size": vocab})
    model = setup.new_model(model_cfg, d.device, seed)
    state = source.state_dict()
    first_new = min(base_tok.n_vocab, base_cfg.vocab_size)
    if added or model_cfg.vocab_size != base_cfg.vocab_size:
        state = resize_vocab(state, model_cfg.vocab_size, first_new if not added else base_tok.n_vocab,
                             model_cfg.tie_embeddings)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [m for m in missing if not m.startswith("rotary.")] or unexpected:
        raise SlmError(f"{source.dir}: weights do not match the model")
    model.to(d.device)
    return model, model_cfg


def run(cfg: SftConfig) -> Path:
    d = engine.setup(cfg.device)
    try:
        return _run(cfg, d)
    finally:
        engine.teardown(d)


def _run(cfg: SftConfig, d: engine.Dist) -> Path:
    if cfg.out is None:
        raise SlmError("--out: missing (the run directory)")
    if not cfg.data:
        raise SlmError("--data: missing (chat files, or - for standard input)")
    out = Path(cfg.out)
    resume = setup.resume_point(out, "sft", d, cfg.require_resume)
    if resume is not None:
        resolved = resolve(None, None, cfg.sets, base=setup.saved_config(out))
        source = None
        plan = resume.train_state["sft"]
    else:
        if cfg.model is None:
            raise SlmError("--model: missing (the checkpoint to fine-tune)")
        source = Checkpoint.open(cfg.model)
        resolved = setup.post_training_config(source, "sft", cfg.recipe, cfg.config_file, cfg.sets)
        plan = None
    s = sft_settings(resolved)
    t = train_settings(resolved)
    template = ChatTemplate.load(s.template, s.system_prompt)

    # the records first: a bad one stops the run before anything is written
    counts: dict = {"read": 0}
    convs = read_conversations(cfg.data, cfg.skip_bad, counts)
    counts["read"] = len(convs) + counts.get("bad", 0)
    if counts.get("bad"):
        counts["skipped: bad record"] = counts.pop("bad")

    # the tokenizer: the base checkpoint's, with the template's special tokens and the template itself
    tok, added, base_tok = tokenizer_for(out, source if resume is None else None, template, [], d)

    encoded = prepare(convs, tok, template, s.max_length, s.max_turns, s.overlong, counts)
    if not encoded:
        raise SlmError(f"{', '.join(map(str, cfg.data))}: no conversation left to train on "
                       f"({', '.join(f'{k} {v}' for k, v in counts.items())})")
    groups = pack([len(e.ids) for e in encoded], s.max_length) if s.packing else [[i] for i in range(len(encoded))]
    rows = Rows(encoded, groups, s.max_length, tok.eos_id, t.seed)
    digest = rows_digest(rows)
    assistant = int(sum(e.mask.sum() for e in encoded))
    if d.main:
        table("sft data", [(k, f"{v:,}") for k, v in counts.items()] + [
            ("tokens", f"{rows.tokens:,} ({assistant:,} assistant)"),
            ("sequences", f"{len(rows):,} of {s.max_length} ({rows.tokens / (len(rows) * s.max_length):.0%} full"
                          f"{', packed' if s.packing else ''})")])

    sps = s.batch_size
    steps_total = math.ceil(s.epochs * len(rows) / sps)
    if plan is not None and plan["rows_sha256"] != digest:
        raise SlmError(f"{out}: the data or its settings changed since this run started (its sequences differ); "
                       "use another --out for a new run")
    t.micro_batch_size = s.micro_batch_size
    t.tokens_per_step = sps * (s.max_length - 1)
    warmup = round(s.warmup_ratio * steps_total)
    schedule = Schedule(kind=s.schedule, lr_peak=s.lr, lr_min=s.lr_min, warmup_steps=warmup, total_steps=steps_total)
    end = min(steps_total, cfg.steps) if cfg.steps else steps_total

    model, model_cfg = model_for(source, base_tok, added, tok, resume, d, t.seed)
    if s.max_length - 1 > model_cfg.max_seq_len:
        raise SlmError(f"sft.max_length {s.max_length}: longer than the model's max_seq_len {model_cfg.max_seq_len} "
                       "(plus one)")
    batches = ChatBatches(rows, sps, s.micro_batch_size, d.rank, d.world, d.device)
    eng = setup.make_engine(d, model, t, batches.accumulation)
    plan = plan or {"from": str(source.dir), "rows_sha256": digest, "rows": len(rows), "steps": steps_total,
                    "counts": counts}
    resolved["model"] = model_cfg.to_dict()
    resolved["train"] = {**resolved["train"], "micro_batch_size": s.micro_batch_size}
    start, run_state = setup.post_training_start(
        "sft", plan, resume, eng, d, out, resolved,
        "" if resume is not None else
        f"sft: from {source.dir}, template {template.name}{' (added ' + ', '.join(added) + ')' if added else ''}; "
        f"{s.epochs} epoch(s) of {len(rows):,} sequences = {steps_total} steps of {sps}, lr {s.lr:g} ({s.schedule}, "
        f"warmup {warmup})")
    valid = None
    if cfg.valid:
        vcounts: dict = {}
        vconvs = read_conversations(cfg.valid, cfg.skip_bad, vcounts)
        venc = prepare(vconvs, tok, template, s.max_length, None, "truncate", vcounts)
        if venc:
            vgroups = pack([len(e.ids) for e in venc], s.max_length) if s.packing else [[i] for i in range(len(venc))]
            valid = ChatValid(Rows(venc, vgroups, s.max_length, tok.eos_id, t.seed))
    end_of_turn = tok.spec.special_tokens.get(template.end_of_turn) if template.end_of_turn else None
    lineage = {"stage": "sft", "recipe": resolved.get("recipe"), "tokenizer_sha256": tok.hash,
               "parent": plan["from"], "template": template.name, "data_rows_sha256": digest,
               "data": [str(p) for p in cfg.data], "data_counts": plan["counts"]}
    run = Run(stage="sft", run_dir=out, model=model, model_cfg=model_cfg, train=t, engine=eng, batches=batches,
              dist=d, lr_at=schedule, first_sample_of=lambda step: step * sps, start_step=start, end_step=end,
              seq_len=s.max_length - 1, tokenizer_dir=tok.dir, bos_id=tok.bos_id,
              eos_id=[tok.eos_id, end_of_turn] if end_of_turn is not None else tok.eos_id,
              lineage=lineage, state=run_state, valid=valid, requeue=cfg.requeue)
    last = train(run)
    if d.main:
        plot(out)
    return last

