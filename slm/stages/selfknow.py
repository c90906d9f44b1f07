"""`slm selfknow generate | train`: StableLM 2's third post-training stage, self-knowledge.

generate: pairs by RLCD.

1. First messages. The base model continues a list of example first messages ("User: ...", a few drawn at random
   from FACTS' `messages`, else a built-in spread) and each sample, cut at its newline, is a candidate. Candidates
   are deduplicated (slm.formats.dedup: exact after normalisation, then near-duplicate by MinHash LSH), and those
   equal or near to a held-out question of FACTS' `eval` are dropped, until --n distinct messages are kept. FACTS'
   example messages are kept too (first), unless --no-seed-messages.
2. Answers (RLCD, Yang et al. 2023). The chat model answers every message twice, sampled alike (temperature 1 and
   up to 300 new tokens by default, as RLCD's runs): once under the positive prompt, a system message that states
   the facts and shows FACTS' examples (p+), and once with no system message (p-). The first is the chosen answer,
   the second the rejected one; no scorer is involved.

OUT/pairs.jsonl is in the preference format `slm dpo` reads ({"prompt", "chosen", "rejected"}, answers as
conversations without the system message), with each answer's mentions of the name and maker; OUT/messages.jsonl
holds the kept messages, OUT/facts.yaml the facts, and OUT/manifest.json the models' and facts' hashes, the sampling
settings and the counts. `slm selfknow train` reads the directory.

train: C-RLFT (slm/train/crlft.py has the objective). Every pair gives two conversations without a system message:
the chosen answer (positive class, weight class_weights.pos) and the rejected one with the negative-class token
before it (weight class_weights.neg); both are packed into rows and trained through the shared loop. The token is
added to the tokenizer and the embedding (a new row at the mean embedding) when the model lacks it. With kl_coef > 0
the starting model's per-token log-probabilities are computed once into OUT/reference_logprobs/. With FACTS' held-out
questions, OUT/selfknow.json holds the greedy answers (no system prompt) before and after, and the share that state
the name, the maker and both.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slm.console import RateColumn, info, progress, table, warn
from slm.errors import SlmError
from slm.formats.chat import ChatTemplate
from slm.formats.checkpoint import Checkpoint
from slm.formats.dedup import Deduper, normalize
from slm.formats.facts import DEFAULT_MESSAGES, Facts, load_facts
from slm.formats.manifest import atomic_dir, new_manifest, write_json
from slm.stages.generate import _device, generate_batch, load_model

MESSAGES_HEADER = "Messages that people sent to an AI assistant:\n\n"


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 300


@dataclass
class GenerateConfig:
    base: Path | None
    chat: Path | None
    facts: Path | None
    out: Path | None
    n: int = 10_000
    """Distinct first messages the base model writes (FACTS' example messages come on top)."""
    answer: Sampling = None  # type: ignore[assignment]
    message: Sampling = None  # type: ignore[assignment]
    shots: int = 8
    """Example messages shown to the base model in each prompt."""
    near_duplicate: float = 0.7
    """Character 4-gram Jaccard similarity from which two messages are near duplicates."""
    seed_messages: bool = True
    """Keep FACTS' example messages as messages too."""
    batch_size: int = 64
    max_attempts: int | None = None
    """Base-model samples to try before giving up on --n (default 20 x n)."""
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        self.answer = self.answer or Sampling()
        self.message = self.message or Sampling(temperature=1.0, top_p=0.95, max_new_tokens=64)


def _count(counts: dict, key: str, k: int = 1) -> None:
    counts[key] = counts.get(key, 0) + k


def _checkpoint_hash(ckpt: Checkpoint) -> str:
    from slm.stages.dpo import weights_sha256

    return weights_sha256(ckpt)


def unsampled(tok, stops: set[int]) -> set[int]:
    """Ids a model must not sample: placeholders (ids with no token) and special tokens other than STOPS (a message
    or an answer is text: a special token in it would change how the chat template's rendering tokenizes)."""
    return (set(tok.spec.placeholders.values()) | set(tok.spec.special_tokens.values())) - stops


def write_messages(model, tok, facts: Facts, cfg: GenerateConfig, counts: dict) -> list[tuple[str, str]]:
    """(message, source) pairs: FACTS' examples first (unless disabled), then the base model's, deduplicated."""
    dedup = Deduper(cfg.near_duplicate)
    held_out = Deduper(cfg.near_duplicate)
    for q in facts.eval:
        held_out.check(q)
    kept: list[tuple[str, str]] = []

    def consider(text: str, source: str) -> bool:
        if held_out.check(text, add=False):
            _count(counts, "dropped: a held-out question (or near one)")
            return False
        reason = dedup.check(text)
        if reason:
            _count(counts, reason)
            return False
        kept.append((text, source))
        return True

    examples = facts.messages or DEFAULT_MESSAGES
    if cfg.seed_messages:
        for m in facts.messages:
            consider(m, "facts")
    n_seed = len(kept)
    if cfg.n == 0:
        return kept
    if model is None:
        raise SlmError("--base: missing (the base model that writes the first messages)")
    newline = {i for b, i in tok.ranks.items() if b"\n" in b}
    stops = newline | {tok.eos_id}
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    budget = cfg.max_attempts if cfg.max_attempts is not None else 20 * cfg.n
    tried, s = 0, cfg.message
    with progress(RateColumn("completed", "messages/s")) as bar:
        task = bar.add_task("first messages", total=cfg.n)
        while len(kept) - n_seed < cfg.n and tried < budget:
            b = min(cfg.batch_size, budget - tried)
            prompts = []
            for _ in range(b):
                shots = rng.sample(examples, min(cfg.shots, len(examples)))
                prompts.append(tok.encode(MESSAGES_HEADER + "".join(f"User: {m}\n" for m in shots) + "User:"))
            results = generate_batch(model, prompts, s.max_new_tokens, s.temperature, s.top_k, s.top_p, stops, gen,
                                     keep_stop=True, n_vocab=tok.n_vocab, banned=unsampled(tok, stops))
            tried += b
            for ids, stopped in results:
                if not stopped:
                    _count(counts, "dropped: unfinished (no end of line)")
                    continue
                if ids[-1] == tok.eos_id:  # the end of the text ends a message too
                    ids = ids[:-1]
                text = tok.decode(ids).split("\n", 1)[0].strip()
                if len(normalize(text)) < 2:
                    _count(counts, "dropped: empty")
                    continue
                if consider(text, "base") and len(kept) - n_seed <= cfg.n:
                    bar.update(task, advance=1)
                if len(kept) - n_seed >= cfg.n:
                    break
    counts["base model samples"] = tried
    if len(kept) - n_seed < cfg.n:
        warn(f"the base model gave {len(kept) - n_seed} distinct messages in {tried} samples, fewer than --n {cfg.n}")
    return kept


def answer_all(model, tok, template: ChatTemplate, conversations: list[list[dict]], s: Sampling, stops: set[int],
               batch_size: int, gen: torch.Generator, label: str) -> list[tuple[str, bool]]:
    """The chat model's sampled answer to each conversation: (text, ended its turn). Batches of similar length."""
    spec = tok.spec
    prompts = [tok.encode(template.render([dict(m, content=tok.normalize(m["content"])) for m in c], True,
                                          spec.bos_token, spec.eos_token), allowed_special="all")
               for c in conversations]
    too_long = [i for i, p in enumerate(prompts) if len(p) >= model.cfg.max_seq_len]
    if too_long:
        raise SlmError(f"{label}: a prompt of {len(prompts[too_long[0]])} tokens does not fit the chat model's "
                       f"context ({model.cfg.max_seq_len}); shorten FACTS' system prompt or examples")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    banned = unsampled(tok, stops)
    out: list[tuple[str, bool]] = [("", False)] * len(prompts)
    tokens = {"n": 0}
    with progress(RateColumn("completed", "answers/s"), RateColumn("tokens", "tok/s")) as bar:
        task = bar.add_task(label, total=len(prompts), tokens=0)
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]

            def step(active):
                tokens["n"] += active
                bar.update(task, tokens=tokens["n"])

            results = generate_batch(model, [prompts[i] for i in idx], s.max_new_tokens, s.temperature, s.top_k,
                                     s.top_p, stops, gen, on_step=step, n_vocab=tok.n_vocab, banned=banned)
            for i, (ids, ended) in zip(idx, results):
                out[i] = (tok.decode(ids).strip(), ended)
            bar.update(task, advance=len(idx))
    return out


def generate(cfg: GenerateConfig) -> Path:
    started = time.time()
    if cfg.out is None:
        raise SlmError("--out: missing (the output directory)")
    if cfg.facts is None:
        raise SlmError("--facts: missing (a FACTS.yaml: name, maker, examples)")
    if cfg.chat is None:
        raise SlmError("--chat: missing (the chat model that answers)")
    if cfg.n < 0:
        raise SlmError(f"--n {cfg.n}: expected 0 or more messages")
    facts = load_facts(cfg.facts)
    device = _device(cfg.device)
    chat_ckpt = Checkpoint.open(cfg.chat)
    chat_tok = chat_ckpt.tokenizer()
    if chat_tok is None:
        raise SlmError(f"--chat {chat_ckpt.dir}: no slm tokenizer (encoding.json) in the checkpoint")
    template = ChatTemplate.of_checkpoint(chat_ckpt.dir)
    base_ckpt = Checkpoint.open(cfg.base) if cfg.base is not None else None
    counts: dict = {}

    # 1. first messages
    if base_ckpt is not None:
        base_tok = base_ckpt.tokenizer()
        if base_tok is None:
            raise SlmError(f"--base {base_ckpt.dir}: no slm tokenizer (encoding.json) in the checkpoint")
        base_model = load_model(base_ckpt, device)
    else:
        base_tok, base_model = None, None
    messages = write_messages(base_model, base_tok, facts, cfg, counts)
    del base_model
    counts["messages kept"] = len(messages)
    if not messages:
        raise SlmError("no first message to answer (the base model gave none, and FACTS has no messages)")

    # 2. answers, with and without the facts
    chat_model = load_model(chat_ckpt, device)
    stops = {chat_tok.eos_id}
    if template.end_of_turn and template.end_of_turn in chat_tok.spec.special_tokens:
        stops.add(chat_tok.spec.special_tokens[template.end_of_turn])
    system = facts.system_prompt()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    pos = answer_all(chat_model, chat_tok, template,
                     [[{"role": "system", "content": system}, {"role": "user", "content": m}] for m, _ in messages],
                     cfg.answer, stops, cfg.batch_size, gen, "answers with the facts")
    neg = answer_all(chat_model, chat_tok, template, [[{"role": "user", "content": m}] for m, _ in messages],
                     cfg.answer, stops, cfg.batch_size, gen, "answers without")

    records = []
    stated = {"chosen_name": 0, "chosen_maker": 0, "rejected_name": 0, "rejected_maker": 0}
    for (m, source), (p, p_end), (q, q_end) in zip(messages, pos, neg):
        if not p or not q:
            _count(counts, "dropped: empty answer")
            continue
        if p == q:
            _count(counts, "dropped: identical answers")
            continue
        _count(counts, f"answers cut at {cfg.answer.max_new_tokens} tokens", int(not p_end) + int(not q_end))
        mp, mq = facts.mentions(p), facts.mentions(q)
        for k in ("name", "maker"):
            stated[f"chosen_{k}"] += mp[k]
            stated[f"rejected_{k}"] += mq[k]
        user = {"role": "user", "content": m}
        records.append({"prompt": m, "chosen": [user, {"role": "assistant", "content": p}],
                        "rejected": [user, {"role": "assistant", "content": q}], "source": source,
                        "chosen_states": mp, "rejected_states": mq})
    counts["pairs"] = len(records)
    if not records:
        raise SlmError(f"no pair left ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    n = len(records)
    rates = {k: round(v / n, 4) for k, v in stated.items()}
    table("selfknow pairs", [(k, f"{v:,}") for k, v in counts.items()] + [
        (f"{k.replace('_', ' answers stating the ')}", f"{v:.0%}") for k, v in rates.items()])

    out = Path(cfg.out)
    settings = {"n": cfg.n, "shots": cfg.shots, "near_duplicate": cfg.near_duplicate,
                "seed_messages": cfg.seed_messages, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "answer_sampling": asdict(cfg.answer), "message_sampling": asdict(cfg.message),
                "system_prompt": system}
    inputs = [{"path": str(chat_ckpt.dir), "role": "chat", "sha256": _checkpoint_hash(chat_ckpt)},
              {"path": str(Path(cfg.facts)), "role": "facts", "sha256": facts.sha256}]
    if base_ckpt is not None:
        inputs.insert(0, {"path": str(base_ckpt.dir), "role": "base", "sha256": _checkpoint_hash(base_ckpt)})
    with atomic_dir(out) as tmp:
        with open(tmp / "pairs.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        with open(tmp / "messages.jsonl", "w", encoding="utf-8") as f:
            for m, source in messages:
                f.write(json.dumps({"text": m, "source": source}, ensure_ascii=False) + "\n")
        shutil.copyfile(cfg.facts, tmp / "facts.yaml")
        write_json(tmp / "manifest.json", new_manifest(
            "selfknow_pairs", settings, inputs=inputs, counts=counts, started=started, facts_sha256=facts.sha256,
            stated_rates=rates, chat_template=template.source))
    info(f"selfknow: {n:,} pairs in {out / 'pairs.jsonl'} (chosen answers state the name in "
         f"{rates['chosen_name']:.0%}, rejected in {rates['rejected_name']:.0%})")
    return out


# --- train -------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    model: Path | None
    """The chat checkpoint (or run directory) to train."""
    data: list[str]
    """A `slm selfknow generate` directory, or preference files ({"prompt", "chosen", "rejected"})."""
    out: Path | None
    facts: Path | None = None
    """FACTS.yaml for the before/after check on its held-out questions (default: DATA's facts.yaml)."""
    recipe: str | None = None
    config_file: Path | None = None
    sets: list[str] = None  # type: ignore[assignment]
    skip_bad: bool = False
    steps: int | None = None
    device: str = "auto"
    require_resume: bool = False
    requeue: bool = False

    def __post_init__(self):
        self.sets = list(self.sets or [])


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
    import numpy as np

    from slm.train.chat_data import Encoded, encode_chat

    convs, positive = [], []
    for p in pairs:
        for answer, pos in ((p.chosen, True), (p.rejected, False)):
            e = encode_chat(tok, template, p.prompt + [{"role": "assistant", "content": answer}], only_last=True)
            if not pos:
                e = Encoded(np.concatenate([[negative_id], e.ids]), np.concatenate([[False], e.mask]))
            if len(e.ids) > max_length:
                e = Encoded(e.ids[:max_length], e.mask[:max_length])
                _count(counts, "truncated to max_length")
            if not e.mask[1:].any():
                _count(counts, "dropped: no answer token")
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
    stops = {tok.eos_id}
    if template.end_of_turn in tok.spec.special_tokens:
        stops.add(tok.spec.special_tokens[template.end_of_turn])
    answers = answer_all(model, tok, template, [[{"role": "user", "content": q}] for q in questions],
                         Sampling(temperature=0, max_new_tokens=64), stops, 64, torch.Generator(), "held-out answers")
    states = [facts.mentions(a) for a, _ in answers]
    n = max(1, len(questions))
    return {"name": sum(s["name"] for s in states) / n, "maker": sum(s["maker"] for s in states) / n,
            "both": sum(s["name"] and s["maker"] for s in states) / n,
            "answers": [{"question": q, "answer": a} for q, (a, _) in zip(questions, answers)]}


def train(cfg: TrainConfig) -> Path:
    from slm.train import engine

    d = engine.setup(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        engine.teardown(d)


def _train(cfg: TrainConfig, d) -> Path:
    import math

    import numpy as np

    from slm.stages.dpo import cached_reference, read_pairs, weights_sha256
    from slm.stages.sft import model_for, rows_digest, tokenizer_for
    from slm.train import engine, setup
    from slm.train.chat_data import ChatBatches, pack
    from slm.train.config import resolve, selfknow_settings, train_settings
    from slm.train.crlft import CrlftRows, make_loss_fn, token_logprobs
    from slm.train.loop import Run, autocast_for
    from slm.train.loop import train as train_loop
    from slm.train.metrics import plot
    from slm.train.schedules import Schedule

    if cfg.out is None:
        raise SlmError("--out: missing (the run directory)")
    if not cfg.data:
        raise SlmError("--data: missing (a `slm selfknow generate` directory or preference files)")
    out = Path(cfg.out)
    resume = setup.resume_point(out, "selfknow", d, cfg.require_resume)
    if resume is not None:
        resolved = resolve(None, None, cfg.sets, base=setup.saved_config(out))
        plan = resume.train_state["selfknow"]
        source = Checkpoint.open(plan["from"])
    else:
        if cfg.model is None:
            raise SlmError("--model: missing (the chat checkpoint to train)")
        source = Checkpoint.open(cfg.model)
        resolved = setup.post_training_config(source, "selfknow", cfg.recipe, cfg.config_file, cfg.sets)
        plan = None
    s = selfknow_settings(resolved)
    t = train_settings(resolved)
    template = ChatTemplate.load(s.template) if s.template else ChatTemplate.of_checkpoint(source.dir)
    files, found_facts = data_files(cfg.data)
    facts_path = cfg.facts or found_facts
    facts = load_facts(facts_path) if facts_path is not None else None

    counts: dict = {}
    pairs = read_pairs(files, cfg.skip_bad, None, counts)
    if not pairs:
        raise SlmError(f"{', '.join(files)}: no pair to train on ({', '.join(f'{k} {v}' for k, v in counts.items())})")

    tok, added, base_tok = tokenizer_for(out, source if resume is None else None, template, [s.negative_token], d)
    negative_id = tok.spec.special_tokens[s.negative_token]
    convs, positive = encode_classes(pairs, tok, template, negative_id, s.max_length, counts)
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
    autocast = autocast_for(t, d.device)
    if s.kl_coef > 0:
        # the reference is the chat model before this stage (its embedding grown like the policy's)
        ref_hash = weights_sha256(source)

        def compute():
            if resume is None:
                ref_model = model
            else:
                src_tok = source.tokenizer()
                grown = [x for x in tok.spec.special_tokens if x not in src_tok.spec.special_tokens]
                ref_model, _ = model_for(source, src_tok, grown, tok, None, d, t.seed)
            if d.main:
                info(f"reference log-probabilities of {sum(positive):,} positive answers from {source.dir}")
            lp = token_logprobs(ref_model, rows, list(range(len(rows))), s.micro_batch_size, d.rank, d.world,
                                d.device, autocast)
            model.train()
            return engine.all_reduce_sum(torch.from_numpy(np.concatenate(lp)).to(d.device), d)

        flat = cached_reference(out, source, ref_hash, digest, compute, d,
                                layout="logprobs [tokens] float64: the reference's log-probability of each token of "
                                       "the conversations in order (0 where not trained)").numpy()
        ends = np.cumsum([len(c.ids) for c in convs])
        rows.ref = np.split(flat, ends[:-1])

    sps = s.batch_size
    steps_total = math.ceil(s.epochs * len(rows) / sps)
    t.micro_batch_size = s.micro_batch_size
    t.tokens_per_step = sps * (s.max_length - 1)
    warmup = round(s.warmup_ratio * steps_total)
    schedule = Schedule(kind=s.schedule, lr_peak=s.lr, lr_min=s.lr_min, warmup_steps=warmup, total_steps=steps_total)
    end = min(steps_total, cfg.steps) if cfg.steps else steps_total
    batches = ChatBatches(rows, sps, s.micro_batch_size, d.rank, d.world, d.device)
    eng = setup.make_engine(d, model, t, batches.accumulation)
    plan = plan or {"from": str(source.dir), "rows_sha256": digest, "rows": len(rows), "steps": steps_total,
                    "counts": counts}
    resolved["model"] = model_cfg.to_dict()
    resolved["train"] = {**resolved["train"], "micro_batch_size": s.micro_batch_size}
    start, state = setup.post_training_start(
        "selfknow", plan, resume, eng, d, out, resolved,
        "" if resume is not None else
        f"selfknow: C-RLFT from {source.dir}{' (added ' + ', '.join(added) + ')' if added else ''}; class weights "
        f"pos {w[0]:g}, neg {w[1]:g}, kl_coef {s.kl_coef:g}; {s.epochs} epoch(s) of {len(rows):,} sequences = "
        f"{steps_total} steps of {sps}, lr {s.lr:g} ({s.schedule}, warmup {warmup})")
    eot = tok.spec.special_tokens.get(template.end_of_turn) if template.end_of_turn else None
    lineage = {"stage": "selfknow", "recipe": resolved.get("recipe"), "tokenizer_sha256": tok.hash,
               "parent": plan["from"], "data": [str(p) for p in files], "data_rows_sha256": digest,
               "data_counts": plan["counts"], "facts_sha256": facts.sha256 if facts else None,
               "negative_token": s.negative_token, "class_weights": s.class_weights, "kl_coef": s.kl_coef}
    run = Run(stage="selfknow", run_dir=out, model=model, model_cfg=model_cfg, train=t, engine=eng, batches=batches,
              dist=d, lr_at=schedule, first_sample_of=lambda step: step * sps, start_step=start, end_step=end,
              seq_len=s.max_length - 1, tokenizer_dir=tok.dir, bos_id=tok.bos_id,
              eos_id=[tok.eos_id, eot] if eot is not None and eot != tok.eos_id else tok.eos_id,
              lineage=lineage, state=state, requeue=cfg.requeue, loss_fn=make_loss_fn(s.kl_coef))
    last = train_loop(run)
    if d.main:
        plot(out)
        if facts is not None and facts.eval and end == steps_total:
            before = check_answers(plan["from"], facts.eval, facts, d.device)
            after = check_answers(last, facts.eval, facts, d.device)
            summary = {"questions": len(facts.eval), "name": facts.name, "maker": facts.maker,
                       "before": before, "after": after, "checkpoint": str(last),
                       "definition": "share of FACTS' held-out questions whose greedy answer (no system prompt) "
                                     "states the name / the maker / both (whole words, any case)"}
            write_json(out / "selfknow.json", summary)
            table("held-out questions: answers stating the facts", [
                ("name", f"{before['name']:.0%} before, {after['name']:.0%} after"),
                ("maker", f"{before['maker']:.0%} before, {after['maker']:.0%} after"),
                ("both", f"{before['both']:.0%} before, {after['both']:.0%} after")])
    return last
