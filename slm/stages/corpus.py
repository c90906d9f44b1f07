"""`slm tokenize corpus`: a real corpus from text every machine with Python already has.

Nothing is downloaded and nothing is copied into the repository: the running interpreter's standard library is the
corpus. Two sources, each with a train and a held-out split:

    code/   every standard-library .py file that decodes as UTF-8 (one document per file)
    prose/  the natural language inside them: for each file its docstrings (module, classes, functions) and its
            comment blocks (one document per file); each topic of the language reference that ships in
            pydoc_data/topics.py; and the licence text

Files go to the held-out split by a hash of their path (HELDOUT_PERCENT of them), so the split is the same on every
run and machine with the same Python. The output is .jsonl that `slm tokenize encode` reads.
"""

from __future__ import annotations

import ast
import json
import platform
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from slm import energy
from slm.console import RateColumn, progress
from slm.errors import SlmError, UsageError
from slm.evaluation.heldout import SKIP_DIRS, is_heldout, prose_of
from slm.formats.manifest import atomic_dir, check_replaceable, new_manifest, tree_sha256, write_json

TOPICS = Path("pydoc_data/topics.py")


@dataclass
class CorpusConfig:
    out: Path
    """The corpus directory to write (code/ and prose/, each with train.jsonl and valid.jsonl)."""
    stdlib: Path | None = None
    """The standard library to read; default: the running interpreter's."""
    heldout_percent: float = 2.0
    """Percentage of files (and topics) put in the held-out split."""
    include_tests: bool = True
    """Include the standard library's own test suite (about 60% of its code where it is installed)."""

    def __post_init__(self):
        if not (isinstance(self.heldout_percent, (int, float)) and 0 <= self.heldout_percent < 100):
            raise UsageError(f"--heldout-percent {self.heldout_percent}: expected a number from 0 to below 100")


def _topics(path: Path) -> dict[str, str]:
    """The dict literal `topics = {...}` of pydoc_data/topics.py, read with ast.literal_eval (nothing executed)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
    return {}


def run(cfg: CorpusConfig) -> Path:
    started = time.time()
    check_replaceable(cfg.out)
    root = Path(cfg.stdlib or sysconfig.get_paths()["stdlib"]).absolute()
    if not (root / "os.py").is_file():
        raise SlmError(f"{root}: not a Python standard library (no os.py)")
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIP_DIRS.intersection(p.relative_to(root).parts)
                   and (cfg.include_tests or not {"test", "tests", "idle_test"}.intersection(p.relative_to(root).parts)))
    counts = {f"{src}/{split}": {"documents": 0, "bytes": 0} for src in ("code", "prose") for split in ("train", "valid")}
    skipped = 0
    with atomic_dir(cfg.out) as tmp:
        handles = {}
        for src in ("code", "prose"):
            (tmp / src).mkdir()
            for split in ("train", "valid"):
                handles[f"{src}/{split}"] = open(tmp / src / f"{split}.jsonl", "w", encoding="utf-8")

        def put(key: str, text: str, **meta) -> None:
            line = json.dumps({"text": text, **meta}, ensure_ascii=False)
            handles[key].write(line + "\n")
            counts[key]["documents"] += 1
            counts[key]["bytes"] += len(text.encode("utf-8"))

        try:
            with progress(RateColumn("completed", "files/s")) as bar:
                task = bar.add_task("reading the standard library", total=len(files))
                for path in files:
                    bar.advance(task)
                    rel = path.relative_to(root).as_posix()
                    split = "valid" if is_heldout(rel, cfg.heldout_percent) else "train"
                    if rel == TOPICS.as_posix():
                        for name, text in sorted(_topics(path).items()):
                            s = "valid" if is_heldout(f"topic:{name}", cfg.heldout_percent) else "train"
                            put(f"prose/{s}", text.strip(), path=f"{rel}#{name}")
                        continue
                    try:
                        source = path.read_text(encoding="utf-8")
                    except (UnicodeDecodeError, OSError):
                        skipped += 1
                        continue
                    if not source.strip():
                        continue
                    put(f"code/{split}", source, path=rel)
                    try:
                        prose = prose_of(source)
                    except (SyntaxError, ValueError, RecursionError):  # Python 2 test data and the like
                        prose = []
                    if prose:
                        put(f"prose/{split}", "\n\n".join(prose), path=rel)
                licence = root / "LICENSE.txt"
                if licence.is_file():
                    put("prose/train", licence.read_text(encoding="utf-8", errors="replace"), path="LICENSE.txt")
        finally:
            for h in handles.values():
                h.close()
        write_json(tmp / "manifest.json", new_manifest(
            "corpus", {"stdlib": str(root), "heldout_percent": cfg.heldout_percent,
                       "include_tests": cfg.include_tests, "out": str(cfg.out)},
            inputs=[{"path": str(root), "role": "stdlib", "files": len(files), "python": platform.python_version(),
                     "sha256": tree_sha256(root, files + [p for p in [root / "LICENSE.txt"] if p.is_file()])}],
            counts={**counts, "files_skipped_not_utf8": skipped}, started=started,
            sources={"code": {"train": "code/train.jsonl", "valid": "code/valid.jsonl"},
                     "prose": {"train": "prose/train.jsonl", "valid": "prose/valid.jsonl"}}, energy=energy.take()))
    return Path(cfg.out)
