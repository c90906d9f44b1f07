"""Engines: how the step's forward, backward and update run on one process or many, and how a checkpoint's full
state is gathered from them and put back.

    single      one process
    ddp         torch DistributedDataParallel (gloo on CPUs, nccl on GPUs); the default when WORLD_SIZE > 1
    fsdp        torch's fully_shard (FSDP2): parameters, gradients and AdamW moments sharded over the processes;
                with bf16 it gathers bf16 parameters and reduces gradients in fp32
    deepspeed   DeepSpeed ZeRO stage 1, 2 or 3 (StableLM 2 trained with ZeRO-1), configured from train.* or a
                user's JSON (train.deepspeed_config), with slm's AdamW (a torch optimizer: nothing to compile)

Processes come from the environment (slm.train.dist).

Whatever the engine, a checkpoint holds full tensors under the model's own parameter names: the weights and
train_state/optimizer.safetensors (slm.formats.checkpoint). Any engine on any number of processes reads them back,
which is what lets a run resume on another number of GPUs or move from DDP to DeepSpeed.

Every engine computes the same step: the gradient of (sum of token losses over every micro-batch and process) /
(the step's token count), clipped to train.grad_clip, then AdamW. A step whose loss or gradient norm is not
finite is skipped: the weights and moments stay as they were (slm.train.loop counts it).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from slm.console import stdout_to_stderr, warn
from slm.devices import cpu_flags
from slm.errors import SlmError
from slm.formats.checkpoint import MOMENTS, OptimizerState
from slm.train.config import ENGINES, TrainSettings
from slm.train.dist import Dist


def resolve_engine(name: str, d: Dist) -> str:
    if name not in ENGINES:
        raise SlmError(f"train.engine: expected one of {', '.join(ENGINES)}, got {name!r}")
    if name == "auto":
        return "ddp" if d.distributed else "single"
    if name == "ddp" and not d.distributed:
        return "single"  # DDP over one process is the plain loop
    if name == "single" and d.distributed:
        raise SlmError(f"train.engine single: this is process {d.rank} of {d.world}; use ddp, fsdp or deepspeed "
                       "under torchrun / srun")
    return name


def _one_process_group(d: Dist) -> None:
    """fsdp and deepspeed need a process group even on one process: a group of one over a free local port."""
    if dist.is_initialized():
        return
    backend = "nccl" if d.device.type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:  # a launcher's (torchrun's store included)
        dist.init_process_group(backend=backend, init_method="env://", rank=0, world_size=1)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


# -- the optimizer -------------------------------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and embeddings, none on biases and norms (GPT-NeoX, nanotron)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": t.lr_peak, "betas": tuple(t.betas), "eps": t.eps}
    try:  # one fused kernel per step (CUDA; CPUs since torch 2.4): about 5x faster than the foreach version on a CPU
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def optimizer_order(model: torch.nn.Module) -> list[str]:
    """Parameter names in the order make_optimizer hands them to AdamW (to read checkpoints that stored torch's
    state_dict by index)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]


def check_optimizer_state(state: OptimizerState, model: torch.nn.Module, where: str) -> None:
    """Every parameter of MODEL has both moments in STATE, of its shape (before any engine changes anything)."""
    for name, p in model.named_parameters():
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)  # ZeRO-3 empties p itself
        saved = state.moments.get(name)
        if saved is None or any(k not in saved for k in MOMENTS):
            raise SlmError(f"{where}: the optimizer state has no moments for {name}")
        for key in MOMENTS:
            if tuple(saved[key].shape) != shape:
                raise SlmError(f"{where}: the optimizer state of {name} ({key}) has shape "
                               f"{tuple(saved[key].shape)}, the model's parameter has {shape}")


# -- engines -------------------------------------------------------------------------------------------------------

CPUINFO = "/proc/cpuinfo"


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX, read from /proc/cpuinfo).

    There bf16 autocast is faster than fp32 (measured on an AMD EPYC with avx512_bf16: 419 against 171 GFLOP/s on
    two threads; benchmarks/train_step.py prints the step's ratio); elsewhere torch emulates bf16 and is many times
    slower (an AVX2-only EPYC: 0.85 against 63 GFLOP/s), so `auto` keeps fp32 there."""
    return bool(cpu_flags(CPUINFO) & {"avx512_bf16", "amx_bf16"})


def compute_dtype(t: TrainSettings, device: torch.device) -> str:
    """fp32 or bf16: what train.dtype resolves to on DEVICE (auto: bf16 on a GPU or on a CPU with bf16 units)."""
    if t.dtype != "auto":
        return t.dtype
    if device.type == "cuda":
        return "bf16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


class Engine:
    """One process, or DDP. The other engines change what they must."""

    name = "single"

    def __init__(self, d: Dist, model: torch.nn.Module, t, accumulation: int):
        self.dist, self.model, self.t, self.accumulation = d, model, t, accumulation
        self.forward_model = self._wrap(model)
        self.optimizer = make_optimizer(model, t)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _wrap(self, model):
        if not self.dist.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        self.name = "ddp"
        d = self.dist
        # gradient_as_bucket_view: the gradients live in the all-reduce buckets (no second copy of them)
        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        """Let go of what the engine hangs on the model (hooks) once training is over."""

    # -- the step
    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def accumulating(self, last: bool):
        """Around the forward and backward of a micro-batch: DDP skips the all-reduce on all but the last."""
        if not last and hasattr(self.forward_model, "no_sync"):
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def finish_step(self, loss_ok: bool) -> tuple[float, bool]:
        """Clip and update; returns (gradient norm before clipping, whether the update was applied)."""
        clip = self.t.grad_clip if self.t.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under fsdp
            norm = norm.full_tensor()
        norm = float(norm)
        applied = loss_ok and math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    # -- full state, for checkpoints (collective: every rank calls; rank 0 gets the result, the others None)
    def full_weights(self) -> dict[str, torch.Tensor] | None:
        if not self.dist.main:
            return None
        return {k: v.detach().to("cpu", torch.float32) for k, v in self.model.state_dict().items()}

    def full_optimizer_state(self) -> OptimizerState | None:
        if not self.dist.main:
            return None
        names = {id(p): n for n, p in self.model.named_parameters()}
        moments, step = {}, 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                s = self.optimizer.state.get(p)
                if s:
                    moments[names[id(p)]] = {k: s[k].detach().to("cpu", torch.float32) for k in MOMENTS}
                    step = int(s["step"])
        return OptimizerState(step, moments)

    def load_optimizer_state(self, state: OptimizerState, where: str) -> None:
        """Put STATE (read on every rank) into this engine's optimizer; the hyper-parameters stay this run's."""
        if not state.moments:
            return
        check_optimizer_state(state, self.model, where)
        index = {id(p): n for n, p in self.model.named_parameters()}
        sd = self.optimizer.state_dict()
        per_index, i = {}, 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                saved = state.moments[index[id(p)]]
                per_index[i] = {"step": torch.tensor(float(state.step)), **{k: saved[k].to(p.dtype) for k in MOMENTS}}
                i += 1
        sd["state"] = per_index
        self.optimizer.load_state_dict(sd)  # moves and casts each tensor as the optimizer keeps it (fused: on device)


class FSDPEngine(Engine):
    name = "fsdp"

    def _wrap(self, model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        _one_process_group(self.dist)
        policy = MixedPrecisionPolicy()
        if compute_dtype(self.t, self.dist.device) == "bf16":
            # bf16 compute, fp32 master weights and gradient reduction (as StableLM 2: bf16 with fp32 all-reduce)
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.layers:  # one all-gather per block, freed again after its forward
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the embedding, final norm and output matrix
        return model

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # gradients are reduce-scattered every micro-batch: memory stays sharded

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**{"full_state_dict": True, "cpu_offload": True, **kw})

    def full_weights(self):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.model, options=self._options())
        return {k: v.to(torch.float32) for k, v in sd.items()} if self.dist.main else None

    def full_optimizer_state(self):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        if not self.dist.main:
            return None
        moments, step = {}, 0
        for name, s in osd["state"].items():
            moments[name] = {k: s[k].to(torch.float32) for k in MOMENTS}
            step = int(s["step"])
        return OptimizerState(step, moments)

    def load_optimizer_state(self, state, where):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if not state.moments:
            return
        check_optimizer_state(state, self.model, where)
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
                  for g in self.optimizer.param_groups]
        osd = {"state": {name: {"step": torch.tensor(float(state.step)), **state.moments[name]}
                         for name in names.values()}, "param_groups": groups}
        # Every rank read the file: each takes its own shard of the full tensors.
        set_optimizer_state_dict(self.model, self.optimizer, osd, options=self._options(cpu_offload=False))


STALE_LOCK_S = 600  # a build lock whose build directory has not changed for this long is left from a killed build


def extension_locks() -> list[Path]:
    """The `lock` files in torch's C++ extension build root (TORCH_EXTENSIONS_DIR, else torch's default): torch
    holds one while it builds an extension (DeepSpeed's ops), and a build that was killed leaves it behind."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return [p for pattern in ("*/lock", "*/*/lock") for p in Path(root).glob(pattern)]


def _idle_seconds(lock: Path) -> float:
    """Seconds since anything in LOCK's build directory changed (a build writes its objects there)."""
    try:
        newest = max(p.stat().st_mtime for p in lock.parent.iterdir())
    except (OSError, ValueError):
        return 0.0
    return time.time() - newest


@contextlib.contextmanager
def watched_extension_locks(interval: float = 60.0):
    """Inside (while DeepSpeed builds its ops): a lock idle for STALE_LOCK_S is removed first, saying so; one that
    holds the build up is named on stderr every INTERVAL seconds (torch waits on it without a word, for ever)."""
    for lock in extension_locks():
        idle = _idle_seconds(lock)
        if idle > STALE_LOCK_S:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
                warn(f"{lock}: removed a C++ extension build lock idle for {idle / 60:.0f} min (left by a build "
                     "that was killed); the extension is built again")
    done = threading.Event()

    def watch():
        while not done.wait(interval):
            for lock in extension_locks():
                warn(f"waiting for torch's C++ extension build lock {lock} (another process builds the extension, "
                     f"or a killed build left the lock: if none runs, remove it; it is removed by itself after "
                     f"{STALE_LOCK_S // 60} idle minutes on the next run)")

    watcher = threading.Thread(target=watch, daemon=True, name="slm-extension-locks")
    watcher.start()
    try:
        yield
    finally:
        done.set()


class DeepSpeedEngine(Engine):
    """DeepSpeed's engine runs the step: it reduces (ZeRO-2/3: reduce-scatters) gradients, clips them and applies
    the update at the accumulation boundary; with fp32 master weights it skips a step whose gradient norm is not
    finite (slm keeps DeepSpeed in that mode: bf16 comes from torch.autocast, see deepspeed_config)."""

    name = "deepspeed"

    def __init__(self, d, model, t, accumulation, micro_batch_size: int, user_config: dict | None = None,
                 config_where: str = "train.deepspeed_config"):
        self.dist, self.model, self.t, self.accumulation = d, model, t, accumulation
        self.config = deepspeed_config(t, micro_batch_size, accumulation, d.world, user_config, config_where)
        with stdout_to_stderr():  # DeepSpeed prints on stdout, which carries slm's results only
            try:
                import deepspeed
            except ImportError:
                raise SlmError("train.engine deepspeed: DeepSpeed is not installed (pip install 'slm[deepspeed]'; "
                               "DS_BUILD_OPS=0 builds nothing at install time)") from None
            _one_process_group(d)
            optimizer = make_optimizer(model, t)
            # DeepSpeed asserts LOCAL_RANK is set; set it for the call only (left behind, it would make other
            # libraries in this process, accelerate for one, believe they run under a launcher)
            ours = "LOCAL_RANK" not in os.environ
            if ours:
                os.environ["LOCAL_RANK"] = str(d.local_rank)
            try:
                with watched_extension_locks():
                    self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                            dist_init_required=False)
            finally:
                if ours:
                    os.environ.pop("LOCAL_RANK", None)
        self.stage = int(self.config["zero_optimization"].get("stage", 0))
        if self.stage == 3:
            # The fused output-layer loss reads lm_head.weight outside lm_head's forward: gather it with the model.
            deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
        self.forward_model = self.ds
        self.optimizer = self.ds.optimizer  # its param_groups are AdamW's: set_lr works unchanged
        self.params = [p for p in model.parameters() if p.requires_grad]

    def describe(self) -> str:
        return f"deepspeed ZeRO-{self.stage}"

    def close(self):
        # DeepSpeed's gradient hooks tie its engine to the parameters through the autograd graph, a cycle Python's
        # collector cannot see: without destroy() the engine (and the communication handles it keeps) lives until
        # the interpreter shuts down, and a C++ thread that touches Python then aborts the process ("terminate
        # called without an active exception", seen once in CI after a ZeRO-1 run had written its checkpoint).
        self.ds.destroy()

    def accumulating(self, last):
        return contextlib.nullcontext()

    def backward(self, loss, last):
        # The loss is already scaled to the step (sum over the step's tokens / their count), so DeepSpeed must not
        # divide it by the accumulation steps again; it averages over processes as DDP does.
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()  # a no-op until the accumulation boundary (the last micro-batch)

    def poison(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan")

    def finish_step(self, loss_ok):
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, bool(self.ds.was_step_applied()) and loss_ok

    def _link(self):
        # DeepSpeed links each parameter to its slice of the flat AdamW state after the first optimizer step of
        # the first parameter group only; link again so every group's slices are known.
        zero = self.ds.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _flat_states(self):
        """AdamW's own state is one entry per flat fp32 partition that ZeRO made of each parameter group."""
        zero = self.ds.optimizer
        flats = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
        if flats is None:
            flats = zero.single_partition_of_fp32_groups  # ZeRO-1 and 2
        return zero.optimizer, list(flats)

    def full_weights(self):
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.model.named_parameters():
            full = safe_get_full_fp32_param(p)  # collective: every rank takes part
            if full is None:  # not managed by ZeRO's fp32 copy
                full = p.detach()
            if self.dist.main:
                out[name] = full.detach().to("cpu", torch.float32).clone()
        if not self.dist.main:
            return None
        if self.model.cfg.tie_embeddings:  # as model.state_dict() has it (slm's model has no persistent buffers)
            out["lm_head.weight"] = out["embed_tokens.weight"]
        return out

    def full_optimizer_state(self):
        from deepspeed.utils import safe_get_full_optimizer_state

        inner, flats = self._flat_states()
        if not any(inner.state.get(f) for f in flats):
            return OptimizerState(0, {}) if self.dist.main else None
        self._link()
        moments = {}
        for name, p in self.model.named_parameters():
            got = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
            if self.dist.main:
                moments[name] = {k: v.detach().to("cpu", torch.float32).clone() for k, v in got.items()}
        step = max(int(inner.state[f]["step"]) for f in flats if inner.state.get(f))
        return OptimizerState(step, moments) if self.dist.main else None

    def load_optimizer_state(self, state, where):
        from deepspeed.utils import safe_set_full_optimizer_state

        if not state.moments:
            return
        check_optimizer_state(state, self.model, where)
        inner, flats = self._flat_states()
        fused = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
        for f in flats:  # AdamW creates its state lazily at the first step: create it here, then fill it
            inner.state[f] = {"step": torch.tensor(float(state.step), device=f.device if fused else "cpu"),
                              **{k: torch.zeros_like(f, memory_format=torch.preserve_format) for k in MOMENTS}}
        self._link()
        for name, p in self.model.named_parameters():
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, state.moments[name][key].to(self.dist.device, torch.float32), key)


# DeepSpeed config keys slm sets from train.* (a user's file may leave them out or set them to "auto").
_DERIVED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
            "gradient_clipping")


def deepspeed_config(t, micro: int, accumulation: int, world: int, user: dict | None, where: str) -> dict:
    """The DeepSpeed config: train.* (batch, clipping, train.zero_stage), merged with a user's JSON if given.

    The user's file may set anything DeepSpeed knows (ZeRO buckets, offload, communication) except what slm owns:
    the optimizer and schedule (train.*), the batch (train.tokens_per_step / micro_batch_size) and the precision
    (train.dtype: bf16 comes from torch.autocast over fp32 master weights, so DeepSpeed keeps its non-finite
    gradient check)."""
    ours = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro * accumulation * world,
            "gradient_clipping": float(t.grad_clip) if t.grad_clip > 0 else 0.0,
            "zero_optimization": {"stage": t.zero_stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 2**62, "wall_clock_breakdown": False}
    if not user:
        return ours
    for key, why in (("optimizer", "the optimizer comes from train.* (AdamW)"),
                     ("scheduler", "the learning-rate schedule comes from train.schedule"),
                     ("fp16", "slm trains in bf16 or fp32 (train.dtype)"),
                     ("bf16", "bf16 comes from train.dtype (torch.autocast over fp32 master weights)"),
                     ("amp", "precision comes from train.dtype")):
        value = user.get(key)
        if value is not None and (key in ("optimizer", "scheduler") or (isinstance(value, dict)
                                                                          and value.get("enabled"))):
            raise SlmError(f"{where}: {key}: {why}; remove it from the file")
    merged = dict(ours)
    for key, value in user.items():
        if key in _DERIVED:
            if value != "auto" and value != ours[key]:
                raise SlmError(f"{where}: {key} is {value!r}, train.* gives {ours[key]!r}: remove it, set it to "
                               "\"auto\", or change train.tokens_per_step / micro_batch_size / grad_clip")
            continue
        if key == "zero_optimization" and isinstance(value, dict):
            merged[key] = {**ours[key], **value}
        else:
            merged[key] = value
    stage = merged["zero_optimization"].get("stage", 0)
    if stage not in (1, 2, 3):
        raise SlmError(f"{where}: zero_optimization.stage: expected 1, 2 or 3, got {stage!r} (without ZeRO, use "
                       "train.engine ddp)")
    return merged


def build(name: str, d: Dist, model: torch.nn.Module, t, accumulation: int, micro_batch_size: int,
          deepspeed_user_config: dict | None = None, deepspeed_where: str = "") -> Engine:
    """The engine NAME (resolved: single, ddp, fsdp or deepspeed) around MODEL, with its optimizer."""
    if name == "fsdp":
        return FSDPEngine(d, model, t, accumulation)
    if name == "deepspeed":
        return DeepSpeedEngine(d, model, t, accumulation, micro_batch_size, deepspeed_user_config,
                               deepspeed_where or "train.deepspeed_config")
    return Engine(d, model, t, accumulation)
