"""Held-out text of the embedded corpus: which standard-library files `slm tokenize corpus` holds out, the prose
inside a file, and that held-out text for quality checks (quantize's report, the slm-local eval tasks) when the
user gives none. The corpus stage and these checks share the one split rule, so held-out text is never trained on.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Comment lines that carry no language: encodings, shebangs, linters' and type checkers' pragmas.
PRAGMAS = ("-*-", "!", "noqa", "type:", "pragma", "fmt:", "pylint", "XXX", "TODO")


def is_heldout(key: str, percent: float) -> bool:
    """Whether the file (or topic) KEY is in the held-out split of PERCENT: a hash of its name decides."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return (h % 10000) < percent * 100


def prose_of(source: str) -> list[str]:
    """Docstrings (module, classes, functions), then comment blocks: consecutive full-line comments joined into
    paragraphs, '#' and pragmas removed, lines inside multi-line strings left out."""
    tree = ast.parse(source)
    docs, in_string = [], set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and len(doc.split()) >= 3:
                docs.append(inspect.cleandoc(doc))
        elif isinstance(node, (ast.Constant, ast.JoinedStr)) and getattr(node, "end_lineno", node.lineno) > node.lineno:
            in_string.update(range(node.lineno, node.end_lineno + 1))
    blocks, current, last = [], [], -2
    for lineno, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if not stripped.startswith("#") or lineno in in_string:
            continue
        text = stripped.lstrip("#").strip()
        if not text or any(text.startswith(p) for p in PRAGMAS) or set(text) <= set("-=#*~_ "):
            last = -2
            continue
        if lineno != last + 1 and current:
            blocks.append(" ".join(current))
            current = []
        current.append(text)
        last = lineno
    if current:
        blocks.append(" ".join(current))
    return docs + [b for b in blocks if len(b.split()) >= 3]  # a block of prose, not a lone word


def heldout_text(max_chars: int, percent: float = 2.0) -> list[str]:
    """Held-out documents of the embedded corpus (the same split `slm tokenize corpus` makes with PERCENT), code and
    the prose inside it alternately, up to MAX_CHARS characters: text for quality checks when the user gives none."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts) or not is_heldout(rel.as_posix(), percent):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            prose = prose_of(source)
        except (UnicodeDecodeError, OSError, SyntaxError, ValueError, RecursionError):
            continue
        for text in (source, "\n\n".join(prose)):
            if text.strip():
                out.append(text)
                total += len(text)
        if total >= max_chars:
            break
    return out
