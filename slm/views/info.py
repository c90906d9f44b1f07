"""`slm info`: what an artifact is and where it came from.

Every directory slm writes holds manifest.json (kind, slm version, command, config, inputs with hashes, counts,
energy). `slm info PATH` prints that summary and the artifact's ancestry: the manifests it names as its inputs
(`inputs[].path`, a checkpoint's `parent` and `mix`, a quantized release's `lineage.parent`), followed recursively.
PATH may be a stage directory, a run directory (its newest checkpoint, with the run's checkpoints and energy), a
checkpoint, or a GGUF file (its metadata, and the slm checkpoint it was written from when it says so).
"""

from __future__ import annotations

import json
from pathlib import Path

from slm.errors import SlmError
from slm.formats.manifest import manifest_of, read_json
from slm.formats.metrics import last_metrics
from slm.formats.tables import plural

SUMMARY_KEYS = ("kind", "stage", "recipe", "step", "tokens_seen", "slm_version", "created_utc", "wall_seconds",
                "energy_kwh", "tokenizer_sha256")


def _edges(m: dict) -> list[tuple[str, str]]:
    """(relation, path) for each artifact the manifest names as an input."""
    out = []
    if isinstance(m.get("parent"), str):
        out.append(("parent", m["parent"]))
    lineage = m.get("lineage")
    if isinstance(lineage, dict) and isinstance(lineage.get("parent"), str):
        out.append(("from", lineage["parent"]))
    for rel in ("mix", "tokenizer"):
        ref = m.get(rel)
        if isinstance(ref, dict) and isinstance(ref.get("path"), str):
            out.append((rel, ref["path"]))
    for i in m.get("inputs") or []:
        if isinstance(i, dict) and isinstance(i.get("path"), str):
            rel = i.get("role") or i.get("name") or i.get("kind") or "input"
            out.append((str(rel), i["path"]))
    seen, unique = set(), []
    for rel, p in out:
        if p not in seen:
            seen.add(p)
            unique.append((rel, p))
    return unique


def resolve(path: Path) -> tuple[Path, dict | None, dict]:
    """(the artifact, its manifest or None, extra facts) for a user's PATH."""
    path = Path(path)
    if not path.exists():
        raise SlmError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".gguf":
            return path, None, gguf_facts(path)
        if path.name == "manifest.json":
            path = path.parent
        else:
            return path, None, {"kind": "file", "bytes": path.stat().st_size}
    m = manifest_of(path)
    if (path / "checkpoints").is_dir() or (m is not None and m["kind"] == "run"):
        from slm.formats.checkpoint import latest_checkpoint

        newest = latest_checkpoint(path)  # names a newer one it skips
        if newest is not None:  # a run is its newest checkpoint, with the run's facts
            return newest, manifest_of(newest), _run_facts(path)
        if m is None:
            raise SlmError(f"{path}: a run directory with no complete checkpoint yet")
        return path, m, _run_facts(path)  # a run with no checkpoint (yet): its own manifest
    if m is not None:
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        return path, m, (_run_facts(run) if run is not None else {})
    if (path / "config.json").is_file():  # a model directory slm did not write: a released one
        return path, None, model_facts(path)
    raise SlmError(f"{path}: no manifest.json (not a directory slm wrote), no checkpoints/ (not a run) and no "
                   "config.json (not a model directory)")


def model_facts(path: Path) -> dict:
    """What a model directory slm did not write is: architecture, parameters, dtype, context, tokenizer, chat
    template, and the hashes that identify its weights and tokenizer."""
    import struct

    from slm.formats.chat import template_source
    from slm.formats.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    cfg = ckpt.model_config
    dtypes, params = set(), 0
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(
        path.glob("model-*.safetensors"))
    for f in files:  # the safetensors header: dtypes and shapes without reading the weights
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name != "__metadata__":
                dtypes.add(t["dtype"])
                n = 1
                for d in t["shape"]:
                    n *= d
                params += n
    facts = {"kind": "model (released)", "architecture": ckpt.hf_config.get("model_type"), "parameters": params,
             "dtype": ", ".join(sorted(dtypes)) or None, "context": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
             "weights_sha256": ckpt.weights_sha256()}
    tok = ckpt.tokenizer()
    if tok is not None:
        facts.update(tokenizer=f"{tok.spec.rules} byte-level BPE, {tok.n_vocab:,} ids", tokenizer_sha256=tok.hash)
    template = template_source(path)
    facts["chat_template"] = ("chat_template.jinja" if (path / "chat_template.jinja").is_file()
                              else "tokenizer_config.json") if template else None
    return facts


def _run_facts(run: Path) -> dict:
    """A run directory's checkpoints and the energy its sessions recorded."""
    from slm.formats.checkpoint import list_checkpoints

    energy = sorted((run / "energy").glob("*.json")) if (run / "energy").is_dir() else []
    kwh = 0.0
    for e in energy:
        try:
            kwh += float(json.loads(e.read_text()).get("energy_kwh") or 0)
        except (OSError, ValueError, AttributeError):
            pass
    return {"run": str(run), "checkpoints": [p.name for p in list_checkpoints(run)], "energy_records": len(energy),
            "run_energy_kwh": kwh}


def gguf_facts(path: Path) -> dict:
    from slm.formats.gguf import open_fields  # gguf-py: only for a GGUF file

    field, tensors = open_fields(path)
    facts = {"kind": "gguf", "bytes": path.stat().st_size, "tensors": len(tensors),
             "parameters": int(sum(int(t.n_elements) for t in tensors))}
    arch = field("general.architecture")
    for key in ("general.architecture", "general.name", "general.file_type", f"{arch}.context_length",
                f"{arch}.block_count", f"{arch}.embedding_length", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                "slm.checkpoint", "slm.checkpoint_sha256", "slm.tokenizer_sha256", "slm.quantization"):
        if (v := field(key)) is not None:
            facts[key] = v
    facts["chat_template"] = field("tokenizer.chat_template") is not None
    if isinstance(facts.get("general.file_type"), int):  # llama.cpp's number for the type: 15 is Q4_K_M
        import gguf

        try:
            facts["file_type"] = gguf.LlamaFileType(facts["general.file_type"]).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    return facts


def describe(path: Path, depth: int = 8, _seen: set | None = None) -> dict:
    """The artifact at PATH and, recursively, the ones it came from."""
    seen = _seen if _seen is not None else set()
    target, m, extra = resolve(path)
    node = {"path": str(target), **extra}
    if m is not None:
        node.update({k: m[k] for k in SUMMARY_KEYS if k in m})
        node["command"] = " ".join(m.get("command") or [])
    parents = []
    key = str(Path(target).resolve())
    if key in seen:
        node["repeated"] = True
        return node
    seen.add(key)
    edges = _edges(m) if m is not None else []
    if m is None and isinstance(extra.get("slm.checkpoint"), str):
        edges = [("from", extra["slm.checkpoint"])]
    for rel, p in edges:
        p = _locate(p, Path(target))
        child = {"relation": rel, "path": p}
        if depth <= 0:
            child["truncated"] = True
        elif not Path(p).exists():
            child["missing"] = True
        else:
            try:
                child.update(describe(Path(p), depth - 1, seen))
            except SlmError as e:
                child["error"] = str(e)
        parents.append(child)
    node["from"] = parents
    return node


def _locate(p: str, where: Path) -> str:
    """An input path as written (relative ones were relative to the working directory of the stage that wrote
    them): as it is if it exists, else tried against the artifact's enclosing directories."""
    if Path(p).is_absolute() or Path(p).exists():
        return str(Path(p).absolute())
    for up in list(Path(where).absolute().parents)[:4]:
        if (up / p).exists():
            return str(up / p)
    return p


def render(node: dict):
    """A rich Tree of the ancestry."""
    import os

    from rich.tree import Tree

    def short(p: str) -> str:
        rel = os.path.relpath(p)
        return rel if not rel.startswith("..") else p

    def label(n: dict) -> str:
        kind = n.get("kind", "?")
        bits = [f"[bold]{kind}[/bold] {short(n['path'])}"]
        facts = []
        for k in ("stage", "recipe", "step", "tokens_seen"):
            if k in n:
                facts.append(f"{k} {n[k]:,}" if isinstance(n[k], int) else f"{k} {n[k]}")
        if n.get("created_utc"):
            facts.append(str(n["created_utc"]).replace("T", " ")[:16])
        if n.get("energy_kwh"):
            facts.append(f"{n['energy_kwh']:.3g} kWh")
        arch = n.get("architecture") or n.get("general.architecture")
        if arch:
            facts.append(str(arch))
        if n.get("parameters"):
            facts.append(f"{n['parameters'] / 1e6:,.1f}M parameters")
        if n.get("dtype"):
            facts.append(str(n["dtype"]))
        if n.get("general.file_type") is not None:
            facts.append(n.get("file_type") or f"file type {n['general.file_type']}")
        context = n.get("context") or n.get(f"{arch}.context_length")
        if context:
            facts.append(f"context {context:,}")
        if n.get("tokenizer") or n.get("tokenizer.ggml.pre"):
            facts.append(f"tokenizer {n.get('tokenizer') or n['tokenizer.ggml.pre']}")
        if "chat_template" in n and n["chat_template"]:
            facts.append("chat template" + (f" in {n['chat_template']}" if isinstance(n["chat_template"], str) else ""))
        if "bytes" in n:
            facts.append(f"{n['bytes'] / 1e6:.1f} MB")
        if "checkpoints" in n:
            facts.append(f"run {short(n['run'])}: {plural(len(n['checkpoints']), 'checkpoint')}, "
                         f"{n['run_energy_kwh']:.3g} kWh in {plural(n['energy_records'], 'energy record')}")
        if n.get("truncated"):
            return f"{short(n['path'])} [dim](not followed: --depth)[/dim]"
        if n.get("missing"):
            facts.append("[red]missing[/red]")
        if n.get("error"):
            facts.append(f"[red]{n['error']}[/red]")
        if n.get("repeated"):
            facts.append("(shown above)")
        return bits[0] + (" — " + ", ".join(facts) if facts else "")

    tree = Tree(label(node))

    def add(t, n):
        for c in n.get("from", []):
            sub = t.add(f"[dim]{c['relation']}:[/dim] " + label(c))
            add(sub, c)

    add(tree, node)
    return tree


RESULT_FILES = ("quantize.json", "bench.json", "eval.json", "carbon.json", "dpo.json", "selfknow.json")


def summary(path: Path) -> dict:
    """What `--json` prints for a stage's output: the artifact's manifest summary, what it was made from (one
    generation), its counts, a training run's last metrics, and the stage's result file (quantize.json, dpo.json...)."""

    node = describe(Path(path), depth=1)
    for parent in node.get("from", []):
        parent.pop("from", None)
    art = Path(node["path"])
    m = manifest_of(art) if art.is_dir() else None
    if m and "counts" in m:
        node["counts"] = m["counts"]
    places = [art] if art.is_dir() else []
    if node.get("run"):
        run = Path(node["run"])
        if (run / "metrics.jsonl").is_file():
            node["metrics"] = {k: v for k, v in last_metrics(run).items() if k != "run"}
        places.append(run)
    for place in places:
        for name in RESULT_FILES:
            if (place / name).is_file():
                node["result"] = read_json(place / name)
    return node

