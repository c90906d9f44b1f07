"""`slm quantize`: a checkpoint as every release format of StableLM 2, with what each costs in quality.

GGUF files for llama.cpp (slm.formats.gguf: f32, f16, bf16, q8_0, q4_0, q4_1 written by slm with gguf-py; q4_k_m and
q5_k_m by llama.cpp's quantizer through llama-cpp-python, from the f16 file) and INT4 (OpenVINO IR with NNCF's int4
weight compression, slm.inference.openvino, as StableLM 2's INT4 release).

Quality report: on held-out tokens (--valid files, else held-out text of the embedded corpus), each file is run by
its own runtime (llama.cpp for GGUF, OpenVINO for INT4) and compared with the checkpoint run by torch in fp32:
perplexity, the mean KL divergence KL(p_fp32 || p_type) per token and the top-1 agreement (the same most likely
next token), with the file size and bits per weight. Printed as a table and kept in OUT/quantize.json.
"""

from __future__ import annotations

import functools
import tempfile
from collections import Counter
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slm import energy
from slm.console import err, info, progress, warn
from slm.errors import POSITIVE, SlmError, UsageError, check_ranges
from slm.evaluation.heldout import heldout_text
from slm.formats.chat import ChatTemplate, iter_objects, parse_chat
from slm.formats.checkpoint import Checkpoint, model_input, run_name
from slm.formats.gguf import LLAMA_CPP_TYPES, PYTHON_TYPES, check_lineage, read_tensor_types, write_gguf
from slm.formats.manifest import atomic_dir, check_replaceable, new_manifest, write_json
from slm.formats.tables import QUANTIZE_COLUMNS, plural, quantize_rows
from slm.formats.tokens import TokensDir
from slm.inference.llamacpp import LlamaCppScorer, quantize_gguf
from slm.inference.openvino import OpenVinoScorer, export_int4
from slm.inference.scoring import TorchScorer, compare, reference_quality

TYPES = list(PYTHON_TYPES) + list(LLAMA_CPP_TYPES) + ["int4"]
DEFAULT_TYPES = ["f16", "q8_0", "q4_0", "q4_1", "q5_k_m", "q4_k_m", "int4"]


@dataclass
class QuantizeConfig:
    checkpoint: Path
    out: Path | None
    types: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))
    valid: list[str] = field(default_factory=list)
    """Held-out text (.jsonl with "text" or chat "messages", .txt) or a tokens directory; default: the embedded
    corpus's held-out text."""
    eval_tokens: int = 4096
    window: int = 256
    threads: int | None = None
    name: str | None = None
    int4_group_size: int = 128
    int4_symmetric: bool = True
    int4_all_layers: bool = False
    report: bool = True
    gguf: list[Path] = field(default_factory=list)
    """GGUF files written elsewhere (llama.cpp's own quantizer, an imatrix run) to score against the checkpoint
    beside the types slm writes; each must be this checkpoint's model (slm.formats.gguf.check_lineage)."""

    def __post_init__(self):
        check_ranges(self, threads=POSITIVE)
        for name in ("eval_tokens", "window", "int4_group_size"):  # a window of one token scores nothing
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 2):
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected an integer >= 2")


def parse_types(text: str) -> list[str]:
    types = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise UsageError(f"--type {unknown[0]!r}: expected some of {', '.join(TYPES)}")
    if not types:
        raise UsageError(f"--type: expected some of {', '.join(TYPES)}")
    return list(dict.fromkeys(types))


# --- held-out windows ------------------------------------------------------------------------------------------
def eval_windows(ckpt: Checkpoint, specs: list[str], n_tokens: int, window: int) -> list[np.ndarray]:
    """Windows of WINDOW token ids (the last may be shorter), N_TOKENS in all, from SPECS or the embedded corpus."""
    tok = ckpt.tokenizer()
    if tok is None:
        raise SlmError(f"{ckpt.dir}: no tokenizer (tokenizer.json, or slm's encoding.json)")
    ids: list[int] = []
    if specs:
        for spec in specs:
            p = Path(spec)
            if p.is_dir() and (p / "manifest.json").is_file():
                td = TokensDir(p)
                ids.extend(int(x) for x in td.read(0, min(n_tokens - len(ids), td.n_tokens)))
            else:
                if p.suffix == ".txt":
                    try:
                        texts = [p.read_text(encoding="utf-8")]
                    except (OSError, UnicodeDecodeError) as e:
                        raise SlmError(f"--valid {p}: cannot read ({e})") from None
                else:
                    texts = []
                    for where, obj in iter_objects([spec], False, {}):
                        if "messages" in obj or "conversations" in obj:  # a conversation, as the model chats
                            texts.append(_rendered(ckpt, tok, obj, where))
                        elif isinstance(obj.get("text"), str):
                            texts.append(obj["text"])
                        else:
                            raise SlmError(f"{where}: expected a text field (or messages)")
                        if sum(len(t) for t in texts) > 8 * n_tokens:
                            break
                for t in texts:
                    ids.extend(tok.encode(t, allowed_special="all") + [tok.eos_id])
                    if len(ids) >= n_tokens:
                        break
            if len(ids) >= n_tokens:
                break
    else:
        for t in heldout_text(n_tokens * 6):
            ids.extend(tok.encode(t) + [tok.eos_id])
            if len(ids) >= n_tokens:
                break
    ids = ids[:n_tokens]
    if len(ids) < 2:
        raise SlmError(f"--valid {', '.join(specs) or '(embedded corpus)'}: fewer than 2 tokens to evaluate on")
    return [np.asarray(ids[i:i + window], dtype=np.int64) for i in range(0, len(ids), window)
            if len(ids[i:i + window]) >= 2]


def _rendered(ckpt: Checkpoint, tok, obj: dict, where: str) -> str:
    return _template(ckpt.dir).render(parse_chat(obj, where), False, tok.spec.bos_token, tok.spec.eos_token)


_template = functools.cache(ChatTemplate.of_checkpoint)


def write_files(ckpt: Checkpoint, state: dict, tmp: Path, types: list[str], name: str, cfg: QuantizeConfig) -> dict:
    """Each type's file into TMP (GGUF by slm, k-quants by llama.cpp, INT4 by OpenVINO): {type: what was written}."""
    files: dict[str, dict] = {}
    with progress() as bar:
        task = bar.add_task("quantize", total=len(types))
        f16_path = None
        for kind in types:
            bar.update(task, description=f"quantize {kind}")
            if kind in PYTHON_TYPES:
                path = tmp / f"{name}-{kind}.gguf"
                w = write_gguf(ckpt, path, kind, name, state)
                files[kind] = {"file": path.name, "format": "gguf", "fallbacks": w.fallbacks}
                if kind == "f16":
                    f16_path = path
            elif kind in LLAMA_CPP_TYPES:
                if f16_path is None:
                    f16_path = tmp / ".f16-source.gguf"
                    write_gguf(ckpt, f16_path, "f16", name, state)
                path = tmp / f"{name}-{kind}.gguf"
                quantize_gguf(f16_path, path, LLAMA_CPP_TYPES[kind], cfg.threads, kind)
                kinds = read_tensor_types(path)
                fallbacks = [t for t, k in kinds.items() if k in ("Q5_0", "Q5_1", "Q8_0", "F16")
                             and t.endswith(".weight") and "norm" not in t and t not in ("output.weight",)]
                files[kind] = {"file": path.name, "format": "gguf", "fallbacks": fallbacks,
                               "main_type": "Q4_K" if kind == "q4_k_m" else "Q5_K"}
            else:  # int4
                path = tmp / f"{name}-int4"
                summary = export_int4(ckpt, path, cfg.int4_group_size, cfg.int4_symmetric, cfg.int4_all_layers)
                files[kind] = {"file": path.name, "format": "openvino", **summary}
            bar.advance(task)
        if f16_path is not None and f16_path.name.startswith("."):
            f16_path.unlink()
    return files


def run(cfg: QuantizeConfig) -> Path:
    started = time.time()
    if cfg.out is None:
        raise UsageError("--out: missing (the output directory)")
    check_replaceable(cfg.out)
    ckpt = Checkpoint.open(cfg.checkpoint)
    model_cfg = ckpt.model_config  # a checkpoint slm cannot read fails here, before anything is written
    tok = ckpt.tokenizer()
    if tok is None:
        raise SlmError(f"{ckpt.dir}: no tokenizer (tokenizer.json, or slm's encoding.json)")
    types = cfg.types
    external = {}
    for g in cfg.gguf:
        g = Path(g).absolute()
        if not g.is_file():
            raise SlmError(f"--gguf {g}: no such file")
        check_lineage(g, ckpt)  # before anything is written
        external[g.stem if g.stem not in types else f"{g.stem} (given)"] = g
    if not types and not external:
        raise SlmError("nothing to do: give --type or --gguf")
    name = cfg.name or run_name(ckpt.dir)
    state = ckpt.state_dict()  # read once, for every file
    n_params = sum(int(np.prod(v.shape)) for k, v in state.items()
                   if not (model_cfg.tie_embeddings and k == "lm_head.weight"))
    # the held-out windows before any file is written: a bad --valid fails at once
    windows = eval_windows(ckpt, cfg.valid, cfg.eval_tokens, min(cfg.window, model_cfg.max_seq_len)) \
        if cfg.report else []
    k_rows = [d for d in (model_cfg.hidden_size, model_cfg.intermediate_size) if d % 256]
    if k_rows and any(t in LLAMA_CPP_TYPES for t in types):
        warn(f"k-quants work on rows of 256 weights; this model has rows of {', '.join(map(str, k_rows))}: "
             "llama.cpp stores those tensors as q5_0 / q5_1 / q8_0 instead (counted in quantize.json)")
    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        files = write_files(ckpt, state, tmp, types, name, cfg)
        for label, g in external.items():  # scored where they are, not copied
            files[label] = {"file": str(g), "format": "gguf", "fallbacks": [], "given": True}
        for kind, entry in files.items():
            p = tmp / entry["file"]
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
            entry["bytes"] = size
            entry["bits_per_weight"] = size * 8 / n_params
            if entry["format"] == "gguf":
                entry["tensor_types"] = dict(Counter(read_tensor_types(p).values()))
        report = {"model": str(ckpt.dir), "name": name, "params": n_params, "types": files}
        if cfg.report:
            report.update(quality(ckpt, tmp, files, cfg, tok.n_vocab, windows))
        write_json(tmp / "quantize.json", report)
        write_json(tmp / "manifest.json", new_manifest(
            "quantize", {"types": types, "eval_tokens": cfg.eval_tokens, "window": cfg.window,
                         "int4_group_size": cfg.int4_group_size, "int4_symmetric": cfg.int4_symmetric,
                         "int4_all_layers": cfg.int4_all_layers},
            inputs=[model_input(ckpt.dir, "checkpoint")]
            + [{"path": str(g), "role": "gguf"} for g in external.values()],
            counts={"files": len(files)}, started=started,
            lineage={"parent": str(ckpt.dir), "stage": "quantize"},
            files={k: v["file"] for k, v in files.items()}, energy=energy.take()))
    print_table(report)
    return out


def quality(ckpt: Checkpoint, directory: Path, files: dict, cfg: QuantizeConfig, n_vocab: int,
            windows: list[np.ndarray]) -> dict:
    ref = TorchScorer(ckpt, n_vocab)
    # the reference's logits, kept on disk (float32): tokens x vocabulary can be gigabytes (100k ids)
    scratch = tempfile.TemporaryDirectory(dir=directory)
    store = np.lib.format.open_memmap(Path(scratch.name) / "ref.npy", mode="w+", dtype=np.float32,
                                      shape=(sum(len(w) for w in windows), n_vocab))
    ref_logits, at = [], 0
    for w in windows:
        store[at:at + len(w)] = ref.logits(w)
        ref_logits.append(store[at:at + len(w)])
        at += len(w)
    del ref
    n_ctx = max(len(w) for w in windows)
    with progress() as bar:
        task = bar.add_task("quality", total=len(files))
        for kind, entry in files.items():
            bar.update(task, description=f"quality {kind}")
            path = directory / entry["file"]
            if entry["format"] == "gguf":
                try:
                    scorer = LlamaCppScorer(path, n_ctx, n_vocab, cfg.threads)
                except ImportError:
                    warn("llama-cpp-python is not installed: GGUF files are written but not scored")
                    entry["quality"] = None
                    bar.advance(task)
                    continue
            else:
                scorer = OpenVinoScorer(path, n_vocab, cfg.threads)
            entry.update(compare(ref_logits, scorer, windows))
            if hasattr(scorer, "close"):
                scorer.close()
            bar.advance(task)
    result = reference_quality(ref_logits, windows)
    del ref_logits, store
    scratch.cleanup()
    return {"reference": {"runtime": "torch fp32", **result},
            "eval": {"tokens": sum(len(w) - 1 for w in windows), "window": n_ctx,
                     "source": cfg.valid or "held-out text of the embedded corpus"}}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{report['name']}: {report['params']:,} parameters", title_style="bold")
    for c in QUANTIZE_COLUMNS:
        t.add_column(c, justify="left" if c == "type" else "right", no_wrap=True)
    for row in quantize_rows(report):
        t.add_row(*row)
    Console(stderr=True, highlight=False, width=max(err.width, 100)).print(t)
    info(f"quantize: {plural(len(report['types']), 'file')}; quantize.json has the numbers")
