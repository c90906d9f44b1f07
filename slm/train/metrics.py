"""Throughput, MFU, memory and the loss-curve plot (from metrics.jsonl, slm.formats.metrics)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

from slm.formats.metrics import read_metrics
from slm.formats.tables import save_figure

# GPUs by the names --gpu takes: peak dense bf16 tensor-core FLOP/s (vendor data sheets, without sparsity) and
# memory in GiB. MFU is measured against these peaks; --dry-run plans with them.
GPUS = {
    "h200": (989e12, 141), "h100": (989e12, 80), "h100-pcie": (756e12, 80), "a100-80gb": (312e12, 80),
    "a100-40gb": (312e12, 40), "l40s": (362e12, 48), "a10": (125e12, 24), "l4": (121e12, 24),
    "rtx-4090": (165e12, 24), "rtx-3090": (71e12, 24),
}
# How torch.cuda.get_device_name() names them (first match wins); V100: fp16 tensor cores (no bf16).
PEAK_FLOPS = [("H200", GPUS["h200"][0]), ("H100 PCIe", GPUS["h100-pcie"][0]), ("H100", GPUS["h100"][0]),
              ("A100", GPUS["a100-80gb"][0]), ("L40S", GPUS["l40s"][0]), ("A10", GPUS["a10"][0]),
              ("L4", GPUS["l4"][0]), ("4090", GPUS["rtx-4090"][0]), ("3090", GPUS["rtx-3090"][0]), ("V100", 125e12)]


def peak_flops(device: torch.device) -> float | None:
    """Per-device peak, or SLM_PEAK_TFLOPS; None on CPUs and unknown GPUs (MFU is then not reported)."""
    if os.environ.get("SLM_PEAK_TFLOPS"):
        return float(os.environ["SLM_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return None


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def plot(run_dir: Path, out: Path | None = None) -> Path | None:
    """loss.png: training loss (and validation loss) against tokens seen, learning rate beside it."""
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "valid_loss" in r]
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
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
