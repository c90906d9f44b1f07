"""manifest.json: every output directory describes itself, and is written atomically.

Schema (all kinds):
    kind            tokenizer | corpus | tokens | mix | checkpoint | ...
    format_version  integer, per kind; readers refuse versions they do not know
    slm_version     the version that wrote it
    created_utc     ISO 8601 time
    command         the exact command line (argv)
    config          the resolved configuration of the stage
    inputs          [{path, sha256, ...}] every input read
    counts          numbers of things written (tokens, documents, ...)
    wall_seconds    how long the stage ran
    energy_kwh      measured energy when known, else null
plus kind-specific keys documented where each kind is written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from slm import __version__
from slm.errors import SlmError

MANIFEST = "manifest.json"

# The format version each kind is written with; readers accept only these.
# checkpoint 2: the manifest lists every file with its size and sha256; train_state/optimizer.safetensors
# holds AdamW's moments by parameter name (1: train_state/optimizer.pt, torch's state_dict by index).
FORMAT_VERSIONS = {"tokenizer": 1, "corpus": 1, "tokens": 1, "mix": 1, "checkpoint": 2, "chatdata": 1,
                   "reference_logprobs": 1, "selfknow_pairs": 1, "quantize": 1, "bench": 1, "eval": 1, "carbon": 1,
                   "run": 1}


def sha256_file(path: Path, chunk: int = 1 << 22, advance=None) -> str:
    """sha256 of a file, read CHUNK bytes at a time; ADVANCE(bytes), if given, after each chunk (progress)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if advance is not None:
                advance(len(block))
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_text(path: Path, text: str) -> None:
    """Write TEXT to a temp file beside PATH, fsync, rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (write_text)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path, what: str = "file") -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SlmError(f"{path}: no such {what}") from None
    except json.JSONDecodeError as e:
        raise SlmError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise SlmError(f"{path}: not UTF-8 text (expected JSON)") from None


def manifest_of(directory: Path) -> dict | None:
    """DIRECTORY's manifest.json (any kind) when it has one, else None; one line when it cannot be read."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    m = read_json(path, "manifest")
    if not isinstance(m, dict) or "kind" not in m:
        raise SlmError(f"{path}: not an slm manifest (no 'kind')")
    return m


TREE_HASH_LIMIT = 1 << 30  # a directory slm did not write is hashed file by file up to this many bytes


def content_sha256(path: Path) -> str | None:
    """The sha256 that identifies PATH as an input: a file's content; a directory slm wrote: its manifest.json's
    (which lists the sha256 of every file in it); a transformers model directory: its weights'; another directory:
    its files' paths and contents, up to TREE_HASH_LIMIT bytes (None beyond, or for what does not exist)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    for name in (MANIFEST, "model.safetensors"):
        if (path / name).is_file():
            return sha256_file(path / name)
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded weights: the index and its shards, whatever their size
        shards = sorted({path / s for s in (read_json(index).get("weight_map") or {}).values()})
        return tree_sha256(path, [index, *shards])
    files, size = [], 0
    for p in path.rglob("*"):
        if p.is_file():
            files.append(p)
            size += p.stat().st_size
            if size > TREE_HASH_LIMIT:
                return None
    return tree_sha256(path, files)


def tree_sha256(root: Path, files: list[Path]) -> str:
    """The sha256 of FILES under ROOT: of each one's path relative to ROOT and its content's sha256, in order of
    path (a directory's identity when slm did not write it)."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: Path(p).relative_to(root).as_posix()):
        h.update(f"{Path(p).relative_to(root).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def input_entry(path, role: str, sha256: str | None = None, **extra: Any) -> dict:
    """One of a manifest's `inputs`, which `slm info` follows back to raw text: the absolute path, the ROLE it
    played (data, parent, reference, facts, valid, ...) and its sha256 (content_sha256 unless given); a model
    directory's also carries its tokenizer's hash (slm.formats.checkpoint.model_input). Standard input ("-") and
    URLs stay as they are."""
    p = str(path)
    if p == "-" or "://" in p:
        return {"path": p, "role": role, "sha256": sha256, **extra}
    path = Path(p).absolute()
    return {"path": str(path), "role": role, "sha256": sha256 or content_sha256(path), **extra}


def absolute(paths) -> list[str]:
    """PATHS as absolute paths (standard input, "-", and URLs as they are), for a manifest."""
    return [p if p == "-" or "://" in p else str(Path(p).absolute()) for p in map(str, paths)]


def _complete(entry: dict) -> dict:
    """An input as a stage gave it, with an absolute path and its sha256 (see input_entry)."""
    if not isinstance(entry.get("path"), str):
        return entry
    role = entry.get("role") or entry.get("name") or entry.get("kind") or "input"
    return {**input_entry(entry["path"], role, entry.get("sha256")),
            **{k: v for k, v in entry.items() if k not in ("path", "sha256")}}


def new_manifest(kind: str, config: dict, *, inputs: list[dict] | None = None, counts: dict | None = None,
                 started: float | None = None, energy: dict | None = None, **extra: Any) -> dict:
    """The manifest of an output of KIND (a plain dict: nothing is written here). INPUTS get absolute paths and
    their sha256 (input_entry). ENERGY: the node's meter reading for the stage that made it (slm.energy.take()),
    kept with its total in kWh."""
    m = {"kind": kind, "format_version": FORMAT_VERSIONS[kind], "slm_version": __version__,
         "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": list(sys.argv),
         "config": config, "inputs": [_complete(i) for i in inputs or []], "counts": counts or {},
         "wall_seconds": round(time.time() - started, 3) if started else None, "energy_kwh": None}
    if energy is not None:
        m["energy_kwh"], m["energy"] = energy["energy_kwh"], energy
    m.update(extra)
    return m


def read_manifest(directory: Path, kind: str | tuple[str, ...]) -> dict:
    """Read DIR/manifest.json and check its kind and format version, or fail in one line."""
    directory = Path(directory)
    kinds = (kind,) if isinstance(kind, str) else kind
    if not directory.is_dir():
        raise SlmError(f"{directory}: no such directory (expected a {' or '.join(kinds)} directory)")
    path = directory / MANIFEST
    if not path.exists():
        raise SlmError(f"{directory}: no manifest.json (expected a {' or '.join(kinds)} directory written by slm)")
    m = read_json(path)
    if not isinstance(m, dict) or m.get("kind") not in kinds:
        got = m.get("kind") if isinstance(m, dict) else None
        raise SlmError(f"{path}: kind is {got!r}, expected {' or '.join(repr(k) for k in kinds)}")
    version = m.get("format_version")
    if version != FORMAT_VERSIONS[m["kind"]]:
        raise SlmError(f"{path}: format_version {version!r} of kind {m['kind']!r} is not one this slm "
                       f"({__version__}) reads (it reads {FORMAT_VERSIONS[m['kind']]})")
    return m


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_replaceable(out: Path) -> None:
    """An existing output directory is replaced only if slm wrote it (it has a manifest) or it is empty; and a
    directory can be made beside it (stages check this before their work, not after)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise SlmError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not (out / MANIFEST).exists():
            raise SlmError(f"{out}: exists, is not empty and was not written by slm (no manifest.json); "
                           "choose another --out")
    check_writable(out)


def check_writable(path: Path) -> None:
    """PATH (a directory to create, or to replace) can be written: a directory made in its nearest existing
    ancestor, then removed, says so (permissions, read-only mounts and /proc alike)."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SlmError(f"{path}: cannot be made ({parent} is a file)")
    probe = parent / f".{path.name}.probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as e:
        raise SlmError(f"{path}: cannot be written ({parent}: {e.strerror or e})") from None
    probe.rmdir()


def publish_dir(tmp: Path, out: Path) -> None:
    """fsync TMP, then put it in place of OUT with renames; an old OUT is removed only afterwards."""
    fsync_tree(tmp)
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh OUT.tmp-XXXX directory; on success it replaces OUT, on failure it is removed.

    A killed stage leaves at most an OUT.tmp-* directory behind, never a half OUT.
    """
    out = Path(out).absolute()
    check_replaceable(out)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise SlmError(f"{out}: cannot be written ({e.strerror or e})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out)
