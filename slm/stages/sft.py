"""`slm sft`: supervised fine-tuning of a checkpoint on chat data, through the shared training loop.

The conversations are rendered with a chat template (ChatML, StableLM 2 Zephyr's, or a Jinja file), the loss is
taken on the assistant's tokens only, and conversations are packed into sequences with attention and positions
restarting at each. Special tokens the template needs and the tokenizer lacks are added to the tokenizer (written
to OUT/tokenizer, with the template in its tokenizer_config.json) and to the embedding, whose new rows start at the
mean embedding. Filters run before training and their counts are printed and kept in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slm.console import info, table
from slm.errors import SlmError, UsageError
from slm.formats.chat import ChatTemplate, iter_objects, parse_chat, template_source
from slm.formats.checkpoint import Checkpoint, model_input
from slm.formats.manifest import absolute, input_entry
from slm.formats.records import BadRecord
from slm.formats.tokenizer import Tokenizer
from slm.train.chat_batches import ChatBatches, ChatValid, Encoded, Rows, encode_chat, pack, user_turns
from slm.train.config import sft_settings, train_settings
from slm.train.dist import Dist, per_process
from slm.train.loop import train
from slm.train.posttrain import (PostTrainingConfig, epochs, make_run, model_for, open_run, rows_digest,
                                 tokenizer_for)


@dataclass(kw_only=True)
class SftConfig(PostTrainingConfig):
    """model: the checkpoint to fine-tune; data: chat files."""

    valid: list[str] = field(default_factory=list)
    """Held-out chat files: the validation loss on assistant tokens."""


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


def _template(s, source: Checkpoint | None, out: Path) -> ChatTemplate:
    """sft.template when set; else the model's own (a released instruct model's), else chatml; a resumed run
    (SOURCE None) keeps the one its tokenizer was written with."""
    if s.template:
        return ChatTemplate.load(s.template, s.system_prompt)
    if source is None:
        return ChatTemplate.of_checkpoint(out / "tokenizer")
    if template_source(source.dir):
        return ChatTemplate.of_checkpoint(source.dir)
    info(f"sft: {source.dir} has no chat template: ChatML (set sft.template, or --template, for another)")
    return ChatTemplate.load("chatml", s.system_prompt)


@per_process
def run(cfg: SftConfig, d: Dist) -> Path:
    if not cfg.data:
        raise UsageError("--data: missing (chat files, or - for standard input)")
    out, resume, resolved, source, plan = open_run(cfg, "sft", d, "the checkpoint to fine-tune", reopen_source=False)
    s = sft_settings(resolved)
    t = train_settings(resolved)
    template = _template(s, source, out)

    # the records first: a bad one stops the run before anything is written
    counts: dict = {"read": 0}
    convs = read_conversations(cfg.data, cfg.skip_bad, counts)
    counts["read"] = len(convs) + counts.get("bad", 0)
    if counts.get("bad"):
        counts["skipped: bad record"] = counts.pop("bad")

    # the tokenizer: the base checkpoint's, with the template's special tokens and the template itself
    tok, added, base_tok = tokenizer_for(out, source, template, [], d)

    encoded = prepare(convs, tok, template, s.max_length, s.max_turns, s.overlong, counts)
    if not encoded:
        raise SlmError(f"{', '.join(map(str, cfg.data))}: no conversation left to train on "
                       f"({', '.join(f'{k} {v}' for k, v in counts.items())})")
    rows = _rows(encoded, s, tok, t.seed)
    digest = rows_digest(rows)
    assistant = int(sum(e.mask.sum() for e in encoded))
    if d.main:
        table("sft data", [(k, f"{v:,}") for k, v in counts.items()] + [
            ("tokens", f"{rows.tokens:,} ({assistant:,} assistant)"),
            ("sequences", f"{len(rows):,} of {s.max_length} ({rows.tokens / (len(rows) * s.max_length):.0%} full"
                          f"{', packed' if s.packing else ''})")])
    if plan is not None and plan["rows_sha256"] != digest:
        raise SlmError(f"{out}: the data or its settings changed since this run started (its sequences differ); "
                       "use another --out for a new run")
    ep = epochs(s, len(rows), cfg.steps)
    t.micro_batch_size = s.micro_batch_size
    t.tokens_per_step = ep.per_step * (s.max_length - 1)

    model, model_cfg = model_for(source, base_tok, added, tok, resume, d, t.seed)
    if s.max_length - 1 > model_cfg.max_seq_len:
        raise SlmError(f"sft.max_length {s.max_length}: longer than the model's max_seq_len {model_cfg.max_seq_len} "
                       "(plus one)")
    plan = plan or {"from": str(source.dir), "rows_sha256": digest, "rows": len(rows), "steps": ep.total,
                    "counts": counts}
    resolved["model"] = model_cfg.to_dict()
    valid = None
    if cfg.valid:
        vcounts: dict = {}
        venc = prepare(read_conversations(cfg.valid, cfg.skip_bad, vcounts), tok, template, s.max_length, None,
                       "truncate", vcounts)
        valid = ChatValid(_rows(venc, s, tok, t.seed)) if venc else None
    first = "" if resume is not None else (
        f"sft: from {source.dir}, template {template.name}{' (added ' + ', '.join(added) + ')' if added else ''}; "
        + ep.describe(s, len(rows), "sequences"))
    lineage = {"stage": "sft", "recipe": resolved.get("recipe"), "tokenizer_sha256": tok.hash,
               "parent": plan["from"], "template": template.name, "data_rows_sha256": digest,
               "data": absolute(cfg.data), "data_counts": plan["counts"],
               "inputs": [model_input(plan["from"], "parent")] + [input_entry(p, "data") for p in cfg.data]
               + [input_entry(p, "valid") for p in cfg.valid]}
    batches = ChatBatches(rows, ep.per_step, s.micro_batch_size, d.rank, d.world, d.device)
    return train(make_run("sft", out, d, model, model_cfg, t, s, ep, batches, resume, resolved, plan, first,
                          s.max_length - 1, tok, tok.dir, template, lineage, cfg.requeue, valid=valid))


def _rows(encoded: list[Encoded], s, tok: Tokenizer, seed: int) -> Rows:
    """Conversations as training rows of max_length: packed, or one per row."""
    groups = pack([len(e.ids) for e in encoded], s.max_length) if s.packing else [[i] for i in range(len(encoded))]
    return Rows(encoded, groups, s.max_length, tok.eos_id, seed)
