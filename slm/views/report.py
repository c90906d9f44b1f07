"""`slm report DIR`: one summary of everything slm made under DIR, from the files each stage wrote.

What it reads (each part is left out when DIR has nothing for it):
    training runs        RUN/metrics.jsonl (the last held-out loss and the unigram baseline, the last training
                         loss, steps, tokens) and the stage of the newest checkpoint's manifest
    DPO                  RUN/dpo.json: held-out preference accuracy before and after, reward accuracy
    self-knowledge       RUN/selfknow.json: the share of held-out questions answered with the name / maker
    quantize             quantize.json: size, bits per weight, perplexity, KL and top-1 agreement per file
    bench                bench.json: prompt and generation tokens/s, memory, share of the bandwidth bound
    eval                 eval.json: the score table
    carbon               carbon.json: energy and CO2eq in total, and the model-card paragraph

The quickstart ends with it; a pipeline of one's own can too. Nothing is computed again: a part that looks wrong
is wrong in the file it came from, which the report names.
"""

from __future__ import annotations

from pathlib import Path

from slm.errors import SlmError
from slm.formats.manifest import manifest_of, read_json, write_text
from slm.formats.metrics import last_metrics
from slm.formats.tables import QUANTIZE_COLUMNS, markdown, quantize_rows, render_bench, render_eval, number as _f

SKIP = {"checkpoints", "energy", "lm-eval", "shards", "windows", "train_state", "tasks"}
TRAINING = ("pretrain", "cooldown", "sft", "dpo", "selfknow")


def _json(path: Path) -> dict | None:
    data = read_json(path)
    return data if isinstance(data, dict) else None


def _run_stage(run: Path) -> str:
    """The stage a run directory trained, as its newest checkpoint's manifest says (else the directory's name)."""
    from slm.formats.checkpoint import Checkpoint

    try:
        stage = (Checkpoint.open(run).manifest or {}).get("stage")
    except SlmError:
        stage = None
    return str(stage or run.name)


def collect(root: Path, depth: int = 3) -> dict:
    """Every part of the report found under ROOT, as plain data (what --json prints)."""
    root = Path(root)
    if not root.is_dir():
        raise SlmError(f"{root}: no such directory")
    report: dict = {"root": str(root.absolute()), "training": [], "dpo": [], "selfknow": [], "quantize": [],
                    "bench": [], "eval": [], "carbon": []}

    def walk(d: Path, left: int) -> None:
        kind = (manifest_of(d) or {}).get("kind")
        if (d / "metrics.jsonl").is_file() and (d / "checkpoints").is_dir():
            entry = last_metrics(d)
            entry["stage"] = _run_stage(d)
            entry["dir"] = _rel(d, root)
            report["training"].append(entry)
            for name, key in (("dpo.json", "dpo"), ("selfknow.json", "selfknow")):
                if (d / name).is_file():
                    data = _json(d / name) or {}
                    report[key].append({"dir": _rel(d, root), **data})
            return
        for k, name in (("quantize", "quantize.json"), ("bench", "bench.json"), ("eval", "eval.json"),
                        ("carbon", "carbon.json")):
            if kind == k and (d / name).is_file():
                report[k].append({"dir": _rel(d, root), **(_json(d / name) or {})})
                return
        if left == 0:
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and p.name not in SKIP and ".tmp-" not in p.name
                          and not p.name.endswith(".partial")):
            walk(sub, left - 1)

    walk(root, depth)
    order = {s: i for i, s in enumerate(TRAINING)}
    report["training"].sort(key=lambda e: (order.get(e["stage"].split()[0], len(order)), e["dir"]))
    if not any(report[k] for k in report if k != "root"):
        raise SlmError(f"{root}: nothing slm wrote was found here (training runs, quantize, bench, eval or carbon "
                       "directories)")
    return report


def _rel(d: Path, root: Path) -> str:
    try:
        return str(d.relative_to(root)) or "."
    except ValueError:
        return str(d)


def render(report: dict) -> str:
    """The report as Markdown."""
    out = [f"# slm report: {report['root']}", ""]
    if report["training"]:
        out += ["## Training", "", "| stage | run | steps | tokens | train loss | held-out loss | unigram baseline |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for e in report["training"]:
            step = e.get("step")
            out.append(f"| {e['stage']} | {e['dir']} | {_f(step, ',')} | "
                       f"{_f(e.get('tokens_seen'), ',')} | {_f(e.get('loss'), '.3f')} | "
                       f"{_f(e.get('valid_loss'), '.3f')} | {_f(e.get('unigram_loss'), '.3f')} |")
        out.append("")
    for e in report["dpo"]:
        out += ["## DPO", "", f"Held-out preference accuracy ({e.get('valid_pairs', '?')} pairs, {e['dir']}): "
                f"{_f(e.get('preference_accuracy_before'), '.0%')} before, "
                f"**{_f(e.get('preference_accuracy_after'), '.0%')} after**; reward accuracy "
                f"{_f(e.get('reward_accuracy'), '.0%')}.", ""]
    for e in report["selfknow"]:
        before, after = e.get("before") or {}, e.get("after") or {}
        sample = next(iter(after.get("answers") or []), None)
        first = next(iter(before.get("answers") or []), None)
        out += ["## Self-knowledge", "",
                f"{e.get('questions', '?')} held-out questions ({e['dir']}), answered with no system prompt: the "
                f"name {e.get('name', '?')!s} in {_f(before.get('name'), '.0%')} before, "
                f"**{_f(after.get('name'), '.0%')} after**; the maker {e.get('maker', '?')!s} in "
                f"{_f(before.get('maker'), '.0%')} before, **{_f(after.get('maker'), '.0%')} after**."]
        if sample:
            out += ["", f"> {sample.get('question', '')}  "]
            if first and first.get("question") == sample.get("question"):
                out += [f"> before: {first.get('answer', '')}  "]
            out += [f"> {'after: ' if first else ''}{sample.get('answer', '')}"]
        out.append("")
    for e in report["quantize"]:
        out += [f"## Quantization ({e['dir']})", ""] + markdown(QUANTIZE_COLUMNS, quantize_rows(e), "lrrrrr") + [""]
    for e in report["bench"]:
        try:
            table = render_bench(e, "md")
        except (KeyError, TypeError):
            raise SlmError(f"{Path(report['root']) / e['dir'] / 'bench.json'}: not a bench report") from None
        out += [f"## Speed ({e['dir']})", "", table, ""]
    for e in report["eval"]:
        try:
            table = render_eval(e)
        except (KeyError, TypeError):
            raise SlmError(f"{Path(report['root']) / e['dir'] / 'eval.json'}: not an eval report") from None
        out += [f"## Evaluation ({e['dir']}, suite {e.get('suite') or 'custom'})", "", table, ""]
    for e in report["carbon"]:
        total = e.get("total") or {}
        out += [f"## Carbon ({e['dir']})", "",
                f"{_f(total.get('energy_kwh'), '.6f')} kWh, {_f(total.get('kg_co2eq'), '.6f')} kg CO2eq over "
                f"{_f(total.get('device_hours'), '.3f')} device-hours.", ""]
        if e.get("model_card"):
            out += [e["model_card"], ""]
    return "\n".join(out).rstrip("\n") + "\n"


def write(path: Path, text: str) -> None:
    """--out: the Markdown report written atomically, or one line saying why it cannot be."""
    try:
        write_text(Path(path), text)
    except OSError as e:
        raise SlmError(f"--out {path}: cannot write ({e.strerror})") from None
