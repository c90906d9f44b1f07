"""`slm tokenize build` (Arcade100k from cl100k_base) and `slm tokenize train` (a local byte-level BPE)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from slm import energy
from slm.console import RateColumn, progress, warn
from slm.errors import POSITIVE, SlmError, UsageError, check_ranges
from slm.formats.manifest import atomic_dir, check_replaceable, new_manifest, write_json
from slm.formats.records import expand_inputs, iter_documents
from slm.formats.tokenizer import (ARCADE_FIRST_SPECIAL_ID, CL100K_N_RANKS, CL100K_SHA256, RULES, bpe_str_to_bytes,
                                   byte_level, load_cl100k_ranks, make_spec, write_tokenizer)


@dataclass
class BuildConfig:
    out: Path
    """The tokenizer directory to write."""
    base: str = "cl100k_base"
    """The published ranks to start from (Arcade100k = cl100k_base's ranks with Arcade100k's rules)."""
    ranks: Path | None = None
    """A local .tiktoken or .tiktoken.gz file of the base ranks, checked against the published sha256."""


def build_arcade(cfg: BuildConfig) -> Path:
    """Arcade100k, the StableLM 2 tokenizer: cl100k_base's 100,256 ranks, digits split one by one, NFC, and 32
    special tokens at ids 100257-100288; n_vocab 100,289, padded to 100,352 for the model."""
    started = time.time()
    if cfg.base != "cl100k_base":
        raise UsageError(f"--base: only cl100k_base is supported (Arcade100k), got {cfg.base!r}")
    ranks, source = load_cl100k_ranks(cfg.ranks)
    if len(ranks) != CL100K_N_RANKS:
        raise SlmError(f"{source}: {len(ranks)} ranks, cl100k_base has {CL100K_N_RANKS}")
    spec = make_spec("arcade100k", RULES["arcade"], ranks, first_special_id=ARCADE_FIRST_SPECIAL_ID)
    with atomic_dir(cfg.out) as tmp:
        digest = write_tokenizer(tmp, ranks, spec)
        write_json(tmp / "manifest.json", new_manifest(
            "tokenizer", {"base": cfg.base, "ranks": str(cfg.ranks) if cfg.ranks else None, "out": str(cfg.out)},
            inputs=[{"path": source, "sha256": CL100K_SHA256}],
            counts={"n_vocab": spec.n_vocab, "ranks": len(ranks), "special_tokens": len(spec.special_tokens)},
            started=started, tokenizer_sha256=digest, name=spec.name, rules="arcade",
            padded_vocab_size=spec.padded_vocab_size, energy=energy.take()))
    return Path(cfg.out)


@dataclass
class TrainConfig:
    corpus: list[str]
    """Training text: files, directories or globs of any input `slm tokenize encode` reads."""
    vocab_size: int
    """Total vocabulary, special tokens included (SmolLM2: 49,152)."""
    out: Path
    """The tokenizer directory to write."""
    rules: str = "arcade"
    """Pre-tokenizer and special tokens: 'arcade' (StableLM 2) or 'smollm' (SmolLM2)."""
    text_key: str = "text"
    txt_mode: str = "file"
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    max_mb: float | None = None
    """Train on at most this many megabytes of text (the first ones, in input order)."""
    name: str = field(default="")

    def __post_init__(self):
        check_ranges(self, vocab_size=POSITIVE, min_frequency=POSITIVE, max_mb=POSITIVE)


def train_bpe(cfg: TrainConfig) -> Path:
    """Train a byte-level BPE with Hugging Face tokenizers' trainer (all 256 bytes in the initial alphabet) under the
    chosen rules; its vocabulary, in merge order, becomes tiktoken ranks, from which tokenizer.json is derived."""
    from tokenizers import models, pre_tokenizers, trainers, Tokenizer as HFTokenizer

    started = time.time()
    if cfg.rules not in RULES:
        raise UsageError(f"--rules: expected one of {', '.join(RULES)}, got {cfg.rules!r}")
    rules = RULES[cfg.rules]
    n_specials = len(rules.specials)
    if cfg.vocab_size < 256 + n_specials + 1:
        raise UsageError(f"--vocab-size: expected at least {256 + n_specials + 1} (256 bytes, {n_specials} special "
                       f"tokens and one merge), got {cfg.vocab_size}")
    inputs = expand_inputs(cfg.corpus)
    total = sum(i.size for i in inputs)
    limit = int(cfg.max_mb * 1e6) if cfg.max_mb else None

    tk = byte_level(HFTokenizer(models.BPE()), rules.pattern, nfc=True)
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size - n_specials, min_frequency=cfg.min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
                                  show_progress=False)
    fed = {"bytes": 0, "documents": 0}

    with progress(RateColumn("completed", "MB/s", 1e6)) as bar:
        task = bar.add_task("reading", total=limit or total)

        def texts():
            for text in iter_documents(inputs, cfg.text_key, cfg.txt_mode):
                n = len(text.encode("utf-8", errors="replace"))
                fed["bytes"] += n
                fed["documents"] += 1
                bar.advance(task, n)
                yield text
                if limit and fed["bytes"] >= limit:
                    return

        tk.train_from_iterator(texts(), trainer=trainer)
    if fed["documents"] == 0:
        raise SlmError("the training corpus holds no documents")
    vocab = tk.get_vocab()
    learned = sorted(vocab.items(), key=lambda kv: kv[1])
    if len(learned) < cfg.vocab_size - n_specials:
        warn(f"the corpus supports only {len(learned) + n_specials} tokens, fewer than --vocab-size "
             f"{cfg.vocab_size}: the tokenizer has {len(learned) + n_specials}")
    offset = n_specials if rules.specials_first else 0
    ranks = {bpe_str_to_bytes(s): i + offset for i, (s, _) in enumerate(learned)}
    spec = make_spec(cfg.name or f"slm-bpe-{cfg.rules}-{len(ranks) + n_specials}", rules, ranks)
    with atomic_dir(cfg.out) as tmp:
        digest = write_tokenizer(tmp, ranks, spec)
        write_json(tmp / "manifest.json", new_manifest(
            "tokenizer", {"corpus": [str(c) for c in cfg.corpus], "vocab_size": cfg.vocab_size, "rules": cfg.rules,
             "text_key": cfg.text_key, "txt_mode": cfg.txt_mode, "min_frequency": cfg.min_frequency,
             "max_mb": cfg.max_mb, "out": str(cfg.out)},
            inputs=[i.describe() for i in inputs],
            counts={"n_vocab": spec.n_vocab, "ranks": len(ranks), "special_tokens": len(spec.special_tokens),
                    "training_bytes": fed["bytes"], "training_documents": fed["documents"]},
            started=started, tokenizer_sha256=digest, name=spec.name, rules=cfg.rules,
            padded_vocab_size=spec.padded_vocab_size, energy=energy.take()))
    return Path(cfg.out)


def run(cfg: BuildConfig | TrainConfig) -> Path:
    """The tokenizer directory CFG describes: Arcade100k built from cl100k_base, or a BPE trained on text."""
    check_replaceable(cfg.out)
    return build_arcade(cfg) if isinstance(cfg, BuildConfig) else train_bpe(cfg)
