"""Throughput, MFU, memory and the loss-curve plot (from metrics.jsonl, slm.formats.metrics)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from slm.devices import gpu_of_device, peak_rss_bytes
from slm.formats.metrics import read_metrics
from slm.formats.tables import save_figure

# GPUs by the names --gpu takes: peak dense bf16 tensor-core FLOP/s (vendor data sheets, without sparsity) and
# memory in GiB. MFU is measured against these peaks; --dry-run plans with them.


def peak_flops(device: torch.device) -> float | None:
    """Per-device peak, or SLM_PEAK_TFLOPS; None on CPUs and unknown GPUs (MFU is then not reported)."""
    if os.environ.get("SLM_PEAK_TFLOPS"):
        return float(os.environ["SLM_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    g = gpu_of_device(torch.cuda.get_device_name(device))
    return g.peak_flops if g is not None else None


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30  # ru_maxrss alone is KiB on Linux but bytes on macOS


def plot(run_dir: Path, out: Path | None = None) -> Path | None:
    """loss.png: training loss (and validation loss) against tokens seen, the task scores (train.eval_tasks) and the
    learning rate under it."""
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "valid_loss" in r]
    scored = [r for r in rows if "task_scores" in r]
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if scored:
        fig, (ax, ax_tasks, ax_lr) = plt.subplots(3, 1, figsize=(8, 8), sharex=True,
                                                  gridspec_kw={"height_ratios": [3, 2, 1]})
        for task in dict.fromkeys(k for r in scored for k in r["task_scores"]):
            pts = [(r["tokens_seen"], r["task_scores"][task]) for r in scored if task in r["task_scores"]]
            ax_tasks.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=task)
        ax_tasks.set_ylabel("task score")
        ax_tasks.legend(fontsize="small")
        ax_tasks.grid(alpha=0.3)
    else:
        fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    x = [r["tokens_seen"] for r in train]
    ax.plot(x, [r["loss"] for r in train], lw=0.8, label="train")
    if valid:
        ax.plot([r["tokens_seen"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid")
        if valid[0].get("unigram_loss"):
            ax.axhline(valid[0]["unigram_loss"], ls="--", color="gray", label="unigram baseline (valid)")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(x, [r["lr"] for r in train], color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("tokens seen")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    return save_figure(fig, Path(out or Path(run_dir) / "loss.png"))
