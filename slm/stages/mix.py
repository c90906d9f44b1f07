"""`slm mix`: a mixture YAML (or a recipe's) -> a plan of what each phase draws from each source, and the ledger.

The YAML:

    seq_len: 2048            # tokens per training sample (each sample is a window of seq_len + 1 tokens)
    seed: 1234               # the data order is a pure function of (plan, seed, sample number)
    block_size: 4096         # optional: samples per interleaving block (raised when a weight is tiny)
    sources:                 # name: tokens directory (relative paths are relative to the YAML file)
      web: ../tokens/web
      code: {path: ../tokens/code, dataset: bigcode/starcoderdata}   # dataset: where it came from (recorded)
      web_long:              # a filtered view: only windows inside documents of 8192+ tokens
        source: web          # the tokens directory of another source (or path: ...)
        min_doc_tokens: 8192
    phases:                  # one or more, in order
      - name: stable
        tokens: 6T           # budget: 6T / 500B / 20M / 1.5k / an integer
        weights: {web: 0.9, code: 0.1}   # positive; normalised to sum to 1 (ratios such as {web: 9, code: 1}
                                         # are fine; shares below 1 that do not add up to 1 get a warning)

Everything is checked before anything is written: sources exist and share one tokenizer, weights are positive,
every phase can be served. A source repeated more than 4 epochs gets a warning (SmolLM2's rule of thumb).

`min_doc_tokens` is the document-length filter of SmolLM2's long-context step (40% of its 8k-context mix came from
documents of 8k+ tokens): the source then yields only the windows that lie whole inside one document at least that
long, laid from each such document's first token ((length - 1) // seq_len windows per document). Their offsets are
computed once from the shards' indexes and written to the mix directory (windows/NAME.npy, hashed in plan.json).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from rich.table import Table

from slm import energy
from slm.console import err, warn
from slm.errors import AT_LEAST_0, POSITIVE, SlmError, UsageError, check_ranges
from slm.formats.manifest import atomic_dir, check_replaceable, new_manifest, write_json
from slm.formats.mixplan import MixPlan
from slm.formats.tables import human
from slm.formats.tokens import TokensDir
from slm.recipes import find_recipe, load_recipe, load_step, parse_budget

EPOCH_WARNING = 4  # SmolLM2: most sources kept within 4-5 epochs
DEFAULT_BLOCK = 4096
TOP_KEYS = {"seq_len", "seed", "block_size", "sources", "phases", "name", "description"}
PHASE_KEYS = {"name", "tokens", "weights"}
SOURCE_KEYS = {"path", "source", "min_doc_tokens", "dataset"}
@dataclass
class MixConfig:
    mix: str
    """A mixture YAML file, the name of a recipe whose `mix:` section to use, or RECIPE:STEP for a step's mix."""
    out: Path | None = None
    """The mix directory to write (not needed with --dry-run)."""
    sources: dict[str, str] = field(default_factory=dict)
    """NAME=PATH bindings that set or override source paths."""
    source_root: Path | None = None
    """Bind every source without a path to SOURCE_ROOT/NAME."""
    seq_len: int | None = None
    seed: int | None = None

    def __post_init__(self):
        check_ranges(self, seq_len=POSITIVE, seed=AT_LEAST_0)


def _load(cfg: MixConfig) -> tuple[dict, str, Path]:
    """(mixture dict, where it came from for messages, directory relative paths start from)."""
    path = Path(cfg.mix)
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise SlmError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        except UnicodeDecodeError:
            raise SlmError(f"{path}: not UTF-8 text") from None
        return data, str(path), path.parent.absolute()
    if ":" in cfg.mix and find_recipe(cfg.mix.partition(":")[0]) is not None:
        step = load_step(cfg.mix, "mix")
        if "mix" not in step:
            raise SlmError(f"recipe step {cfg.mix!r} has no mix: section")
        return step["mix"], f"recipe {cfg.mix} (mix)", Path.cwd()
    if find_recipe(cfg.mix) is not None:
        recipe = load_recipe(cfg.mix)
        if "mix" not in recipe:
            raise SlmError(f"recipe {cfg.mix!r} has no mix: section")
        return recipe["mix"], f"recipe {cfg.mix} (mix)", Path.cwd()
    raise SlmError(f"{cfg.mix}: no such file, and not a recipe name")


def resolve(cfg: MixConfig) -> tuple[dict, list[TokensDir], list[np.ndarray | None]]:
    """Validate the mixture and compute the plan. Reads source manifests only; writes nothing."""
    data, where, base = _load(cfg)
    if not isinstance(data, dict):
        raise SlmError(f"{where}: expected a mapping with seq_len, seed, sources and phases")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise SlmError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected {', '.join(sorted(TOP_KEYS))})")

    def integer(key: str, override, minimum: int, default=None) -> int:
        value = override if override is not None else data.get(key, default)
        if value is None:
            raise SlmError(f"{where}: {key}: missing (expected an integer >= {minimum})")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SlmError(f"{where}: {key}: expected an integer >= {minimum}, got {value!r}")
        return value

    seq_len = integer("seq_len", cfg.seq_len, 1)
    seed = integer("seed", cfg.seed, 0, 1234)
    block_size = integer("block_size", None, 1, DEFAULT_BLOCK)
    src = _sources(data.get("sources"), where, base, cfg)
    phases = _phases(data.get("phases"), where, src.paths)
    used = [n for n in src.paths if any(n in p["weights"] for p in phases)]
    for n in src.paths:
        if n not in used and n not in src.same_as.values():
            warn(f"source {n!r} has weight in no phase and is left out")
    dirs = _open(src, used, seq_len, where)
    sources, windows = [], []
    for n, d in zip(used, dirs):
        entry = {"name": n, "path": str(d.dir), "manifest_sha256": d.manifest_sha256(), "tokens": d.n_tokens,
                 "documents": d.n_documents, "sequences": (d.n_tokens - 1) // seq_len}
        dataset = src.datasets.get(n) or src.datasets.get(src.same_as.get(n, ""))
        if dataset:
            entry["dataset"] = dataset
        table = None
        if n in src.min_doc:
            table, kept_docs, kept_tokens = long_windows(d, seq_len, src.min_doc[n])
            if table.size == 0:
                raise SlmError(f"source {n!r} ({d.dir}): no document has {max(src.min_doc[n], seq_len + 1)}+ tokens, "
                               f"so min_doc_tokens {src.min_doc[n]} leaves no window of seq_len + 1 = {seq_len + 1}")
            entry.update(tokens=kept_tokens, documents=kept_docs, sequences=int(table.size),
                         min_doc_tokens=src.min_doc[n], tokens_all=d.n_tokens, documents_all=d.n_documents,
                         windows=f"windows/{n}.npy", windows_sha256=windows_sha256(table))
        sources.append(entry)
        windows.append(table)
    plan_phases = _apportion_phases(phases, used, seq_len, block_size, where)
    plan = {"format_version": 1, "seq_len": seq_len, "seed": seed, "tokenizer_sha256": dirs[0].tokenizer_sha256,
            "n_vocab": dirs[0].n_vocab, "sources": sources, "phases": plan_phases,
            "total_samples": sum(p["samples"] for p in plan_phases),
            "total_tokens": sum(p["tokens"] for p in plan_phases)}
    plan["ledger"] = ledger(plan)
    MixPlan(plan, windows)  # constructs cleanly
    return plan, dirs, windows


@dataclass
class _Sources:
    paths: dict[str, Path | None]
    same_as: dict[str, str]  # source -> the source whose tokens directory it reads
    min_doc: dict[str, int]
    datasets: dict[str, str]  # documentation: the public dataset a source was encoded from


def _sources(raw: object, where: str, base: Path, cfg: MixConfig) -> _Sources:
    """The sources: each one's tokens directory (its path in the mixture, --source, --source-root, or another
    source's), its min_doc_tokens filter and its dataset name."""
    if not isinstance(raw, dict) or not raw:
        raise SlmError(f"{where}: sources: expected a mapping of name: tokens directory")
    src = _Sources({}, {}, {}, {})
    for name, value in raw.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise SlmError(f"{where}: sources: {name!r} is not a valid source name (letters, digits, _ . + -)")
        if isinstance(value, dict):
            value = _source_entry(name, value, raw, where, src)
        if value is not None and not isinstance(value, str):
            raise SlmError(f"{where}: sources.{name}: expected a path, got {value!r}")
        src.paths[name] = (base / value) if value else None
    for name, value in cfg.sources.items():
        if name not in src.paths:
            raise SlmError(f"--source {name}=...: the mixture has no source {name!r} (it has {', '.join(src.paths)})")
        src.paths[name] = Path(value).absolute()
    if cfg.source_root:
        for name in src.paths:
            if src.paths[name] is None and name not in src.same_as:
                src.paths[name] = Path(cfg.source_root).absolute() / name
    for name, other in src.same_as.items():
        if name not in cfg.sources:  # bound on the command line: that wins
            src.paths[name] = src.paths[other]
    return src


def _source_entry(name: str, value: dict, raw: dict, where: str, src: _Sources) -> str | None:
    """A source given as a mapping (path or source, min_doc_tokens, dataset) into SRC; returns its path."""
    bad = set(value) - SOURCE_KEYS
    if bad:
        raise SlmError(f"{where}: sources.{name}: unknown key {sorted(bad, key=str)[0]!r} "
                       f"(expected {', '.join(sorted(SOURCE_KEYS))})")
    if value.get("dataset") is not None:
        if not isinstance(value["dataset"], str):
            raise SlmError(f"{where}: sources.{name}.dataset: expected text (where the data comes from, "
                           f"e.g. HuggingFaceFW/fineweb-edu), got {value['dataset']!r}")
        src.datasets[name] = value["dataset"]
    if "min_doc_tokens" in value:
        m = value["min_doc_tokens"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise SlmError(f"{where}: sources.{name}.min_doc_tokens: expected a positive integer, got {m!r}")
        src.min_doc[name] = m
    if value.get("source") is not None:
        other = value["source"]
        if value.get("path") is not None:
            raise SlmError(f"{where}: sources.{name}: give path or source, not both")
        if not isinstance(other, str) or other not in raw or other == name:
            raise SlmError(f"{where}: sources.{name}.source: expected the name of another source "
                           f"({', '.join(n for n in raw if n != name)}), got {other!r}")
        if isinstance(raw[other], dict) and raw[other].get("source") is not None:
            raise SlmError(f"{where}: sources.{name}.source: {other!r} itself names a source; "
                           "name the one with the path")
        src.same_as[name] = other
    return value.get("path")


def _phases(raw: object, where: str, paths: dict) -> list[dict]:
    """The phases: name, token budget and the weights of sources that exist."""
    if not isinstance(raw, list) or not raw:
        raise SlmError(f"{where}: phases: expected a list of phases with tokens and weights")
    phases = []
    for i, ph in enumerate(raw):
        at = f"{where}: phases[{i}]"
        if not isinstance(ph, dict):
            raise SlmError(f"{at}: expected a mapping with name, tokens and weights")
        bad = set(ph) - PHASE_KEYS
        if bad:
            raise SlmError(f"{at}: unknown key {sorted(bad)[0]!r} (expected name, tokens, weights)")
        if "tokens" not in ph:
            raise SlmError(f"{at}.tokens: missing (expected a budget like 6T, 500B or 20M)")
        tokens = parse_budget(ph["tokens"], f"{at}.tokens")
        weights = ph.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise SlmError(f"{at}.weights: expected a mapping of source: positive weight")
        for src, w in weights.items():
            if src not in paths:
                raise SlmError(f"{at}.weights.{src}: no such source (sources: {', '.join(paths)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or not math.isfinite(w):
                raise SlmError(f"{at}.weights.{src}: expected a positive number, got {w!r}")
        total = sum(weights.values())
        if all(w < 1 for w in weights.values()) and not math.isclose(total, 1.0, abs_tol=1e-6):
            # written as shares that do not add up (a likely slip); ratios such as {web: 3, code: 1} are meant
            shares = ", ".join(f"{src} {w / total:.4g}" for src, w in weights.items())
            warn(f"{at}.weights add up to {total:g}, not 1: normalised to {shares}")
        phases.append({"name": str(ph.get("name", f"phase{i}")), "tokens": tokens, "weights": dict(weights)})
    if len({p["name"] for p in phases}) != len(phases):
        raise SlmError(f"{where}: phases: names must be unique")
    return phases


def _open(src: _Sources, used: list[str], seq_len: int, where: str) -> list[TokensDir]:
    """The tokens directory of each used source, opened and checked (one tokenizer, whole shards, a sample each)."""
    missing = [n for n in used if src.paths[n] is None]
    if missing:
        n = src.same_as.get(missing[0], missing[0])
        raise SlmError(f"{where}: source {n!r} has no path: bind it with --source {n}=TOKENS_DIR or --source-root DIR")
    opened: dict[Path, TokensDir] = {}
    for n in used:  # a directory two sources read is opened (and its shards checked) once
        if src.paths[n] not in opened:
            opened[src.paths[n]] = TokensDir(src.paths[n])
    dirs = [opened[src.paths[n]] for n in used]
    first = dirs[0]
    for name, d in zip(used, dirs):
        if d.tokenizer_sha256 != first.tokenizer_sha256:
            raise SlmError(f"sources disagree on the tokenizer: {used[0]!r} ({first.dir}) was encoded with "
                           f"{first.tokenizer_sha256[:12]}, {name!r} ({d.dir}) with {d.tokenizer_sha256[:12]}")
        try:
            d.shards  # opens every shard: each .bin must have the size its .idx and the manifest give
        except SlmError as e:
            raise SlmError(f"source {name!r}: {e} (truncated or damaged: encode it again)") from None
        if name not in src.min_doc and (d.n_tokens - 1) // seq_len < 1:
            raise SlmError(f"source {name!r} ({d.dir}): {d.n_tokens} tokens, fewer than one sample of "
                           f"seq_len + 1 = {seq_len + 1}")
    return dirs


def _apportion_phases(phases: list[dict], used: list[str], seq_len: int, block_size: int, where: str) -> list[dict]:
    """Each phase in samples: how many from each source (weights normalised), its block size, what came before."""
    out, drawn = [], {n: 0 for n in used}
    for i, ph in enumerate(phases):
        samples = ph["tokens"] // seq_len
        if samples < 1:
            raise SlmError(f"{where}: phases[{i}].tokens: {ph['tokens']} is less than one sample of {seq_len} tokens")
        total_w = sum(ph["weights"].values())
        weights = {n: ph["weights"][n] / total_w for n in used if n in ph["weights"]}
        per = _apportion(samples, [weights.get(n, 0.0) for n in used])
        per_source = {n: c for n, c in zip(used, per) if n in weights}
        for n, c in per_source.items():
            if c == 0:
                warn(f"phase {ph['name']!r}: the weight of {n!r} is too small to draw a single sample")
        positive = [c for c in per_source.values() if c > 0]
        block = max(block_size, -(-samples // min(positive)))
        out.append({"name": ph["name"], "tokens": samples * seq_len, "tokens_requested": ph["tokens"],
                    "samples": samples, "block_size": block, "weights": weights,
                    "samples_per_source": per_source, "drawn_before": dict(drawn)})
        for n, c in per_source.items():
            drawn[n] += c
    return out


def long_windows(d: TokensDir, seq_len: int, min_doc_tokens: int) -> tuple[np.ndarray, int, int]:
    """Offsets of the windows of seq_len + 1 tokens inside documents of min_doc_tokens+ tokens, each document's
    laid from its first token; and how many documents and tokens those documents hold."""
    starts, lengths = d.document_bounds()
    keep = lengths >= min_doc_tokens
    starts, lengths = starts[keep], lengths[keep]
    per_doc = np.maximum(lengths - 1, 0) // seq_len
    total = int(per_doc.sum())
    first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)  # index of each document's first window
    table = np.repeat(starts, per_doc) + (np.arange(total, dtype=np.int64) - first) * seq_len
    return table.astype(np.int64), int(keep.sum()), int(lengths.sum())


def windows_sha256(table: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(table, dtype="<i8").tobytes()).hexdigest()


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder rounding of total * weights: non-negative integers summing to total."""
    raw = [total * w for w in weights]
    base = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:total - sum(base)]:
        base[i] += 1
    return base


def ledger(plan: dict) -> list[dict]:
    """Per phase and source: weight, tokens drawn, tokens available, epochs (cumulative through the phase)."""
    rows = []
    seq_len = plan["seq_len"]
    by_name = {s["name"]: s for s in plan["sources"]}
    for ph in plan["phases"]:
        for name, n in ph["samples_per_source"].items():
            src = by_name[name]
            through = ph["drawn_before"][name] + n
            rows.append({"phase": ph["name"], "source": name, "weight": round(ph["weights"][name], 6),
                         "tokens_drawn": n * seq_len, "tokens_available": src["tokens"],
                         "epochs_in_phase": n / src["sequences"], "epochs": through / src["sequences"]})
    return rows


def print_ledger(plan: dict) -> None:
    table = Table(title="the token ledger", title_style="bold", show_lines=False)
    for col in ("phase", "source", "weight", "tokens drawn", "available", "epochs (phase)", "epochs (total)"):
        table.add_column(col, justify="left" if col in ("phase", "source") else "right")
    for r in plan["ledger"]:
        style = "yellow" if r["epochs"] > EPOCH_WARNING else None
        table.add_row(r["phase"], r["source"], f"{r['weight']:.4f}", human(r["tokens_drawn"]),
                      human(r["tokens_available"]), f"{r['epochs_in_phase']:.2f}", f"{r['epochs']:.2f}", style=style)
    table.add_section()
    table.add_row("total", f"{len(plan['sources'])} sources", "", human(plan["total_tokens"]),
                  human(sum(s["tokens"] for s in plan["sources"])), "", "")
    err.print(table)
    for s in plan["sources"]:
        total = max((r["epochs"] for r in plan["ledger"] if r["source"] == s["name"]), default=0)
        if total > EPOCH_WARNING:
            warn(f"source {s['name']!r} is repeated {total:.1f} epochs, more than {EPOCH_WARNING} "
                 "(SmolLM2 kept most sources within 4-5 epochs)")


def dry_run(cfg: MixConfig) -> dict:
    """--dry-run: the plan, its ledger on stderr; nothing written."""
    plan, _, _ = resolve(cfg)
    print_ledger(plan)
    return plan


def run(cfg: MixConfig) -> Path:
    started = time.time()
    if cfg.out is None:
        raise UsageError("--out: missing (or use --dry-run)")
    check_replaceable(cfg.out)
    plan, dirs, windows = resolve(cfg)
    print_ledger(plan)
    with atomic_dir(cfg.out) as tmp:
        for s, table in zip(plan["sources"], windows):
            if table is not None:
                (tmp / "windows").mkdir(exist_ok=True)
                np.save(tmp / s["windows"], table.astype("<i8"), allow_pickle=False)
        write_json(tmp / "plan.json", plan)
        (tmp / "ledger.md").write_text(ledger_markdown(plan), encoding="utf-8")
        write_json(tmp / "manifest.json", new_manifest(
            "mix", {"mix": cfg.mix, "sources": cfg.sources, "source_root": str(cfg.source_root or ""),
                    "seq_len": plan["seq_len"], "seed": plan["seed"], "out": str(cfg.out)},
            inputs=[{"path": s["path"], "sha256": s["manifest_sha256"], "name": s["name"]} for s in plan["sources"]],
            counts={"samples": plan["total_samples"], "tokens": plan["total_tokens"], "phases": len(plan["phases"]),
                    "sources": len(plan["sources"])},
            started=started, tokenizer_sha256=plan["tokenizer_sha256"], energy=energy.take()))
    return Path(cfg.out)


def ledger_markdown(plan: dict) -> str:
    lines = [f"# Token ledger (seq_len {plan['seq_len']}, seed {plan['seed']})", "",
             "| phase | source | weight | tokens drawn | tokens available | epochs (phase) | epochs (total) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in plan["ledger"]:
        lines.append(f"| {r['phase']} | {r['source']} | {r['weight']:.4f} | {r['tokens_drawn']:,} | "
                     f"{r['tokens_available']:,} | {r['epochs_in_phase']:.3f} | {r['epochs']:.3f} |")
    lines.append(f"| total | | | {plan['total_tokens']:,} | {sum(s['tokens'] for s in plan['sources']):,} | | |")
    return "\n".join(lines) + "\n"
