"""The energy meter every computing stage runs: codecarbon's offline tracker, one per node.

`slm` starts a meter around each computing command (slm.cli.main). It measures the whole machine (codecarbon's
"machine" mode: CPU through RAPL when the kernel exposes it, else the CPU's TDP scaled by load; GPUs through NVML;
RAM estimated from its size) and only in the process with local rank 0, so a SLURM job with eight ranks per node is
counted once per node, not eight times (codecarbon's known pitfall when every rank runs a tracker).

Where the reading goes:
- stages that write one directory (tokenize, quantize, bench, eval, ...): the stage stops the meter with `take()` as
  it writes its manifest, which gets `energy` (the record below) and `energy_kwh`;
- training runs (pretrain, cooldown, sft, dpo, selfknow train), which can be stopped and resumed: each process with
  local rank 0 writes RUN/energy/<start>-<host>-<pid>.json when it ends (by finishing or after a signal), so a run's
  energy is the sum over its sessions and nodes (`slm carbon` adds them up).

A record: stage, host, energy_kwh (cpu_kwh, gpu_kwh, ram_kwh), duration_s, device ("gpu" or "cpu" and the model),
devices, device_hours, method (how CPU, GPU and RAM were measured), country_iso_code, region, intensity_kg_per_kwh
(codecarbon's grid intensity for that place), kg_co2eq (energy x intensity; PUE 1: `slm carbon --pue` applies one),
codecarbon's version. SLM_ENERGY=off turns the meter off; SLM_COUNTRY (ISO 3166 alpha-3, e.g. USA, FRA) and
SLM_REGION (a US state, a Canadian province, a Nordic zone) say where the machine is (default: codecarbon's world
average).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import time
from pathlib import Path

from slm.formats.manifest import write_json

TRAINING = {"pretrain", "cooldown", "sft", "dpo", "selfknow train"}

_active: "Meter | None" = None


def local_rank() -> int:
    env = os.environ
    try:
        return int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    except ValueError:
        return 0


def enabled() -> bool:
    return os.environ.get("SLM_ENERGY", "on").lower() not in ("off", "0", "false", "no")


def _tracker_class():
    """codecarbon's OfflineEmissionsTracker. Under SLURM codecarbon counts the job's CPUs with `scontrol show job`,
    reading SLURM_JOB_ID when it is imported; without scontrol on PATH its tracker then fails to start and measures
    nothing, so it is imported without SLURM_JOB_ID and counts the machine's CPUs (said on stderr)."""
    import shutil
    import sys

    names = [k for k in ("SLURM_JOB_ID", "SLURM_JOBID") if k in os.environ]
    if not names or "codecarbon" in sys.modules or shutil.which("scontrol"):
        from codecarbon import OfflineEmissionsTracker

        return OfflineEmissionsTracker
    from slm.console import warn

    warn("energy: SLURM_JOB_ID is set but scontrol is not on PATH: codecarbon counts the machine's CPUs, not the "
         "job's")
    saved = {k: os.environ.pop(k) for k in names}
    try:
        from codecarbon import OfflineEmissionsTracker
    finally:
        os.environ.update(saved)
    return OfflineEmissionsTracker


class Meter:
    """with Meter("pretrain"): ... measures the node (local rank 0 only; elsewhere it does nothing)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.tracker = None
        self.record: dict | None = None
        self.run_dir: Path | None = None
        self.started_utc = ""

    def __enter__(self) -> "Meter":
        global _active
        if not enabled() or local_rank() != 0:
            return self
        try:
            os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")
            OfflineEmissionsTracker = _tracker_class()
        except ImportError:
            return self
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        country = os.environ.get("SLM_COUNTRY") or None
        region = os.environ.get("SLM_REGION") or None
        self.tracker = OfflineEmissionsTracker(
            country_iso_code=country, region=region, tracking_mode="machine", measure_power_secs=15,
            output_methods=[], log_level="error", allow_multiple_runs=True, project_name=f"slm-{self.stage}")
        self.started_utc = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.t0 = time.time()
        self.tracker.start()
        _active = self
        return self

    def stop(self) -> dict | None:
        """Stop measuring (once) and return the record (None when nothing was measured)."""
        global _active
        if self.tracker is None or self.record is not None:
            return self.record
        self.tracker.stop()
        _active = None if _active is self else _active
        data = getattr(self.tracker, "final_emissions_data", None)
        if data is None:
            from slm.console import warn

            warn(f"energy: codecarbon measured nothing for `slm {self.stage}` (its tracker did not start; "
                 "CODECARBON_LOG_LEVEL=warning shows why): `slm carbon` will not count this command")
            return None
        self.record = make_record(self.stage, data, self.tracker, time.time() - self.t0)
        self.record["started_utc"] = _dt.datetime.fromtimestamp(self.t0, _dt.timezone.utc).isoformat(
            timespec="seconds")
        return self.record

    def __exit__(self, *exc) -> None:
        record = self.stop()
        if record is not None and self.run_dir is not None and self.run_dir.is_dir():
            d = self.run_dir / "energy"
            d.mkdir(exist_ok=True)
            write_json(d / f"{self.started_utc}-{record['host']}-{os.getpid()}.json", record)


def make_record(stage: str, data, tracker, wall: float) -> dict:
    import codecarbon

    cpu_mode, gpu = "unknown", False
    for hw in getattr(tracker, "_hardware", []) or []:
        kind = type(hw).__name__
        if kind == "CPU":
            cpu_mode = {"intel_rapl": "RAPL (measured)", "cpu_load": "TDP x load (estimated)",
                        "constant": "TDP / 2 (estimated)"}.get(getattr(hw, "_mode", ""), getattr(hw, "_mode", "?"))
        elif kind in ("GPU", "AMDGPU"):
            gpu = True
    gpus = int(data.gpu_count or 0) if gpu else 0
    hours = float(data.duration) / 3600
    energy = float(data.energy_consumed)
    return {"stage": stage, "host": socket.gethostname(), "scope": "node (local rank 0, whole machine)",
            "energy_kwh": energy, "cpu_kwh": float(data.cpu_energy), "gpu_kwh": float(data.gpu_energy),
            "ram_kwh": float(data.ram_energy), "duration_s": float(data.duration), "device": "gpu" if gpus else "cpu",
            "device_model": (data.gpu_model if gpus else data.cpu_model) or "", "devices": gpus or 1,
            "device_hours": (gpus or 1) * hours, "method": {"cpu": cpu_mode, "gpu": "NVML (measured)" if gpus else None,
                                                           "ram": "estimated from memory size (codecarbon)"},
            "country_iso_code": data.country_iso_code or None, "region": data.region or None,
            "intensity_kg_per_kwh": float(data.emissions) / energy if energy > 0 else None,
            "kg_co2eq": float(data.emissions), "pue_applied": float(data.pue or 1.0),
            "codecarbon_version": codecarbon.__version__}


def attach(run_dir: Path | None) -> None:
    """A training run: the active meter writes its record into RUN_DIR/energy/ when the process ends (None: a run
    that was discarded, nowhere)."""
    if _active is not None and _active.stage in TRAINING:
        _active.run_dir = Path(run_dir) if run_dir is not None else None


def take() -> dict | None:
    """Stop the active meter and return its record (a one-directory stage writing its manifest)."""
    if _active is None or _active.stage in TRAINING:
        return None
    return _active.stop()
