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

import json
from pathlib import Path

from slm.errors import SlmError

SKIP = {"checkpoints", "energy", "lm-eval", "shards", "windows", "train_state", "tasks"}
TRAINING = ("pretrain", "cooldown", "sft", "dpo", "selfknow")


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlmError(f"{path}: not readable JSON ({e})") from None
    return data if isinstance(data, dict) else None


def _kind(d: Path) -> str | None:
    m = d / "manifest.json"
    if not m.is_file():
        return None
    data = _json(m)
    return data.get("kind") if data else None


def _run_stage(run: Path) -> str:
    """The stage a run directory trained, as its newest checkpoint's manifest says (else the directory's name)."""
    from slm.formats.checkpoint import Checkpoint

    try:
        stage = (Checkpoint.open(run).manifest or {}).get("stage")
    except SlmError:
        stage = None
    return str(stage or run.name)


def last_metrics(run: Path) -> dict:
    """A run's last training step and last validation, from RUN/metrics.jsonl."""
    last_train, last_valid, first_valid = None, None, None
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SlmError(f"{run / 'metrics.jsonl'}: not readable ({e})") from None
    for i, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                continue  # a line being written when the run was stopped
            raise SlmError(f"{run / 'metrics.jsonl'}:{i}: not a JSON line") from None
        if not isinstance(r, dict):
            continue
        if "loss" in r:
            last_train = r
        if "valid_loss" in r:
            first_valid = first_valid or r
            last_valid = r
    out = {"run": str(run)}
    if last_train:
        out.update(step=last_train.get("step"), loss=last_train.get("loss"), lr=last_train.get("lr"))
    if last_valid:
        out.update(valid_loss=last_valid["valid_loss"], valid_step=last_valid.get("step"),
                   unigram_loss=last_valid.get("unigram_loss"), tokens_seen=last_valid.get("tokens_seen"),
                   first_valid_loss=first_valid["valid_loss"])
    return out


def collect(root: Path, depth: int = 3) -> dict:
    """Every part of the report found under ROOT, as plain data (what --json prints)."""
    root = Path(root)
    if not root.is_dir():
        raise SlmError(f"{root}: no such directory")
    report: dict = {"root": str(root.absolute()), "training": [], "dpo": [], "selfknow": [], "quantize": [],
                    "bench": [], "eval": [], "carbon": []}

    def walk(d: Path, left: int) -> None:
        kind = _kind(d)
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


def _f(x, spec: str, missing: str = "-") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else missing


def render(report: dict) -> str:
    """The report as Markdown."""
    out = [f"# slm report: {report['root']}", ""]
    if report["training"]:
        out += ["## Training", "", "| stage | run | steps | tokens | train loss | held-out loss | unigram baseline |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for e in report["training"]:
            step = e.get("step")
            out.append(f"| {e['stage']} | {e['dir']} | {_f(step + 1 if isinstance(step, int) else None, ',')} | "
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
        out += ["## Self-knowledge", "",
                f"{e.get('questions', '?')} held-out questions ({e['dir']}), answered with no system prompt: the "
                f"name {e.get('name', '?')!s} in {_f(before.get('name'), '.0%')} before, "
                f"**{_f(after.get('name'), '.0%')} after**; the maker {e.get('maker', '?')!s} in "
                f"{_f(before.get('maker'), '.0%')} before, **{_f(after.get('maker'), '.0%')} after**."]
        if sample:
            out += ["", f"> {sample.get('question', '')}  ", f"> {sample.get('answer', '')}"]
        out.append("")
    for e in report["quantize"]:
        out += [f"## Quantization ({e['dir']})", "", "| type | size | bits/weight | perplexity | KL vs fp32 | "
                "top-1 agreement |", "|---|---:|---:|---:|---:|---:|"]
        ref = e.get("reference") or {}
        if ref:
            out.append(f"| fp32 (torch) | - | 32 | {_f(ref.get('perplexity'), '.3f')} | 0 | 100% |")
        for kind, t in (e.get("types") or {}).items():
            out.append(f"| {kind} | {_f((t.get('bytes') or 0) / 1e6, ',.2f')} MB | "
                       f"{_f(t.get('bits_per_weight'), '.2f')} | {_f(t.get('perplexity'), '.3f')} | "
                       f"{_f(t.get('kl_mean'), '.5f')} | {_f(t.get('top1_agreement'), '.1%')} |")
        out.append("")
    for e in report["bench"]:
        from slm.stages.bench import render as bench_render

        try:
            table = bench_render(e, "md")
        except (KeyError, TypeError):
            raise SlmError(f"{Path(report['root']) / e['dir'] / 'bench.json'}: not a bench report") from None
        out += [f"## Speed ({e['dir']})", "", table, ""]
    for e in report["eval"]:
        from slm.stages.eval import render as eval_render

        try:
            table = eval_render(e)
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
