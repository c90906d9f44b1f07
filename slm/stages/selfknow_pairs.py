"""`slm selfknow generate`: self-knowledge pairs by RLCD, for StableLM 2's third post-training stage.

1. First messages. The base model continues a list of example first messages ("User: ...", a few drawn at random
   from FACTS' `messages`, else a built-in spread) and each sample, cut at its newline, is a candidate. Candidates
   are deduplicated (slm.train.dedup: exact after normalisation, then near-duplicate by MinHash LSH), and those
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

Training on the pairs is `slm selfknow train` (slm.stages.selfknow).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slm import energy
from slm.console import RateColumn, info, progress, table, warn
from slm.errors import AT_LEAST_0, MASS, POSITIVE, SlmError, UsageError, check_ranges
from slm.formats.chat import ChatTemplate
from slm.formats.checkpoint import Checkpoint
from slm.formats.facts import DEFAULT_MESSAGES, Facts, load_facts
from slm.formats.manifest import atomic_dir, check_replaceable, new_manifest, write_json
from slm.formats.records import write_jsonl
from slm.inference.chat import Sampling, answer_all, stop_ids, unsampled
from slm.inference.load import device_for, load_model
from slm.inference.sampling import generate_batch
from slm.train.dedup import Deduper, normalize

MESSAGES_HEADER = "Messages that people sent to an AI assistant:\n\n"


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
        self.answer.check()
        self.message.check("message-")
        check_ranges(self, n=AT_LEAST_0, shots=POSITIVE, near_duplicate=MASS, batch_size=POSITIVE,
                     max_attempts=POSITIVE, seed=AT_LEAST_0)


def _count(counts: dict, key: str, k: int = 1) -> None:
    counts[key] = counts.get(key, 0) + k


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
        raise UsageError("--base: missing (the base model that writes the first messages)")
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


def _pairs(messages, pos, neg, facts: Facts, max_new: int, counts: dict) -> tuple[list[dict], dict]:
    """The preference records (chosen: the answer with the facts, rejected: the one without), with the share of
    each side that states the name and the maker; pairs with an empty or identical answer are dropped."""
    records = []
    stated = {"chosen_name": 0, "chosen_maker": 0, "rejected_name": 0, "rejected_maker": 0}
    for (m, source), (p, p_end), (q, q_end) in zip(messages, pos, neg):
        if not p or not q:
            _count(counts, "dropped: empty answer")
            continue
        if p == q:
            _count(counts, "dropped: identical answers")
            continue
        _count(counts, f"answers cut at {max_new} tokens", int(not p_end) + int(not q_end))
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
    rates = {k: round(v / len(records), 4) for k, v in stated.items()}
    table("selfknow pairs", [(k, f"{v:,}") for k, v in counts.items()] + [
        (f"{k.replace('_', ' answers stating the ')}", f"{v:.0%}") for k, v in rates.items()])
    return records, rates


def run(cfg: GenerateConfig) -> Path:
    started = time.time()
    if cfg.out is None:
        raise UsageError("--out: missing (the output directory)")
    check_replaceable(cfg.out)
    if cfg.facts is None:
        raise UsageError("--facts: missing (a FACTS.yaml: name, maker, examples)")
    if cfg.chat is None:
        raise UsageError("--chat: missing (the chat model that answers)")
    facts = load_facts(cfg.facts)
    device = device_for(cfg.device)
    chat_ckpt = Checkpoint.open(cfg.chat)
    chat_tok = chat_ckpt.tokenizer()
    if chat_tok is None:
        raise SlmError(f"--chat {chat_ckpt.dir}: no tokenizer (tokenizer.json, or slm's encoding.json)")
    template = ChatTemplate.of_checkpoint(chat_ckpt.dir)
    base_ckpt = Checkpoint.open(cfg.base) if cfg.base is not None else None
    counts: dict = {}

    # 1. first messages
    if base_ckpt is not None:
        base_tok = base_ckpt.tokenizer()
        if base_tok is None:
            raise SlmError(f"--base {base_ckpt.dir}: no tokenizer (tokenizer.json, or slm's encoding.json)")
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
    stops = stop_ids(chat_tok, template)
    system = facts.system_prompt()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    pos = answer_all(chat_model, chat_tok, template,
                     [[{"role": "system", "content": system}, {"role": "user", "content": m}] for m, _ in messages],
                     cfg.answer, stops, cfg.batch_size, gen, "answers with the facts")
    neg = answer_all(chat_model, chat_tok, template, [[{"role": "user", "content": m}] for m, _ in messages],
                     cfg.answer, stops, cfg.batch_size, gen, "answers without")

    records, rates = _pairs(messages, pos, neg, facts, cfg.answer.max_new_tokens, counts)
    out = Path(cfg.out)
    settings = {"n": cfg.n, "shots": cfg.shots, "near_duplicate": cfg.near_duplicate,
                "seed_messages": cfg.seed_messages, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "answer_sampling": asdict(cfg.answer), "message_sampling": asdict(cfg.message),
                "system_prompt": system}
    inputs = [{"path": str(chat_ckpt.dir), "role": "chat", "sha256": chat_ckpt.weights_sha256()},
              {"path": str(Path(cfg.facts)), "role": "facts", "sha256": facts.sha256}]
    if base_ckpt is not None:
        inputs.insert(0, {"path": str(base_ckpt.dir), "role": "base", "sha256": base_ckpt.weights_sha256()})
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "pairs.jsonl", records)
        write_jsonl(tmp / "messages.jsonl", ({"text": m, "source": source} for m, source in messages))
        shutil.copyfile(cfg.facts, tmp / "facts.yaml")
        write_json(tmp / "manifest.json", new_manifest(
            "selfknow_pairs", settings, inputs=inputs, counts=counts, started=started, facts_sha256=facts.sha256,
            stated_rates=rates, chat_template=template.source, energy=energy.take()))
    info(f"selfknow: {len(records):,} pairs in {out / 'pairs.jsonl'} (chosen answers state the name in "
         f"{rates['chosen_name']:.0%}, rejected in {rates['rejected_name']:.0%})")
    warn_if_uninformative(rates)
    return out


MIN_RATE_GAP = 0.05  # chosen answers must state a fact this much more often than rejected ones to teach it


def warn_if_uninformative(rates: dict) -> None:
    """Pairs teach the facts only if chosen answers state them more often than rejected ones."""
    if any(rates[f"chosen_{k}"] - rates[f"rejected_{k}"] >= MIN_RATE_GAP for k in ("name", "maker")):
        return
    both = ", ".join(f"the {k} {rates[f'chosen_{k}']:.0%} vs {rates[f'rejected_{k}']:.0%}" for k in ("name", "maker"))
    warn(f"selfknow: chosen and rejected answers state the facts about as often ({both}): the chat model does not "
         "follow the system prompt that gives them, so training on these pairs teaches nothing. Fine-tune it on "
         "conversations under a system prompt first (`slm chat-data --facts FACTS.yaml`, then `slm sft`), or use "
         "a larger chat model; pairs.jsonl's chosen_states / rejected_states show which answers state what")
