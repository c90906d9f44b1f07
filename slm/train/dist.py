"""Processes: who this process is (rank, world, device) from the launcher's environment, the process group, and the
few collectives the stages use (sums, a flag on any rank, rank 0's object, a barrier).

torchrun and the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK; srun sets SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID (MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST, MASTER_PORT to one derived from the
job id). On one process every collective is the identity, so stages call them unconditionally.
"""

from __future__ import annotations

import functools
import gc
import os
import subprocess
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from slm import energy
from slm.console import set_rank
from slm.errors import Stopped
from slm.formats.checkpoint import check_run_dir, discard_failed_run


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodes:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "127.0.0.1"


def setup(device: str = "auto") -> Dist:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1").split("(")[0]) or 1)
        env.setdefault("MASTER_ADDR", _slurm_master())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local_rank)
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
    set_rank(rank, world)
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device not in ("auto", "cuda", "cpu"):
        use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
        if world > 1:  # share the cores between the processes of a node
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return Dist(rank, world, local_rank, local_world, dev)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, d: Dist) -> bool:
    if not d.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, d: Dist):
    """Rank 0's OBJ on every rank (a small picklable value: a path, a message)."""
    if not d.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


def teardown(d: Dist) -> None:
    # What the run left in reference cycles (engines, their communication handles) goes now, while the process
    # group and the interpreter are whole, not at interpreter shutdown.
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()




def per_process(stage: Callable) -> Callable:
    """run(cfg) of a training stage: STAGE(cfg, d) for this process (on cfg.device), the process group torn
    down after it, whatever happens. cfg.out must be a run directory (slm.formats.checkpoint.check_run_dir); one
    this call started that fails before its first checkpoint is removed (a stop that saved is not a failure)."""
    @functools.wraps(stage)
    def run(cfg):
        was = check_run_dir(cfg.out) if cfg.out is not None else "run"
        d = setup(cfg.device)
        try:
            return stage(cfg, d)
        except BaseException as e:
            if was != "run" and d.main and not isinstance(e, Stopped) and discard_failed_run(cfg.out, was):
                energy.attach(None)
            raise
        finally:
            teardown(d)
    return run
