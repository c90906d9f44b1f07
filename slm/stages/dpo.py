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
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slm.console import info, table
from slm.errors import SlmError
from slm.formats.chat import ChatTemplate, Pair, iter_objects, parse_pair
from slm.formats.checkpoint import Checkpoint, read_metrics
from slm.formats.manifest import atomic_dir, new_manifest, read_manifest, sha256_file, write_json
from slm.formats.records import BadRecord
from slm.formats.tokenizer import Tokenizer
from slm.train import engine, setup
from slm.train.chat_data import encode_chat
from slm.train.config import dpo_settings, resolve, train_settings
from slm.train.loop import Run, autocast_for, train
from slm.train.metrics import plot
from slm.train.preference import EncodedPair, PairBatches, PairValid, make_loss_fn, reference_logprobs
from slm.train.schedules import Schedule


@dataclass
class DpoConfig:
    model: Path | None
    """The fine-tuned checkpoint (or run directory): the policy's start and, by default, the reference."""
    data: list[str]
    out: Path | None
    ref: Path | None = None
    recipe: str | None = None
    config_file: Path | None = None
    sets: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    skip_bad: bool = False
    steps: int | None = None
    device: str = "auto"
    require_resume: bool = False
    requeue: bool = False


def read_pairs(specs: list[str], skip_bad: bool, min_chosen: float | None, counts: dict) -> list[Pair]:
    """Pairs of SPECS with the filters applied; COUNTS gets each reason."""
    pairs, seen = [], set()
    bad = {}
    for where, obj in iter_objects(specs, skip_bad, bad):
        counts["read"] = counts.get("read", 0) + 1
        try:
            p = parse_pair(obj, where)
        except BadRecord:
            if not skip_bad:
                raise
            counts["skipped: bad record"] = counts.get("skipped: bad record", 0) + 1
            continue
        reason = None
        if p.chosen == p.rejected:
            reason = "dropped: identical answers"
        elif p.score_chosen is not None and p.score_chosen == p.score_rejected:
            reason = "dropped: tie (equal scores)"
        elif min_chosen is not None and p.score_chosen is not None and p.score_chosen < min_chosen:
            reason = f"dropped: chosen score below {min_chosen:g}"
        elif p.key() in seen:
            reason = "dropped: exact duplicate"
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
            continue
        seen.add(p.key())
        pairs.append(p)
    if bad.get("bad"):
        counts["read"] = counts.get("read", 0) + bad["bad"]
        counts["skipped: bad record"] = counts.get("skipped: bad record", 0) + bad["bad"]
    counts["kept"] = len(pairs)
    return pairs


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


def weights_sha256(ckpt: Checkpoint) -> str:
    """The reference's identity: its weights' sha256 (from its manifest when slm wrote it)."""
    try:
        m = read_manifest(ckpt.dir, "checkpoint")
        files = {f["path"]: f["sha256"] for f in m.get("files", [])}
        if "model.safetensors" in files:
            return files["model.safetensors"]
    except SlmError:
        pass
    return sha256_file(ckpt.dir / "model.safetensors")


def template_of(ckpt: Checkpoint, spec: str | None) -> ChatTemplate:
    return ChatTemplate.load(spec) if spec else ChatTemplate.of_checkpoint(ckpt.dir)


PAIR_LAYOUT = "logprobs [pairs, 2] float64: summed log-probabilities of the chosen and the rejected answer"


def cached_reference(out: Path, ref_ckpt: Checkpoint, ref_hash: str, data_hash: str, compute, d,
                     layout: str = PAIR_LAYOUT) -> torch.Tensor:
    """OUT/reference_logprobs/: reused when the reference's and the data's hashes match, else computed."""
    from safetensors.torch import load_file, save_file

    cache = out / "reference_logprobs"
    reuse = None
    if d.main and (cache / "manifest.json").is_file():
        try:
            m = read_manifest(cache, "reference_logprobs")
            if m.get("reference_sha256") == ref_hash and m.get("data_sha256") == data_hash:
                reuse = True
        except SlmError:
            reuse = None
    reuse = engine.broadcast_object(reuse, d)
    if reuse:
        if d.main:
            info(f"reference log-probabilities: reusing {cache}")
        return load_file(str(cache / "logprobs.safetensors"))["logprobs"]
    lp = compute()
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_dir(cache) as tmp:
            save_file({"logprobs": lp.cpu().contiguous()}, str(tmp / "logprobs.safetensors"))
            write_json(tmp / "manifest.json", new_manifest(
                "reference_logprobs", {"reference": str(ref_ckpt.dir)},
                inputs=[{"path": str(ref_ckpt.dir), "sha256": ref_hash}], counts={"rows": int(lp.shape[0])},
                reference_sha256=ref_hash, data_sha256=data_hash, layout=layout))
    engine.barrier(d)
    return lp.cpu()


def run(cfg: DpoConfig) -> Path:
    d = engine.setup(cfg.device)
    try:
        return _run(cfg, d)
    finally:
        engine.teardown(d)


def _run(cfg: DpoConfig, d: engine.Dist) -> Path:
    if cfg.out is None:
        raise SlmError("--out: missing (the run directory)")
    if not cfg.data:
        raise SlmError("--data: missing (preference files, or - for standard input)")
    out = Path(cfg.out)
    resume = setup.resume_point(out, "dpo", d, cfg.require_resume)
    if resume is not None:
        resolved = resolve(None, None, cfg.sets, base=setup.saved_config(out))
        plan = resume.train_state["dpo"]
        source = Checkpoint.open(plan["from"])
    else:
        if cfg.model is None:
            raise SlmError("--model: missing (the fine-tuned checkpoint)")
        source = Checkpoint.open(cfg.model)
        resolved = setup.post_training_config(source, "dpo", cfg.recipe, cfg.config_file, cfg.sets)
        plan = None
    s = dpo_settings(resolved)
    t = train_settings(resolved)
    tok = source.tokenizer()
    if tok is None:
        raise SlmError(f"--model {source.dir}: no slm tokenizer (encoding.json) in the checkpoint")
    template = template_of(source, s.template)
    missing = [x for x in template.special_tokens if x not in tok.spec.special_tokens]
    if missing:
        raise SlmError(f"chat template {template.name}: the tokenizer of {source.dir} lacks {', '.join(missing)} "
                       "(fine-tune with `slm sft --template ...` first, which adds them)")

    # the reference must score the policy's token ids: checked before any data is read
    ref_ckpt = Checkpoint.open(cfg.ref) if cfg.ref else source
    if plan is not None:
        ref_ckpt = Checkpoint.open(plan["reference"])
    if ref_ckpt.dir != source.dir:
        ref_tok = ref_ckpt.tokenizer()
        if ref_tok is not None and ref_tok.hash != tok.hash:
            raise SlmError(f"--ref {ref_ckpt.dir}: its tokenizer ({ref_tok.hash[:12]}) is not the policy's "
                           f"({tok.hash[:12]}); the reference must score the same token ids")
        if ref_ckpt.model_config.vocab_size < tok.n_vocab:
            raise SlmError(f"--ref {ref_ckpt.dir}: vocab_size {ref_ckpt.model_config.vocab_size} is smaller than "
                           f"the tokenizer's {tok.n_vocab} ids")

    counts: dict = {}
    pairs = read_pairs(cfg.data, cfg.skip_bad, s.min_chosen_score, counts)
    encoded = encode_pairs(pairs, tok, template, s.max_length, s.max_prompt_length, counts)
    if not encoded:
        raise SlmError(f"{', '.join(map(str, cfg.data))}: no pair left to train on "
                       f"({', '.join(f'{k} {v}' for k, v in counts.items())})")
    valid_enc: list[EncodedPair] = []
    if cfg.valid:
        vcounts: dict = {}
        valid_enc = encode_pairs(read_pairs(cfg.valid, cfg.skip_bad, None, vcounts), tok, template, s.max_length,
                                 s.max_prompt_length, vcounts)
    if d.main:
        table("dpo data", [(k, f"{v:,}") for k, v in counts.items()]
              + ([("held-out pairs", f"{len(valid_enc):,}")] if cfg.valid else []))
    digest = pairs_digest(encoded + valid_enc)
    if plan is not None and plan["pairs_sha256"] != digest:
        raise SlmError(f"{out}: the data or its settings changed since this run started; use another --out")

    model_cfg = source.model_config if resume is None else resume.model_config
    model = setup.new_model(model_cfg, d.device, t.seed)
    setup.load_weights(model, resume if resume is not None else source)
    autocast = autocast_for(t, d.device)

    ref_hash = weights_sha256(ref_ckpt)
    micro = s.micro_batch_size

    def compute():
        if ref_ckpt.dir == source.dir and resume is None:
            ref_model = model  # the policy before its first step is the reference
        else:
            ref_model = setup.new_model(ref_ckpt.model_config, d.device, t.seed)
            setup.load_weights(ref_model, ref_ckpt)
        if d.main:
            info(f"reference log-probabilities of {len(encoded) + len(valid_enc):,} pairs from {ref_ckpt.dir}")
        lp = reference_logprobs(ref_model, encoded + valid_enc, micro, tok.eos_id, d.rank, d.world, d.device,
                                autocast)
        model.train()
        return engine.all_reduce_sum(lp, d)

    ref = cached_reference(out, ref_ckpt, ref_hash, digest, compute, d)
    ref_train, ref_valid = ref[:len(encoded)], ref[len(encoded):]

    pps = s.batch_size
    steps_total = math.ceil(s.epochs * len(encoded) / pps)
    warmup = round(s.warmup_ratio * steps_total)
    schedule = Schedule(kind=s.schedule, lr_peak=s.lr, lr_min=s.lr_min, warmup_steps=warmup, total_steps=steps_total)
    end = min(steps_total, cfg.steps) if cfg.steps else steps_total
    t.micro_batch_size = micro
    batches = PairBatches(encoded, ref_train, pps, micro, d.rank, d.world, tok.eos_id, t.seed, d.device)
    eng = setup.make_engine(d, model, t, batches.accumulation)
    plan = plan or {"from": str(source.dir), "reference": str(ref_ckpt.dir), "pairs_sha256": digest,
                    "pairs": len(encoded), "steps": steps_total, "counts": counts}
    resolved["train"] = {**resolved["train"], "micro_batch_size": micro}
    start, state = setup.post_training_start(
        "dpo", plan, resume, eng, d, out, resolved,
        "" if resume is not None else
        f"dpo: from {source.dir}, {s.loss} loss, beta {s.beta:g}; {s.epochs} epoch(s) of {len(encoded):,} pairs = "
        f"{steps_total} steps of {pps}, lr {s.lr:g} ({s.schedule}, warmup {warmup})")
    valid = PairValid(PairBatches(valid_enc, ref_valid, max(1, micro) * d.world, micro, d.rank, d.world,
                                  tok.eos_id, t.seed, d.device)) if valid_enc else None
    lengths = torch.tensor([[len(p.chosen) - p.chosen_start, len(p.rejected) - p.rejected_start] for p in valid_enc],
                           dtype=torch.float64).reshape(-1, 2)
    before = _accuracy(ref_valid, lengths) if valid_enc and ref_ckpt.dir == source.dir else None
    eot = tok.spec.special_tokens.get(template.end_of_turn) if template.end_of_turn else None
    lineage = {"stage": "dpo", "recipe": resolved.get("recipe"), "tokenizer_sha256": tok.hash,
               "parent": plan["from"], "reference": plan["reference"], "reference_sha256": ref_hash,
               "data": [str(p) for p in cfg.data], "data_pairs_sha256": digest, "data_counts": plan["counts"]}
    mean_len = float(np.mean([len(p.chosen) + len(p.rejected) for p in encoded])) / 2
    run = Run(stage="dpo", run_dir=out, model=model, model_cfg=model_cfg, train=t, engine=eng, batches=batches,
              dist=d, lr_at=schedule, first_sample_of=lambda step: step * pps, start_step=start, end_step=end,
              seq_len=max(1, round(2 * mean_len)), tokenizer_dir=source.dir, bos_id=tok.bos_id,
              eos_id=[tok.eos_id, eot] if eot is not None and eot != tok.eos_id else tok.eos_id, lineage=lineage,
              state=state, valid=valid, requeue=cfg.requeue, loss_fn=make_loss_fn(s.beta, s.loss))
    last = train(run)
    if valid_enc:
        lp = reference_logprobs(model, valid_enc, micro, tok.eos_id, d.rank, d.world, d.device, autocast)
        after = _accuracy(engine.all_reduce_sum(lp, d).cpu(), lengths)
        if d.main:
            rows = [r for r in read_metrics(out) if "valid_accuracy" in r]
            summary = {"valid_pairs": len(valid_enc), "preference_accuracy_before": before,
                       "preference_accuracy_after": after,
                       "reward_accuracy": rows[-1]["valid_accuracy"] if rows else None, "checkpoint": str(last),
                       "definition": "preference accuracy: share of held-out pairs whose chosen answer has the higher "
                                     "mean log-probability per token; reward accuracy: share whose DPO reward "
                                     "margin against the reference is positive"}
            write_json(out / "dpo.json", summary)
            info(f"held-out preference accuracy (mean log-probability per token, chosen above rejected): "
                 f"{'-' if before is None else f'{before:.1%}'} before dpo, {after:.1%} after ({len(valid_enc)} "
                 f"pairs; reward accuracy against the reference {summary['reward_accuracy']:.1%})")
    if d.main:
        plot(out)
    return last


def _accuracy(lp: torch.Tensor, lengths: torch.Tensor) -> float:
    """Share of pairs whose chosen answer has the higher mean log-probability per token (length-normalised: a
    summed log-probability favours the shorter answer whatever its quality)."""
    mean = lp.double() / lengths.clamp(min=1)
    return float((mean[:, 0] > mean[:, 1]).double().mean())

