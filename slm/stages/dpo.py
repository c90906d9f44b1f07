"""`slm dpo`: Direct Preference Optimization of a fine-tuned checkpoint, through the shared training loop.

Pairs are filtered as StableLM 2 and Zephyr did (ties, exact duplicates, chosen answers scored below a minimum),
rendered with the model's chat template (prompt cut to max_prompt_length keeping its end, answers cut to fit
max_length), and the reference model's log-probabilities of every answer are computed once and kept in
OUT/reference_logprobs/ with the reference's and the data's hashes: a rerun reuses them, and training runs only the
policy. The losses and logged quantities are in slm.train.preference. Held-out preference accuracy (the share of
pairs where the model gives the chosen answer the higher mean log-probability per token) is printed before and
after training and written to OUT/dpo.json, with the reward accuracy against the reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slm.console import info, table
from slm.errors import SlmError, UsageError
from slm.formats.chat import ChatTemplate, Pair
from slm.formats.checkpoint import Checkpoint, model_input
from slm.formats.manifest import absolute, input_entry, write_json
from slm.formats.metrics import read_metrics
from slm.formats.tokenizer import Tokenizer
from slm.train.chat_batches import encode_chat
from slm.train.config import dpo_settings, train_settings
from slm.train.dist import Dist, all_reduce_sum, per_process
from slm.train.loop import autocast_for, train
from slm.train.posttrain import PostTrainingConfig, epochs, make_run, open_run
from slm.train.preference import (EncodedPair, PairBatches, PairValid, cached_reference, make_loss_fn, read_pairs,
                                  reference_logprobs)
from slm.train.start import load_weights, new_model


@dataclass(kw_only=True)
class DpoConfig(PostTrainingConfig):
    """model: the fine-tuned checkpoint (the policy's start and the default reference); data: preference files."""

    ref: Path | None = None
    """The reference checkpoint (default: model)."""
    valid: list[str] = field(default_factory=list)
    """Held-out pairs: preference and reward accuracy as it trains, before and after."""


def encode_pairs(pairs: list[Pair], tok: Tokenizer, template: ChatTemplate, max_length: int, max_prompt: int,
                 counts: dict) -> list[EncodedPair]:
    out = []
    for p in pairs:
        seqs = []
        for answer in (p.chosen, p.rejected):
            e = encode_chat(tok, template, p.prompt + [{"role": "assistant", "content": answer}], only_last=True)
            start = int(np.argmax(e.mask)) if e.mask.any() else len(e.ids)
            seqs.append((e.ids[:start], e.ids[start:]))
        prompt = seqs[0][0]
        if len(prompt) > max_prompt:
            prompt = prompt[-max_prompt:]  # keep the end: the question is there
            counts["prompt cut to max_prompt_length"] = counts.get("prompt cut to max_prompt_length", 0) + 1
        budget = max_length - len(prompt)
        answers = [a[:budget] for _, a in seqs]
        if any(len(a) < len(s[1]) for a, s in zip(answers, seqs)):
            counts["answer cut to max_length"] = counts.get("answer cut to max_length", 0) + 1
        if min(len(a) for a in answers) == 0:
            counts["dropped: no room for the answer"] = counts.get("dropped: no room for the answer", 0) + 1
            continue
        out.append(EncodedPair(np.concatenate([prompt, answers[0]]), np.concatenate([prompt, answers[1]]),
                               len(prompt), len(prompt)))
    return out


def pairs_digest(pairs: list[EncodedPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        for a in (p.chosen, p.rejected):
            h.update(a.astype(np.int64).tobytes())
        h.update(f"{p.chosen_start},{p.rejected_start}|".encode())
    return h.hexdigest()


def template_of(ckpt: Checkpoint, spec: str | None) -> ChatTemplate:
    return ChatTemplate.load(spec) if spec else ChatTemplate.of_checkpoint(ckpt.dir, "give --template")


@per_process
def run(cfg: DpoConfig, d: Dist) -> Path:
    if not cfg.data:
        raise UsageError("--data: missing (preference files, or - for standard input)")
    out, resume, resolved, source, plan = open_run(cfg, "dpo", d, "the fine-tuned checkpoint")
    s = dpo_settings(resolved)
    t = train_settings(resolved)
    tok = source.tokenizer()
    if tok is None:
        raise SlmError(f"--model {source.dir}: no tokenizer (tokenizer.json, or slm's encoding.json)")
    template = template_of(source, s.template)
    missing = [x for x in template.special_tokens if x not in tok.spec.special_tokens]
    if missing:
        raise SlmError(f"chat template {template.name}: the tokenizer of {source.dir} lacks {', '.join(missing)} "
                       "(fine-tune with `slm sft --template ...` first, which adds them)")
    # the reference must score the policy's token ids: checked before any data is read
    ref_ckpt = reference_of(Checkpoint.open(plan["reference"]) if plan is not None else
                            Checkpoint.open(cfg.ref) if cfg.ref else source, source, tok)

    counts: dict = {}
    encoded, valid_enc = _read(cfg, s, tok, template, counts, d.main)
    digest = pairs_digest(encoded + valid_enc)
    if plan is not None and plan["pairs_sha256"] != digest:
        raise SlmError(f"{out}: the data or its settings changed since this run started; use another --out")

    model_cfg = source.model_config if resume is None else resume.model_config
    model = new_model(model_cfg, d.device, t.seed)
    load_weights(model, resume if resume is not None else source)
    autocast = autocast_for(t, d.device)
    ref_hash = ref_ckpt.weights_sha256()
    micro = s.micro_batch_size

    def compute():
        if ref_ckpt.dir == source.dir and resume is None:
            ref_model = model  # the policy before its first step is the reference
        else:
            ref_model = new_model(ref_ckpt.model_config, d.device, t.seed)
            load_weights(ref_model, ref_ckpt)
        if d.main:
            info(f"reference log-probabilities of {len(encoded) + len(valid_enc):,} pairs from {ref_ckpt.dir}")
        lp = reference_logprobs(ref_model, encoded + valid_enc, micro, tok.eos_id, d.rank, d.world, d.device,
                                autocast)
        model.train()
        return all_reduce_sum(lp, d)

    ref = cached_reference(out, ref_ckpt, ref_hash, digest, compute, d)
    ref_train, ref_valid = ref[:len(encoded)], ref[len(encoded):]

    ep = epochs(s, len(encoded), cfg.steps)
    t.micro_batch_size = micro
    batches = PairBatches(encoded, ref_train, ep.per_step, micro, d.rank, d.world, tok.eos_id, t.seed, d.device)
    plan = plan or {"from": str(source.dir), "reference": str(ref_ckpt.dir), "pairs_sha256": digest,
                    "pairs": len(encoded), "steps": ep.total, "counts": counts}
    first = "" if resume is not None else (
        f"dpo: from {source.dir}, {s.loss} loss, beta {s.beta:g}; " + ep.describe(s, len(encoded), "pairs"))
    valid = PairValid(PairBatches(valid_enc, ref_valid, max(1, micro) * d.world, micro, d.rank, d.world,
                                  tok.eos_id, t.seed, d.device)) if valid_enc else None
    lineage = {"stage": "dpo", "recipe": resolved.get("recipe"), "tokenizer_sha256": tok.hash,
               "parent": plan["from"], "reference": plan["reference"], "reference_sha256": ref_hash,
               "data": absolute(cfg.data), "data_pairs_sha256": digest, "data_counts": plan["counts"],
               "inputs": [model_input(plan["from"], "parent"), model_input(plan["reference"], "reference")]
               + [input_entry(p, "data") for p in cfg.data] + [input_entry(p, "valid") for p in cfg.valid]}
    mean_len = float(np.mean([len(p.chosen) + len(p.rejected) for p in encoded])) / 2
    last = train(make_run("dpo", out, d, model, model_cfg, t, s, ep, batches, resume, resolved, plan, first,
                          max(1, round(2 * mean_len)), tok, source.dir, template, lineage, cfg.requeue, valid=valid,
                          loss_fn=make_loss_fn(s.beta, s.loss)))
    if valid_enc:
        before = _accuracy(ref_valid, _lengths(valid_enc)) if ref_ckpt.dir == source.dir else None
        lp = reference_logprobs(model, valid_enc, micro, tok.eos_id, d.rank, d.world, d.device, autocast)
        after = _accuracy(all_reduce_sum(lp, d).cpu(), _lengths(valid_enc))
        if d.main:
            _summarise(out, last, len(valid_enc), before, after)
    return last


def _read(cfg: DpoConfig, s, tok: Tokenizer, template: ChatTemplate, counts: dict, show: bool):
    """The training pairs and the held-out ones, filtered and encoded; the filters' counts shown (SHOW)."""
    encoded = encode_pairs(read_pairs(cfg.data, cfg.skip_bad, s.min_chosen_score, counts), tok, template,
                           s.max_length, s.max_prompt_length, counts)
    if not encoded:
        raise SlmError(f"{', '.join(map(str, cfg.data))}: no pair left to train on "
                       f"({', '.join(f'{k} {v}' for k, v in counts.items())})")
    valid_enc: list[EncodedPair] = []
    if cfg.valid:
        valid_enc = encode_pairs(read_pairs(cfg.valid, cfg.skip_bad, None, {}), tok, template, s.max_length,
                                 s.max_prompt_length, {})
    if show:
        table("dpo data", [(k, f"{v:,}") for k, v in counts.items()]
              + ([("held-out pairs", f"{len(valid_enc):,}")] if cfg.valid else []))
    return encoded, valid_enc


def reference_of(ref: Checkpoint, source: Checkpoint, tok: Tokenizer) -> Checkpoint:
    """REF, once it is known to score the policy's token ids (the same tokenizer, a large enough vocabulary)."""
    if ref.dir != source.dir:
        ref_tok = ref.tokenizer()
        if ref_tok is not None and ref_tok.hash != tok.hash:
            raise SlmError(f"--ref {ref.dir}: its tokenizer ({ref_tok.hash[:12]}) is not the policy's "
                           f"({tok.hash[:12]}); the reference must score the same token ids")
        if ref.model_config.vocab_size < tok.n_vocab:
            raise SlmError(f"--ref {ref.dir}: vocab_size {ref.model_config.vocab_size} is smaller than "
                           f"the tokenizer's {tok.n_vocab} ids")
    return ref


def _summarise(out: Path, last: Path, pairs: int, before: float | None, after: float) -> None:
    """OUT/dpo.json and the line on stderr: held-out preference accuracy before and after, reward accuracy."""
    rows = [r for r in read_metrics(out) if "valid_accuracy" in r]
    summary = {"valid_pairs": pairs, "preference_accuracy_before": before, "preference_accuracy_after": after,
               "reward_accuracy": rows[-1]["valid_accuracy"] if rows else None, "checkpoint": str(last),
               "definition": "preference accuracy: share of held-out pairs whose chosen answer has the higher "
                             "mean log-probability per token; reward accuracy: share whose DPO reward "
                             "margin against the reference is positive"}
    write_json(out / "dpo.json", summary)
    info(f"held-out preference accuracy (mean log-probability per token, chosen above rejected): "
         f"{'-' if before is None else f'{before:.1%}'} before dpo, {after:.1%} after ({pairs} "
         f"pairs; reward accuracy against the reference {summary['reward_accuracy']:.1%})")


def _lengths(pairs: list[EncodedPair]) -> torch.Tensor:
    return torch.tensor([[len(p.chosen) - p.chosen_start, len(p.rejected) - p.rejected_start] for p in pairs],
                        dtype=torch.float64).reshape(-1, 2)


def _accuracy(lp: torch.Tensor, lengths: torch.Tensor) -> float:
    """Share of pairs whose chosen answer has the higher mean log-probability per token (length-normalised: a
    summed log-probability favours the shorter answer whatever its quality)."""
    mean = lp.double() / lengths.clamp(min=1)
    return float((mean[:, 0] > mean[:, 1]).double().mean())

