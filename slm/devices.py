"""One table of GPUs, for the planner (`--dry-run --gpu`), the MFU a run reports, and the carbon estimate (`slm
carbon estimate --gpu`): each GPU's dense tensor-core peak, memory and board power, from its vendor's datasheet.

The peak is dense bf16 with fp32 accumulation where the GPU has bf16, else dense fp16 (V100, T4: no bf16); the
datasheets' larger figures assume 2:4 sparsity. Power is the board power (TDP) of the variant named: SXM boards draw
more than PCIe cards of the same chip. A name missing here is still open to the user: `--power WATTS` for the
estimate, SLM_PEAK_TFLOPS for the MFU.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass

from slm.errors import UsageError


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float | None
    """Dense bf16 (else fp16) tensor FLOP/s; None where no datasheet gives it (then not for the planner)."""
    memory_gib: float
    power_w: float
    """Board power (TDP), watts."""
    device_name: str
    """What torch.cuda.get_device_name() contains for it (the table is searched in order: longer names first)."""


GPUS = {g.name: g for g in [
    # NVIDIA H200 / H100 SXM: 989 TFLOPS dense bf16, 700 W; H100 PCIe: 756 TFLOPS, 350 W.
    Gpu("h200", 989e12, 141, 700, "H200"),
    Gpu("h100-pcie", 756e12, 80, 350, "H100 PCIe"),
    Gpu("h100", 989e12, 80, 700, "H100"),
    # A100: 312 TFLOPS dense bf16; SXM 400 W, PCIe 250 W (40 GB) / 300 W (80 GB).
    Gpu("a100-80gb-pcie", 312e12, 80, 300, "A100 80GB PCIe"),
    Gpu("a100-40gb-pcie", 312e12, 40, 250, "A100-PCIE-40GB"),
    Gpu("a100-80gb", 312e12, 80, 400, "A100-SXM4-80GB"),
    Gpu("a100-40gb", 312e12, 40, 400, "A100"),
    Gpu("l40s", 362e12, 48, 350, "L40S"),
    Gpu("l40", 181e12, 48, 300, "L40"),
    Gpu("a10g", None, 24, 150, "A10G"),  # AWS's variant of the A10: no public datasheet peak
    Gpu("a10", 125e12, 24, 150, "A10"),
    Gpu("l4", 121e12, 24, 72, "L4"),
    Gpu("rtx-4090", 165e12, 24, 450, "4090"),
    Gpu("rtx-3090", 71e12, 24, 350, "3090"),
    Gpu("v100-pcie", 112e12, 32, 250, "V100-PCIE"),
    Gpu("v100", 125e12, 32, 300, "V100"),  # fp16 tensor cores
    Gpu("t4", 65e12, 16, 70, "T4"),  # fp16 tensor cores
    # AMD Instinct: MI250X 383 TFLOPS bf16, 128 GB, 560 W; MI300X 1307 TFLOPS, 192 GB, 750 W.
    Gpu("mi300x", 1307e12, 192, 750, "MI300X"),
    Gpu("mi250x", 383e12, 128, 560, "MI250X"),
]}

# Names people use for the same boards.
ALIASES = {"a100": "a100-80gb", "a100-sxm": "a100-80gb", "h100-sxm": "h100", "h200-sxm": "h200", "4090": "rtx-4090",
           "3090": "rtx-3090", "a100-pcie": "a100-80gb-pcie"}


def gpu(name: str, option: str = "--gpu", planning: bool = False) -> Gpu:
    """The GPU NAME names (a name or an alias, any case); PLANNING: one with a known peak. A usage error lists the
    names otherwise."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    g = GPUS.get(key)
    usable = [n for n, x in GPUS.items() if x.peak_flops is not None or not planning]
    if g is None or g.name not in usable:
        why = "no datasheet peak FLOPs for it" if g is not None else "unknown"
        raise UsageError(f"{option} {name!r}: {why}; expected one of {', '.join(usable)} (or an alias: "
                         f"{', '.join(f'{a} = {b}' for a, b in ALIASES.items())})")
    return g


def gpu_of_device(device_name: str) -> Gpu | None:
    """The table's GPU whose device name DEVICE_NAME (torch.cuda.get_device_name) contains, or None."""
    for g in GPUS.values():
        if g.device_name in device_name:
            return g
    return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's instruction-set flags (Linux: the first `flags` line of /proc/cpuinfo); empty where there is none."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (what taskset, SLURM's cpus-per-task and torch
    see), or os.cpu_count() where the OS has no affinity call (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM (the high-water mark of its own address space; getrusage's
    ru_maxrss would also count what the parent held when it started this process, the bandwidth probe's GiB),
    else ru_maxrss (kilobytes on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
