"""`slm selfknow train`: StableLM 2's third post-training stage, self-knowledge, on the pairs of `slm selfknow
generate` (slm.stages.selfknow_pairs).

train: C-RLFT (slm/train/crlft.py has the objective). Every pair gives two conversations without a system message:
the chosen answer (positive class, weight class_weights.pos) and the rejected one with the negative-class token
before it (weight class_weights.neg); both are packed into rows and trained through the shared loop. The token is
added to the tokenizer and the embedding (a new row at the mean embedding) when the model lacks it. With kl_coef > 0
the starting model's per-token log-probabilities are computed once into OUT/reference_logprobs/. With FACTS' held-out
questions, OUT/selfknow.json holds the greedy answers (no system prompt) before and after, and the share that state
the name, the maker and both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slm.console import info, table
from slm.errors import SlmError, UsageError
from slm.formats.chat import ChatTemplate
from slm.formats.checkpoint import Checkpoint, model_input
from slm.formats.facts import Facts, load_facts
from slm.formats.manifest import absolute, input_entry, write_json
from slm.inference.chat import Sampling, answer_all, stop_ids
from slm.inference.load import load_model
from slm.train.chat_batches import ChatBatches, Encoded, encode_chat, pack
from slm.train.config import selfknow_settings, train_settings
from slm.train.crlft import CrlftRows, make_loss_fn, token_logprobs
from slm.train.dist import Dist, all_reduce_sum, per_process
from slm.train.loop import autocast_for, train
from slm.train.posttrain import (PostTrainingConfig, epochs, make_run, model_for, open_run, rows_digest,
                                 tokenizer_for)
from slm.train.preference import cached_reference, read_pairs


@dataclass(kw_only=True)
class TrainConfig(PostTrainingConfig):
    """model: the chat checkpoint to train; data: a `slm selfknow generate` directory or preference files."""

    facts: Path | None = None
    """FACTS.yaml for the before/after check on its held-out questions (default: DATA's facts.yaml)."""


def data_files(specs: list[str]) -> tuple[list[str], Path | None]:
    """The pair files of SPECS (a generate directory stands for its pairs.jsonl) and the facts file found there."""
    files, facts = [], None
    for spec in specs:
        p = Path(spec)
        if spec != "-" and p.is_dir() and (p / "pairs.jsonl").is_file():
            files.append(str(p / "pairs.jsonl"))
            if facts is None and (p / "facts.yaml").is_file():
                facts = p / "facts.yaml"
        else:
            files.append(spec)
    return files, facts


def encode_classes(pairs, tok, template: ChatTemplate, negative_id: int, max_length: int, counts: dict):
    """Each pair as two conversations: the chosen answer (positive) as SFT would train it, and the rejected one
    (negative) with the negative-class token first. Returns (Encoded list, positive flags)."""
    convs, positive = [], []
    for p in pairs:
        for answer, pos in ((p.chosen, True), (p.rejected, False)):
            e = encode_chat(tok, template, p.prompt + [{"role": "assistant", "content": answer}], only_last=True)
            if not pos:
                e = Encoded(np.concatenate([[negative_id], e.ids]), np.concatenate([[False], e.mask]))
            if len(e.ids) > max_length:
                e = Encoded(e.ids[:max_length], e.mask[:max_length])
                counts["truncated to max_length"] = counts.get("truncated to max_length", 0) + 1
            if not e.mask[1:].any():
                counts["dropped: no answer token"] = counts.get("dropped: no answer token", 0) + 1
                continue
            convs.append(e)
            positive.append(pos)
    return convs, positive


def check_answers(ckpt_dir: Path, questions: list[str], facts: Facts, device) -> dict:
    """Greedy answers of a checkpoint to QUESTIONS (no system prompt) and the share that state the name, the
    maker, and both."""
    ckpt = Checkpoint.open(ckpt_dir)
    tok = ckpt.tokenizer()
    template = ChatTemplate.of_checkpoint(ckpt.dir)
    model = load_model(ckpt, device)
    stops = stop_ids(tok, template)
    answers = answer_all(model, tok, template, [[{"role": "user", "content": q}] for q in questions],
                         Sampling(temperature=0, max_new_tokens=64), stops, 64, torch.Generator(), "held-out answers")
    states = [facts.mentions(a) for a, _ in answers]
    n = max(1, len(questions))
    return {"name": sum(s["name"] for s in states) / n, "maker": sum(s["maker"] for s in states) / n,
            "both": sum(s["name"] and s["maker"] for s in states) / n,
            "answers": [{"question": q, "answer": a} for q, (a, _) in zip(questions, answers)]}


@per_process
def run(cfg: TrainConfig, d: Dist) -> Path:
    if not cfg.data:
        raise UsageError("--data: missing (a `slm selfknow generate` directory or preference files)")
    out, resume, resolved, source, plan = open_run(cfg, "selfknow", d, "the chat checkpoint to train")
    s = selfknow_settings(resolved)
    t = train_settings(resolved)
    template = ChatTemplate.load(s.template) if s.template else ChatTemplate.of_checkpoint(
        source.dir, "set selfknow.template with --set")
    files, found_facts = data_files(cfg.data)
    facts_path = cfg.facts or found_facts
    facts = load_facts(facts_path) if facts_path is not None else None

    counts: dict = {}
    pairs = read_pairs(files, cfg.skip_bad, None, counts)
    if not pairs:
        raise SlmError(f"{', '.join(files)}: no pair to train on ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    tok, added, base_tok = tokenizer_for(out, source if resume is None else None, template, [s.negative_token], d)
    convs, positive = encode_classes(pairs, tok, template, tok.spec.special_tokens[s.negative_token], s.max_length,
                                     counts)
    groups = pack([len(e.ids) for e in convs], s.max_length) if s.packing else [[i] for i in range(len(convs))]
    w = (s.class_weights["pos"], s.class_weights["neg"])
    rows = CrlftRows(convs, groups, s.max_length, tok.eos_id, t.seed, positive, w)
    digest = rows_digest(rows)
    if plan is not None and plan["rows_sha256"] != digest:
        raise SlmError(f"{out}: the data or its settings changed since this run started; use another --out")
    if d.main:
        table("selfknow data", [(k, f"{v:,}") for k, v in counts.items()] + [
            ("positive conversations", f"{sum(positive):,} (weight {w[0]:g})"),
            ("negative conversations", f"{len(positive) - sum(positive):,} (weight {w[1]:g}, marked "
                                       f"{s.negative_token})"),
            ("sequences", f"{len(rows):,} of {s.max_length} ({rows.tokens / (len(rows) * s.max_length):.0%} full)")])

    model, model_cfg = model_for(source if resume is None else None, base_tok, added, tok, resume, d, t.seed)
    if s.max_length - 1 > model_cfg.max_seq_len:
        raise SlmError(f"selfknow.max_length {s.max_length}: longer than the model's max_seq_len "
                       f"{model_cfg.max_seq_len} (plus one)")
    if s.kl_coef > 0:
        rows.ref = _reference(out, source, resume, model, rows, digest, convs, tok, s, t, d)
    ep = epochs(s, len(rows), cfg.steps)
    t.micro_batch_size = s.micro_batch_size
    t.tokens_per_step = ep.per_step * (s.max_length - 1)
    plan = plan or {"from": str(source.dir), "rows_sha256": digest, "rows": len(rows), "steps": ep.total,
                    "counts": counts}
    resolved["model"] = model_cfg.to_dict()
    first = "" if resume is not None else (
        f"selfknow: C-RLFT from {source.dir}{' (added ' + ', '.join(added) + ')' if added else ''}; class weights "
        f"pos {w[0]:g}, neg {w[1]:g}, kl_coef {s.kl_coef:g}; " + ep.describe(s, len(rows), "sequences"))
    lineage = {"stage": "selfknow", "recipe": resolved.get("recipe"), "tokenizer_sha256": tok.hash,
               "parent": plan["from"], "data": absolute(files), "data_rows_sha256": digest,
               "data_counts": plan["counts"], "facts_sha256": facts.sha256 if facts else None,
               "negative_token": s.negative_token, "class_weights": s.class_weights, "kl_coef": s.kl_coef,
               "inputs": [model_input(plan["from"], "parent")] + [input_entry(p, "data") for p in cfg.data]
               + ([input_entry(facts_path, "facts")] if facts_path is not None else [])}
    batches = ChatBatches(rows, ep.per_step, s.micro_batch_size, d.rank, d.world, d.device, "selfknow")
    last = train(make_run("selfknow", out, d, model, model_cfg, t, s, ep, batches, resume, resolved, plan, first,
                          s.max_length - 1, tok, tok.dir, template, lineage, cfg.requeue,
                          loss_fn=make_loss_fn(s.kl_coef)))
    if d.main and facts is not None and facts.eval and ep.end == ep.total:
        _check(out, plan["from"], last, facts, d.device)
    return last


def _reference(out: Path, source: Checkpoint, resume, model, rows: CrlftRows, digest: str, convs: list, tok, s,
               t, d: Dist) -> list[np.ndarray]:
    """The starting model's log-probability of every token of every conversation (kept in OUT/reference_logprobs/):
    the KL term's reference, the chat model before this stage with its embedding grown like the policy's."""
    autocast = autocast_for(t, d.device)

    def compute():
        if resume is None:
            ref_model = model
        else:
            src_tok = source.tokenizer()
            grown = [x for x in tok.spec.special_tokens if x not in src_tok.spec.special_tokens]
            ref_model, _ = model_for(source, src_tok, grown, tok, None, d, t.seed)
        if d.main:
            info(f"reference log-probabilities of {sum(rows.positive):,} positive answers from {source.dir}")
        lp = token_logprobs(ref_model, rows, list(range(len(rows))), s.micro_batch_size, d.rank, d.world,
                            d.device, autocast)
        model.train()
        return all_reduce_sum(torch.from_numpy(np.concatenate(lp)).to(d.device), d)

    flat = cached_reference(out, source, source.weights_sha256(), digest, compute, d,
                            layout="logprobs [tokens] float64: the reference's log-probability of each token of "
                                   "the conversations in order (0 where not trained)").numpy()
    ends = np.cumsum([len(c.ids) for c in convs])
    return np.split(flat, ends[:-1])


def _check(out: Path, start: str, last: Path, facts: Facts, device) -> None:
    """OUT/selfknow.json: the held-out questions answered before and after, and the table on stderr."""
    before = check_answers(Path(start), facts.eval, facts, device)
    after = check_answers(last, facts.eval, facts, device)
    summary = {"questions": len(facts.eval), "name": facts.name, "maker": facts.maker,
               "before": before, "after": after, "checkpoint": str(last),
               "definition": "share of FACTS' held-out questions whose greedy answer (no system prompt) "
                             "states the name / the maker / both (whole words, any case)"}
    write_json(out / "selfknow.json", summary)
    table("held-out questions: answers stating the facts", [
        ("name", f"{before['name']:.0%} before, {after['name']:.0%} after"),
        ("maker", f"{before['maker']:.0%} before, {after['maker']:.0%} after"),
        ("both", f"{before['both']:.0%} before, {after['both']:.0%} after")])
