"""The result tables stages print and `slm report` collects, rendered from the JSON the stages wrote (bench.json,
eval.json, quantize.json): one function per table, so a stage's own output and the report can never disagree."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path


def human(n: float) -> str:
    """1234567 -> '1.23M' (k, M, B, T, P, E)."""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f}{unit}"
    return f"{n:,.0f}"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 step', '2 steps', '1 process', '3 processes', '1,000 micro-batches' (MANY: an irregular plural)."""
    if n == 1:
        return f"1 {word}"
    return f"{n:,} {many or word + ('es' if word.endswith(('s', 'x', 'ch', 'sh')) else 's')}"


def number(x, spec: str, missing: str = "-") -> str:
    """X formatted with SPEC, or MISSING when it is not a number (a field a file lacks)."""
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else missing


def markdown(columns: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """A Markdown table's lines; ALIGN: one letter per column, l or r (default: all l, as `---`)."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in (align or "l" * len(columns)))
    return ["| " + " | ".join(columns) + " |", rule] + ["| " + " | ".join(r) + " |" for r in rows]


# --- bench.json --------------------------------------------------------------------------------------------------
BENCH_COLUMNS = ["model", "backend", "size", "pp t/s", "tg t/s", "ttft ms", "peak MB", "bound t/s", "of bound"]


def bench_rows(report: dict) -> list[list[str]]:
    out = []
    for r in report["results"]:
        tg = r["tg_tokens_per_s"]
        out.append([Path(r["model"]).name, r["backend"], f"{r['file_bytes'] / 1e6:.1f} MB",
                    f"{r['pp_tokens_per_s']['mean']:.1f} ± {r['pp_tokens_per_s']['std']:.1f}",
                    f"{tg['mean']:.1f} ± {tg['std']:.1f}" if tg else "-",
                    f"{r['ttft_s']['mean'] * 1e3:.1f}", f"{r['peak_rss_bytes'] / 1e6:.0f}",
                    f"{r['bandwidth_bound_tokens_per_s']:.0f}",
                    f"{r['bound_fraction']:.0%}" if r["bound_fraction"] is not None else "-"])
    return out


def render_bench(report: dict, fmt: str = "md") -> str:
    """bench.json as md (a line on the machine and settings, then the table), json or csv."""
    if fmt == "json":
        return json.dumps(report, indent=2)
    rows = bench_rows(report)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(BENCH_COLUMNS)
        w.writerows(rows)
        return buf.getvalue().rstrip("\n")
    d = report["device"]
    s = report["settings"]
    head = (f"{d['cpu']}, {d['threads']} threads{', ' + d['gpu'] if d['gpu'] else ''}; memory bandwidth "
            f"{d['bandwidth_gb_s']} GB/s ({d['bandwidth_source']}); prompt {s['prompt']}, gen {s['gen']}, "
            f"batch {s['batch']}, {s['repeat']} repeats")
    cpus = sorted({r["llama_cpp_cpu"] for r in report["results"] if r.get("llama_cpp_cpu")})
    if cpus:
        head += f"; llama.cpp CPU backend: {', '.join(cpus)}"
    return "\n".join([head, ""] + markdown(BENCH_COLUMNS, rows))


# --- eval.json ---------------------------------------------------------------------------------------------------
def _score(score: dict) -> str:
    v, se = score["value"], score["stderr"]
    metric = score["metric"].split(",")[0]
    scale = 100 if metric.startswith(("acc", "exact_match", "prompt_level", "inst_level")) else 1
    text = f"{v * scale:.2f}" if scale == 100 else f"{v:.4g}"
    return text + (f" ± {se * scale:.2f}" if se is not None and scale == 100 else "")


def render_eval(report: dict) -> str:
    """eval.json's score table (a row per model, a column per task) and the MT-Bench-style table."""
    specs = report["tasks"]
    lines = []
    if specs:
        first = report["models"][0]["scores"] if report["models"] else {}
        heads = [f"{s['task']} ({first.get(s['task'], {}).get('metric', s['metric'] or '').split(',')[0]}, "
                 f"{first.get(s['task'], {}).get('shots', s['shots'])}-shot)" for s in specs]
        lines += markdown(["model"] + heads, [[m["label"]] + [_score(m["scores"][s["task"]]) for s in specs]
                                              for m in report["models"]])
    mt = report.get("mt_bench")
    if mt:
        cats = sorted({c for m in mt["models"] for c in m["per_category"]})
        rows = [[m["label"], f"{m['mean']:.2f}" if m["mean"] is not None else "-"]
                + [f"{m['per_category'][c]:.2f}" if m["per_category"].get(c) is not None else "-" for c in cats]
                + [f"{m['judged']}/{m['turns']}"] for m in mt["models"]]
        lines += [""] + markdown([f"model (MT-Bench-style, judge {mt['judge']})", "mean"] + cats + ["judged"], rows)
    return "\n".join(lines)


# --- quantize.json -----------------------------------------------------------------------------------------------
QUANTIZE_COLUMNS = ["type", "size", "bits/weight", "perplexity", "KL vs fp32", "top-1 agreement"]


def quantize_rows(report: dict) -> list[list[str]]:
    """The fp32 reference (when scored), then one row per file: size, bits per weight and the quality numbers."""
    rows = []
    ref = report.get("reference") or {}
    if ref:
        rows.append(["fp32 (torch)", "-", "32", number(ref.get("perplexity"), ".3f"), "0", "100%"])
    for kind, t in (report.get("types") or {}).items():
        rows.append([kind, f"{number((t.get('bytes') or 0) / 1e6, ',.2f')} MB", number(t.get("bits_per_weight"), ".2f"),
                     number(t.get("perplexity"), ".3f"), number(t.get("kl_mean"), ".5f"),
                     number(t.get("top1_agreement"), ".1%")])
    return rows


# --- charts ------------------------------------------------------------------------------------------------------
def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure as a PNG, written to a temporary name and renamed into place."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def bar_chart(path: Path, ticks: list[str], series: dict[str, list[float]], ylabel: str = "",
              rotation: int = 0) -> None:
    """Grouped bars: one group per tick, one bar per series, into the PNG at PATH."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(ticks) + 1), 4))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(ticks))], values, width, label=label)
    ax.set_xticks(range(len(ticks)), ticks, rotation=rotation, ha="right" if rotation else "center")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
