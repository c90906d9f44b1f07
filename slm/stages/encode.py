"""`slm tokenize encode`: documents -> Megatron .bin/.idx shards, in parallel, resumable, with a token count.

Work is cut into units (slm.formats.records): one per input, or per SHARD_MB of a large plain .jsonl / paragraph
.txt / parquet / dataset. Each unit becomes one shard. Units run in worker processes; each finished unit is
recorded in OUT.partial/units/, so a killed or failed run resumes where it stopped, and a re-run over an existing
OUT reuses the shards of inputs that did not change (same content hash, same settings). OUT itself appears only
when every unit is done, with its manifest, in one rename.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import queue as queue_mod
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slm import energy
from slm.console import Heartbeat, RateColumn, info, progress, warn
from slm.devices import usable_cores
from slm.errors import AT_LEAST_0, POSITIVE, SlmError, UsageError, check_ranges
from slm.formats.indexed import IndexedWriter
from slm.formats.manifest import (MANIFEST, canonical_json, check_replaceable, new_manifest, publish_dir, read_json,
                                  read_manifest, sha256_bytes, sha256_file, write_json)
from slm.formats.records import Input, Unit, UnitReader, expand_inputs, plan_units, spool_stdin
from slm.formats.tables import plural
from slm.formats.tokenizer import Tokenizer


@dataclass
class EncodeConfig:
    tokenizer: Path
    """Tokenizer directory (from `slm tokenize build` or `slm tokenize train`)."""
    inputs: list[str]
    """Files, directories and globs of .jsonl/.jsonl.gz/.jsonl.zst/.parquet/.txt or save_to_disk datasets."""
    out: Path
    """The tokens directory to write."""
    workers: int = 0
    """Worker processes; 0 = one per available CPU."""
    text_key: str = "text"
    """The JSON field / column holding each document's text."""
    eos: bool = True
    """Append the end-of-document token after each document."""
    skip_bad: bool = False
    """Skip (and count) bad records and empty inputs instead of stopping at the first."""
    txt_mode: str = "file"
    """.txt files: 'file' = one document per file, 'paragraph' = one per block separated by blank lines."""
    shard_mb: float = 256.0
    """Input megabytes per shard for inputs that can be cut (plain .jsonl, paragraph .txt, parquet, datasets)."""
    settings: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        check_ranges(self, workers=AT_LEAST_0, shard_mb=POSITIVE)


def _settings(cfg: EncodeConfig, tok: Tokenizer) -> dict:
    """What makes a shard what it is, besides its input: a change invalidates earlier shards."""
    return {"tokenizer_sha256": tok.hash, "text_key": cfg.text_key, "eos": cfg.eos, "skip_bad": cfg.skip_bad,
            "txt_mode": cfg.txt_mode, "shard_bytes": int(cfg.shard_mb * 1e6)}


def _unit_key(settings: dict, input_sha: str, unit: Unit) -> str:
    return sha256_bytes(canonical_json([settings, input_sha, unit.part, unit.start, unit.stop]))[:24]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60]


# --- The worker side ------------------------------------------------------------------------------------------------

_TOK: Tokenizer | None = None
_QUEUE = None


def _use_tokenizer(tok: Tokenizer) -> None:
    """Set the tokenizer units are encoded with (forked workers inherit it, BPE already built)."""
    global _TOK
    _TOK = tok
    tok.fast if tok.fast is not None else tok.hf  # noqa: B018


def _init_worker(tokenizer_dir: str, q) -> None:
    global _QUEUE
    if _TOK is None or str(_TOK.dir) != tokenizer_dir:  # not forked: load it here
        _use_tokenizer(Tokenizer(Path(tokenizer_dir)))
    _QUEUE = q


def _encode_unit(job: dict, report=None) -> dict:
    """Encode one unit into SHARD_DIR/NAME.{bin,idx}; returns its record. Runs in a worker (or in-process)."""
    tok = _TOK
    inp, unit = job["input"], job["unit"]
    reader = UnitReader(inp, unit, job["text_key"], job["txt_mode"], job["skip_bad"])
    writer = IndexedWriter(Path(job["shard_dir"]) / job["name"], tok.token_dtype)
    eos = np.array([tok.eos_id], dtype=np.uint32)
    texts: list[str] = []
    pending_chars = 0
    empty = 0
    last = [time.monotonic(), 0, 0]  # time, bytes and tokens already reported

    def send(final: bool = False) -> None:
        now = time.monotonic()
        if final or now - last[0] > 0.2:
            d_bytes, d_tokens = reader.bytes_done - last[1], writer.n_tokens - last[2]
            last[:] = [now, reader.bytes_done, writer.n_tokens]
            if report is not None:
                report(d_bytes, d_tokens)
            elif _QUEUE is not None:
                _QUEUE.put((d_bytes, d_tokens))

    def flush() -> None:
        nonlocal pending_chars
        arrays = tok.encode_many(texts)
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        if job["eos"]:
            arrays = [x for a in arrays for x in (a, eos)]
            lengths += 1
        writer.add_batch(np.concatenate(arrays) if arrays else np.zeros(0, np.uint32), lengths)
        texts.clear()
        pending_chars = 0
        send()

    try:
        for text in reader:
            if not text:
                empty += 1
                continue
            texts.append(text)
            pending_chars += len(text)
            if pending_chars > 1 << 22 or len(texts) >= 4096:
                flush()
        if texts:
            flush()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    send(final=True)
    return {
        "key": job["key"], "name": job["name"], "input_index": unit.input_index, "part": unit.part,
        "start": unit.start, "stop": unit.stop, "documents": writer.n_sequences, "tokens": writer.n_tokens,
        "bad_records": reader.bad, "empty_documents": empty, "input_bytes": unit.nbytes,
        "bin_bytes": writer.n_tokens * tok.token_dtype.itemsize, "bin_sha256": writer.bin_sha256,
        "idx_sha256": writer.idx_sha256,
    }


def _pool_task(job: dict) -> dict:
    return _encode_unit(job)


# --- The main process ---------------------------------------------------------------------------------------------

def _hash_one(inp: Input, advance) -> str:
    """sha256 of one input (of its .arrow files and state.json for a dataset); ADVANCE(bytes) as it goes."""
    if inp.kind == "dataset":
        files = sorted(p for p in inp.path.iterdir() if p.suffix == ".arrow" or p.name == "state.json")
        digest = sha256_bytes(canonical_json([[p.name, sha256_file(p)] for p in files]))
        advance(inp.size)
        return digest
    return sha256_file(inp.path, advance=advance)


def _hasher(conn, todo: list[tuple[int, Input]]) -> None:
    """The forked hashing process: ("bytes", n) per 4 MB read, ("hash", index, digest) per input, then ("end",)."""
    try:
        for i, inp in todo:
            conn.send(("hash", i, _hash_one(inp, lambda n: conn.send(("bytes", n)))))
        conn.send(("end",))
    except BaseException as e:  # noqa: BLE001 - handed to the main process, which raises it
        try:
            conn.send(("error", e))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            conn.send(("error", SlmError(f"hashing the inputs: {type(e).__name__}: {e}")))
    finally:
        conn.close()


def _hash_inputs(inputs: list[Input], previous: dict[str, dict], meanwhile=None) -> list[str]:
    """sha256 of every input; an input whose path, size and mtime match the previous run keeps its hash.

    Where some input must be hashed, MEANWHILE() (building the encoder) runs in this process while a forked one
    hashes: the build is single-threaded and holds the GIL, so a thread could not hash beside it, and a second
    core would otherwise idle through both (0.03 s of hashing beside a 0.12 s build for 30 MB and Arcade100k)."""
    hashes = [previous[str(i.path)]["sha256"] if _known(i, previous) else "" for i in inputs]
    todo = [(k, inp) for k, inp in enumerate(inputs) if not hashes[k]]
    if not todo:
        return hashes
    total = sum(inp.size for _, inp in todo)
    if meanwhile is None or "fork" not in mp.get_all_start_methods():
        with progress(RateColumn("completed", "MB/s", 1e6), transient=True) as bar:
            task = bar.add_task("hashing inputs", total=max(total, 1))
            for k, inp in todo:
                hashes[k] = _hash_one(inp, lambda n: bar.advance(task, n))
        return hashes
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_hasher, args=(send, todo), daemon=True)
    proc.start()
    send.close()
    try:
        meanwhile()
        with progress(RateColumn("completed", "MB/s", 1e6), transient=True) as bar:
            task = bar.add_task("hashing inputs", total=max(total, 1))
            while True:
                try:
                    message = receive.recv()
                except EOFError:
                    proc.join()
                    raise SlmError(f"hashing the inputs: the hashing process ended early (exit code "
                                   f"{proc.exitcode})") from None
                if message[0] == "bytes":
                    bar.advance(task, message[1])
                elif message[0] == "hash":
                    hashes[message[1]] = message[2]
                elif message[0] == "error":
                    raise message[1]
                else:
                    break
    finally:
        receive.close()
        if proc.is_alive():
            proc.join(timeout=1)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    return hashes


def _known(inp: Input, previous: dict[str, dict]) -> bool:
    old = previous.get(str(inp.path))
    return bool(old) and old.get("bytes") == inp.size and old.get("mtime_ns") == inp.mtime_ns and "sha256" in old


def _shard_ok(shard_dir: Path, record: dict) -> bool:
    b, i = shard_dir / f"{record['name']}.bin", shard_dir / f"{record['name']}.idx"
    return b.is_file() and i.is_file() and b.stat().st_size == record["bin_bytes"]


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run(cfg: EncodeConfig) -> Path:
    started = time.time()
    tok = Tokenizer(cfg.tokenizer)
    if cfg.txt_mode not in ("file", "paragraph"):
        raise UsageError(f"--txt-mode: expected 'file' or 'paragraph', got {cfg.txt_mode!r}")
    out = Path(cfg.out).absolute()
    specs, spool = list(cfg.inputs), None
    if "-" in specs:
        if specs.count("-") > 1:
            raise SlmError("-: standard input can be given once")
        out.parent.mkdir(parents=True, exist_ok=True)
        spool = spool_stdin(out.parent, f".{out.name}.stdin")
        specs[specs.index("-")] = str(spool)
    try:
        return _run(cfg, tok, specs, spool, out, started)
    finally:
        if spool is not None:
            spool.unlink(missing_ok=True)


def _run(cfg: EncodeConfig, tok, specs: list, spool: Path | None, out: Path, started: float) -> Path:
    inputs = expand_inputs(specs)
    for inp in inputs:
        if spool is not None and inp.path == spool:
            inp.shown = "-"
    check_replaceable(out)
    settings = _settings(cfg, tok)

    skipped_inputs = []
    for inp in inputs:
        if inp.size == 0 and inp.kind != "dataset":
            if not cfg.skip_bad:
                where = "-: standard input is empty" if inp.shown == "-" else f"{inp.path}: empty file"
                raise SlmError(f"{where} (expected at least one document; --skip-bad skips it)")
            skipped_inputs.append(inp)
    inputs = [i for i in inputs if i not in skipped_inputs]
    if not inputs:
        raise SlmError("every input is empty: nothing to encode")

    # What an earlier complete run left in OUT.
    previous_inputs: dict[str, dict] = {}
    previous_units: dict[str, dict] = {}
    if (out / MANIFEST).exists():
        try:
            old = read_manifest(out, "tokens")
            previous_inputs = {i["path"]: i for i in old.get("inputs", [])}
            previous_units = {u["key"]: u for u in old.get("units", []) if "key" in u}
        except SlmError:
            pass

    partial = out.with_name(out.name + ".partial")
    (partial / "shards").mkdir(parents=True, exist_ok=True)
    (partial / "units").mkdir(exist_ok=True)
    lock = open(partial / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SlmError(f"{partial}: another `slm tokenize encode` is writing {out}") from None
    try:
        return _run_locked(cfg, tok, inputs, skipped_inputs, out, partial, settings, previous_inputs,
                           previous_units, started)
    finally:
        lock.close()


def _run_locked(cfg, tok, inputs, skipped_inputs, out, partial, settings, previous_inputs, previous_units, started):
    shard_dir = partial / "shards"
    for leftover in shard_dir.glob("*.tmp"):  # a killed worker's unfinished shard
        leftover.unlink()
    hashes = _hash_inputs(inputs, previous_inputs, meanwhile=lambda: _use_tokenizer(tok))
    units = plan_units(inputs, int(cfg.shard_mb * 1e6), cfg.txt_mode)
    jobs, records = _jobs(cfg, inputs, units, hashes, settings, out, partial, previous_units)
    reused = len(records)
    if reused:
        info(f"reusing {reused} of {plural(len(units), 'shard')} whose input and settings did not change")
    if jobs:
        if tok.backend == "hf":  # a released tokenizer.json: say which encoder gives its ids, and why
            info(f"{tok.dir / 'tokenizer.json'}: encoded by {tok.encoder}"
                 + (", its ids proven equal to tokenizers'" if tok.fast is not None else ""))
        _encode(cfg, tok, jobs, partial, records)
    unit_records = [records[_unit_key(settings, hashes[u.input_index], u)] for u in units]
    manifest = _manifest(cfg, tok, inputs, skipped_inputs, hashes, units, unit_records, out, started)
    manifest["counts"]["reused_shards"] = reused
    keep = {f"{r['name']}{ext}" for r in unit_records for ext in (".bin", ".idx")}
    for f in shard_dir.iterdir():
        if f.name not in keep:
            f.unlink()
    shutil.rmtree(partial / "units")
    (partial / ".lock").unlink(missing_ok=True)
    write_json(partial / MANIFEST, manifest)
    publish_dir(partial, out)
    if manifest["counts"]["bad_records"]:
        warn(f"skipped {plural(manifest['counts']['bad_records'], 'bad record')} (counted in manifest.json)")
    return Path(cfg.out)


def _jobs(cfg, inputs, units, hashes, settings, out, partial, previous_units) -> tuple[list[dict], dict]:
    """(the units still to encode, the records of those already done): by an interrupted run of this one (kept in
    OUT.partial/units/), or by the last complete run for an input and settings that did not change."""
    shard_dir = partial / "shards"
    jobs, records = [], {}
    width = len(str(max(len(inputs) - 1, 1)))
    for unit in units:
        inp = inputs[unit.input_index]
        key = _unit_key(settings, hashes[unit.input_index], unit)
        name = f"{unit.input_index:0{width}d}-{_safe(inp.path.name)}-{unit.part:05d}"
        rec_path = partial / "units" / f"{key}.json"
        if rec_path.exists():  # finished by an earlier, interrupted run
            rec = read_json(rec_path)
            if rec.get("name") != name and _shard_ok(shard_dir, rec):
                for ext in (".bin", ".idx"):
                    os.replace(shard_dir / f"{rec['name']}{ext}", shard_dir / f"{name}{ext}")
                rec["name"] = name
                write_json(rec_path, rec)
            if _shard_ok(shard_dir, rec):
                records[key] = rec
                continue
        if key in previous_units and _shard_ok(out / "shards", previous_units[key]):  # unchanged since the last run
            rec = dict(previous_units[key], name=name, input_index=unit.input_index)
            for ext in (".bin", ".idx"):
                _link(out / "shards" / f"{previous_units[key]['name']}{ext}", shard_dir / f"{name}{ext}")
            write_json(rec_path, rec)
            records[key] = rec
            continue
        jobs.append({"key": key, "name": name, "input": inp, "unit": unit, "shard_dir": str(shard_dir),
                     "text_key": cfg.text_key, "txt_mode": cfg.txt_mode, "skip_bad": cfg.skip_bad, "eos": cfg.eos})
    return jobs, records


def _encode(cfg, tok, jobs: list[dict], partial: Path, records: dict) -> None:
    """Encode JOBS on the workers, with a progress bar; each finished unit's record is kept as it ends."""
    workers = max(1, min(cfg.workers or usable_cores(), len(jobs)))
    total = sum(j["unit"].nbytes for j in jobs)
    with progress(RateColumn("completed", "MB/s", 1e6), RateColumn("tokens", "Mtok/s", 1e6)) as bar:
        task = bar.add_task("encoding", total=max(total, 1), tokens=0)
        heartbeat, t0 = Heartbeat(), time.monotonic()

        def report(d_bytes: int, d_tokens: int) -> None:
            bar.update(task, advance=d_bytes, tokens=bar.tasks[0].fields["tokens"] + d_tokens)
            done_bytes, elapsed = bar.tasks[0].completed, max(time.monotonic() - t0, 1e-9)
            heartbeat(f"encoding: {done_bytes / 1e6:,.0f} of {total / 1e6:,.0f} MB, {done_bytes / 1e6 / elapsed:.1f} "
                      f"MB/s, {bar.tasks[0].fields['tokens'] / elapsed / 1e6:.2f} Mtok/s, ETA "
                      f"{(total - done_bytes) / max(done_bytes / elapsed, 1e-9) / 60:.1f} min")

        def done(rec: dict) -> None:
            write_json(partial / "units" / f"{rec['key']}.json", rec)
            records[rec["key"]] = rec

        if workers == 1:
            _use_tokenizer(tok)
            for job in jobs:
                done(_encode_unit(job, report))
        else:
            _run_pool(jobs, workers, tok, report, done)


def _manifest(cfg, tok, inputs, skipped_inputs, hashes, units, unit_records, out, started) -> dict:
    """The tokens directory's manifest: its shards in unit order, each input's counts and hash, the totals."""
    shards, per_input = [], [dict(inp.describe(), sha256=h, mtime_ns=inp.mtime_ns, documents=0, tokens=0,
                                  bad_records=0, empty_documents=0, shards=[]) for inp, h in zip(inputs, hashes)]
    for unit, rec in zip(units, unit_records):
        shards.append({k: rec[k] for k in ("name", "tokens", "documents", "bin_sha256", "idx_sha256")})
        pi = per_input[unit.input_index]
        for k in ("documents", "tokens", "bad_records", "empty_documents"):
            pi[k] += rec[k]
        pi["shards"].append(rec["name"])
    for pi in per_input:
        if pi["documents"] == 0 and not cfg.skip_bad:
            raise SlmError(f"{pi['path']}: no documents (expected at least one; --skip-bad skips it)")
    for inp in skipped_inputs:
        per_input.append(dict(inp.describe(), sha256=sha256_file(inp.path), mtime_ns=inp.mtime_ns, documents=0,
                              tokens=0, bad_records=0, empty_documents=0, shards=[], skipped="empty file"))
    counts = {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
              "shards": len(shards), "inputs": len(per_input), "bytes_read": sum(i.size for i in inputs),
              "bad_records": sum(p["bad_records"] for p in per_input),
              "empty_documents": sum(p["empty_documents"] for p in per_input),
              "skipped_inputs": len(skipped_inputs), "reused_shards": 0}
    config = {k: v for k, v in asdict(cfg).items() if k not in ("settings",)}
    config.update(tokenizer=str(tok.dir), inputs=[str(i) for i in cfg.inputs], out=str(out))
    return new_manifest(
        "tokens", config, inputs=per_input, counts=counts, started=started,
        tokenizer={"path": str(Path(tok.dir).absolute()), "tokenizer_sha256": tok.hash, "name": tok.spec.name,
                   "n_vocab": tok.n_vocab, "eos_id": tok.eos_id, "bos_id": tok.bos_id},
        dtype=tok.token_dtype.name, eos_appended=cfg.eos, shards=shards, units=unit_records, energy=energy.take())


def summary(out: Path) -> dict:
    """What `slm tokenize encode --json` prints: the counts of a tokens directory, its wall time and read speed."""
    m = read_manifest(Path(out), "tokens")
    counts, wall = m["counts"], m["wall_seconds"]
    return {"path": str(Path(out).absolute()), **counts, "wall_seconds": wall,
            "mb_per_second": round(counts["bytes_read"] / 1e6 / max(wall, 1e-9), 2)}


def _run_pool(jobs, workers, tok, report, done) -> None:
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    _use_tokenizer(tok)
    q = ctx.Queue()
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok.dir), q))
    failure: list[BaseException] = []
    finished = queue_mod.SimpleQueue()  # one entry per unit that ended

    def ok(rec: dict) -> None:
        done(rec)
        finished.put(True)
        q.put(None)  # wakes the loop below at once (it would otherwise wait out its poll)

    def failed(e: BaseException) -> None:
        failure.append(e)
        finished.put(False)
        q.put(None)

    try:
        # Largest units first: the last unit to finish is a small one.
        for job in sorted(jobs, key=lambda j: -j["unit"].nbytes):
            pool.apply_async(_pool_task, (job,), callback=ok, error_callback=failed)
        remaining = len(jobs)
        while remaining and not failure:
            try:
                while (message := q.get(timeout=0.1)) is not None:  # progress, until a unit ends
                    report(*message)
            except queue_mod.Empty:
                pass
            while not finished.empty():
                finished.get()
                remaining -= 1
        if failure:
            raise failure[0]
        try:
            while True:
                if (message := q.get_nowait()) is not None:
                    report(*message)
        except queue_mod.Empty:
            pass
        pool.close()
    finally:
        pool.terminate()
        pool.join()
