"""Reading documents from the files people keep corpora in, as a stream, with errors that name file and line.

Supported inputs
    .jsonl .jsonl.gz .jsonl.zst   one JSON object per line; the document is the TEXT_KEY field (default "text")
    .parquet                      the TEXT_KEY column
    .txt                          txt_mode "file": the whole file is one document;
                                  txt_mode "paragraph": each block of lines separated by blank lines is one
    a datasets.save_to_disk dir   the TEXT_KEY column (a DatasetDict dir expands to its splits)
    directories and globs         of the above, recursively, in sorted order

Large inputs are cut into units that can be read in parallel: plain .jsonl and paragraph .txt at line / blank-line
boundaries every SHARD_BYTES, parquet files by row groups, datasets by rows. Compressed files are one unit each.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from slm.console import warn
from slm.errors import SlmError
from slm.formats.tables import plural

SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".parquet": "parquet",
            ".txt": "txt"}
EXPECTED = ".jsonl, .jsonl.gz, .jsonl.zst, .parquet, .txt, a datasets.save_to_disk directory, or a directory of those"


@dataclass
class Input:
    path: Path
    kind: str  # one of SUFFIXES' values, or "dataset"
    size: int  # bytes on disk
    mtime_ns: int
    shown: str | None = None  # how the user named it, when not by its path ("-": standard input)

    def describe(self) -> dict:
        return {"path": self.shown or str(self.path), "kind": self.kind, "bytes": self.size}


@dataclass
class Unit:
    """A piece of one input that one worker reads: bytes [start, stop) of a file, or rows [start, stop)."""

    input_index: int
    part: int
    start: int
    stop: int
    nbytes: int  # for progress: bytes of input this unit covers (estimated for rows)


def kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    return None


def _is_dataset_dir(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _dataset_dict_splits(path: Path) -> list[Path] | None:
    meta = path / "dataset_dict.json"
    if not meta.is_file():
        return None
    try:
        splits = json.loads(meta.read_text())["splits"]
    except (ValueError, KeyError, TypeError):
        raise SlmError(f"{meta}: expected {{\"splits\": [...]}} as written by DatasetDict.save_to_disk") from None
    return [path / s for s in splits]


def _input(path: Path, kind: str) -> Input:
    if kind == "dataset":
        files = [p for p in path.iterdir() if p.suffix == ".arrow"]
        size = sum(p.stat().st_size for p in files)
        mtime = max([p.stat().st_mtime_ns for p in files] + [(path / "state.json").stat().st_mtime_ns])
        return Input(path.absolute(), kind, size, mtime)
    st = path.stat()
    return Input(path.absolute(), kind, st.st_size, st.st_mtime_ns)


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    if _is_dataset_dir(root):
        yield root, "dataset"
        return
    splits = _dataset_dict_splits(root)
    if splits is not None:
        for s in splits:
            if not _is_dataset_dir(s):
                raise SlmError(f"{s}: listed in dataset_dict.json but not a saved dataset")
            yield s, "dataset"
        return
    ignored = 0
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif kind_of(entry):
            yield entry, kind_of(entry)
        else:
            ignored += 1
    if ignored:
        warn(f"{root}: ignored {plural(ignored, 'file')} that {'is' if ignored == 1 else 'are'} not "
             f"{', '.join(SUFFIXES)}")


def spool_stdin(directory: Path, name: str) -> Path:
    """Copy standard input to DIRECTORY/NAME.jsonl (or .txt when its first character is not '{'), in blocks, so
    that `-` can be read by offset like any file; the caller removes it."""
    import sys

    src = sys.stdin.buffer
    head = src.read(1 << 16)
    first = head.lstrip()[:1]
    path = Path(directory) / f"{name}.{'jsonl' if first in (b'{', b'') else 'txt'}"
    with open(path, "wb") as f:
        while head:
            f.write(head)
            head = src.read(1 << 20)
    return path


def expand_inputs(specs: list[str | Path]) -> list[Input]:
    """Files, directories and globs -> the list of inputs, in order, without duplicates."""
    out: list[Input] = []
    seen: set[Path] = set()
    for spec in specs:
        spec_s = str(spec)
        if any(c in spec_s for c in "*?["):
            matches = sorted(glob.glob(spec_s, recursive=True))
            if not matches:
                raise SlmError(f"{spec_s}: the pattern matches no file")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(spec_s)]
        for p in paths:
            if not p.exists():
                raise SlmError(f"{p}: no such file or directory")
            if p.is_dir():
                found = list(_walk(p))
                if not found and not any(c in spec_s for c in "*?["):
                    raise SlmError(f"{p}: the directory holds no input ({EXPECTED})")
            else:
                kind = kind_of(p)
                if kind is None:
                    raise SlmError(f"{p}: unsupported input (expected {EXPECTED})")
                found = [(p, kind)]
            for path, kind in found:
                key = path.resolve()
                if key not in seen:
                    seen.add(key)
                    out.append(_input(path, kind))
    if not out:
        raise SlmError(f"no input files (expected {EXPECTED})")
    return out


# --- Cutting inputs into units ----------------------------------------------------------------------------------

def _next_line_start(f, offset: int) -> int:
    """The first line start at or after OFFSET."""
    if offset == 0:
        return 0
    f.seek(offset - 1)
    f.readline()
    return f.tell()


def _next_paragraph_start(f, offset: int) -> int:
    """A position at or after OFFSET that follows a blank line (or the end of the file)."""
    if offset == 0:
        return 0
    f.seek(_next_line_start(f, offset))
    while line := f.readline():
        if not line.strip():
            break
    return f.tell()


def plan_units(inputs: list[Input], shard_bytes: int, txt_mode: str) -> list[Unit]:
    units: list[Unit] = []
    for i, inp in enumerate(inputs):
        splittable = inp.kind == "jsonl" or (inp.kind == "txt" and txt_mode == "paragraph")
        if splittable and inp.size > shard_bytes:
            boundary = _next_line_start if inp.kind == "jsonl" else _next_paragraph_start
            with open(inp.path, "rb") as f:
                starts = sorted({boundary(f, k * shard_bytes) for k in range(math.ceil(inp.size / shard_bytes))})
            starts = [s for s in starts if s < inp.size] + [inp.size]
            for part, (a, b) in enumerate(zip(starts, starts[1:])):
                units.append(Unit(i, part, a, b, b - a))
        elif inp.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(inp.path).metadata
            except Exception as e:
                raise SlmError(f"{inp.path}: not a readable parquet file ({e})") from None
            groups = [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
            part, g0, acc = 0, 0, 0
            for g, (_rows, nbytes) in enumerate(groups):
                acc += nbytes
                if acc >= shard_bytes or g == len(groups) - 1:
                    units.append(Unit(i, part, g0, g + 1, max(1, int(inp.size * acc / max(1, sum(b for _, b in groups))))))
                    part, g0, acc = part + 1, g + 1, 0
            if not groups:
                units.append(Unit(i, 0, 0, 0, 1))
        elif inp.kind == "dataset":
            rows = _dataset_rows(inp.path)
            n_parts = max(1, math.ceil(inp.size / shard_bytes))
            bounds = [rows * k // n_parts for k in range(n_parts + 1)]
            for part, (a, b) in enumerate(zip(bounds, bounds[1:])):
                if b > a or n_parts == 1:
                    units.append(Unit(i, part, a, b, max(1, inp.size * (b - a) // max(1, rows))))
        else:
            units.append(Unit(i, 0, 0, inp.size, max(1, inp.size)))
    return units


def _dataset_rows(path: Path) -> int:
    from datasets import load_from_disk

    try:
        return len(load_from_disk(str(path)))
    except Exception as e:
        raise SlmError(f"{path}: not a readable saved dataset ({type(e).__name__}: {e})") from None


# --- Reading documents -------------------------------------------------------------------------------------------

class BadRecord(SlmError):
    pass


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at byte OFFSET (computed only when an error is reported)."""
    count, done = 0, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 22, offset - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count + 1


class _Where:
    """file:line of a record, the line number counted only when an error is reported (split units start mid-file)."""

    def __init__(self, path: Path, lineno: int | None, offset: int):
        self.path, self.lineno, self.offset = path, lineno, offset

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno if self.lineno is not None else _line_number(self.path, self.offset)}"


def open_lines(path: Path, kind: str, start: int = 0):
    """(the file, its lines from byte START, what a broken stream raises) for jsonl, jsonl.gz and jsonl.zst."""
    raw = open(path, "rb")
    if kind == "jsonl":
        raw.seek(start)
        return raw, raw, ()
    if kind == "jsonl.gz":
        return raw, gzip.GzipFile(fileobj=raw, mode="rb"), (OSError, EOFError, zlib.error)
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw, io.BufferedReader(reader, buffer_size=1 << 20), (zstandard.ZstdError, OSError)


def parse_object(line: bytes, where, bad: Callable[[str], None]) -> dict | None:
    """The JSON object on LINE, or None after telling BAD why not (not UTF-8, not JSON, not an object)."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return bad(f"{where}: invalid UTF-8 at byte {e.start + 1} of the line")
    except json.JSONDecodeError as e:
        return bad(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return bad(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


class UnitReader:
    """Iterate the documents of one unit. bytes_done tracks progress; bad / empty count what was skipped."""

    def __init__(self, inp: Input, unit: Unit, text_key: str = "text", txt_mode: str = "file",
                 skip_bad: bool = False):
        self.inp, self.unit, self.text_key, self.txt_mode, self.skip_bad = inp, unit, text_key, txt_mode, skip_bad
        self.bytes_done = 0
        self.bad = 0
        self.documents = 0

    def _bad(self, message: str) -> None:
        if not self.skip_bad:
            raise BadRecord(message)
        self.bad += 1

    def __iter__(self) -> Iterator[str]:
        kind = self.inp.kind
        if kind.startswith("jsonl"):
            return self._jsonl()
        if kind == "txt":
            return self._txt()
        if kind == "parquet":
            return self._parquet()
        if kind == "dataset":
            return self._dataset()
        raise SlmError(f"{self.inp.path}: unsupported input kind {kind}")

    # jsonl and its compressed forms
    def _jsonl(self) -> Iterator[str]:
        path, key = self.inp.path, self.text_key
        raw, stream, errors = open_lines(path, self.inp.kind, self.unit.start)
        plain = self.inp.kind == "jsonl"
        pos = self.unit.start
        lineno = None if plain and self.unit.start > 0 else 1  # line numbers of split units are found on error
        try:
            while True:
                if plain and pos >= self.unit.stop:
                    break
                try:
                    line = stream.readline()
                except errors as e:
                    raise SlmError(f"{path}: broken {self.inp.kind.split('.')[-1]} stream ({e})") from None
                if not line:
                    break
                line_start = pos
                pos += len(line)
                self.bytes_done = (pos - self.unit.start) if plain else raw.tell()
                where = _Where(path, lineno, line_start)

                try:
                    if not line.strip() or (record := parse_object(line, where, self._bad)) is None:
                        continue
                    if key not in record:
                        keys = ", ".join(list(record)[:8]) or "none"
                        self._bad(f"{where}: no \"{key}\" field (the record has keys: {keys}); "
                                  "choose the field with --text-key")
                        continue
                    text = record[key]
                    if not isinstance(text, str):
                        self._bad(f"{where}: \"{key}\" is {type(text).__name__}, expected a string")
                        continue
                    self.documents += 1
                    yield text
                finally:
                    if lineno is not None:
                        lineno += 1
        finally:
            stream.close()
            raw.close()

    def _txt(self) -> Iterator[str]:
        path = self.inp.path
        if self.txt_mode == "file":
            data = path.read_bytes()
            self.bytes_done = len(data)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = data.count(b"\n", 0, e.start) + 1
                self._bad(f"{path}:{line}: invalid UTF-8 at byte {e.start + 1} of the file")
                return
            self.documents += 1
            yield text
            return
        with open(path, "rb") as f:
            f.seek(self.unit.start)
            pos, block, block_start = self.unit.start, [], self.unit.start

            def emit():
                data = b"".join(block)
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    line = _line_number(path, block_start) + data.count(b"\n", 0, e.start)
                    self._bad(f"{path}:{line}: invalid UTF-8 in this paragraph")
                    return None
                return text.strip("\r\n")

            while pos < self.unit.stop:
                line = f.readline()
                if not line:
                    break
                pos += len(line)
                self.bytes_done = pos - self.unit.start
                if line.strip():
                    if not block:
                        block_start = pos - len(line)
                    block.append(line)
                elif block:
                    text = emit()
                    block = []
                    if text is not None:
                        self.documents += 1
                        yield text
            if block:
                text = emit()
                if text is not None:
                    self.documents += 1
                    yield text

    def _texts_from_column(self, column, row0: int, where: Callable[[int], str]) -> Iterator[str]:
        for j, text in enumerate(column.to_pylist()):
            if not isinstance(text, str):
                self._bad(f"{where(row0 + j)}: \"{self.text_key}\" is "
                          f"{'null' if text is None else type(text).__name__}, expected a string")
                continue
            self.documents += 1
            yield text

    def _parquet(self) -> Iterator[str]:
        import pyarrow.parquet as pq

        path = self.inp.path
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if self.text_key not in names:
            raise SlmError(f"{path}: no column \"{self.text_key}\" (columns: {', '.join(names[:8])}); "
                           "choose it with --text-key")
        meta = pf.metadata
        row = sum(meta.row_group(g).num_rows for g in range(self.unit.start))
        total_rows = max(1, sum(meta.row_group(g).num_rows for g in range(self.unit.start, self.unit.stop)))
        done = 0
        groups = list(range(self.unit.start, self.unit.stop))
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=[self.text_key]):
            yield from self._texts_from_column(batch.column(0), row, lambda r: f"{path}: row {r + 1}")
            row += batch.num_rows
            done += batch.num_rows
            self.bytes_done = self.unit.nbytes * done // total_rows

    def _dataset(self) -> Iterator[str]:
        from datasets import load_from_disk

        path = self.inp.path
        ds = load_from_disk(str(path))
        if self.text_key not in ds.column_names:
            raise SlmError(f"{path}: no column \"{self.text_key}\" (columns: {', '.join(ds.column_names[:8])}); "
                           "choose it with --text-key")
        ds = ds.select_columns([self.text_key]).select(range(self.unit.start, self.unit.stop))
        rows = max(1, self.unit.stop - self.unit.start)
        row = self.unit.start
        for table in ds.with_format("arrow").iter(batch_size=1024):
            yield from self._texts_from_column(table.column(0), row, lambda r: f"{path}: row {r + 1}")
            row += table.num_rows
            self.bytes_done = self.unit.nbytes * (row - self.unit.start) // rows


def iter_documents(inputs: list[Input], text_key: str = "text", txt_mode: str = "file",
                   skip_bad: bool = False) -> Iterator[str]:
    """Every document of every input, in order (one process; used to train tokenizers)."""
    for unit in plan_units(inputs, shard_bytes=1 << 62, txt_mode=txt_mode):
        yield from UnitReader(inputs[unit.input_index], unit, text_key, txt_mode, skip_bad)


def write_jsonl(path: Path, rows) -> Path:
    """ROWS as one JSON object per line (UTF-8, not escaped) into PATH (its directory made); returns PATH."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
