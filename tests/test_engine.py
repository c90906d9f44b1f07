"""Engines on 2 CPU processes (gloo): DDP, FSDP and DeepSpeed ZeRO-1/2/3 compute the step one process computes,
and a run moves between engines and numbers of processes with the same samples in the same order."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from slm.errors import SlmError
from slm.formats.checkpoint import Checkpoint
from slm.formats.metrics import read_metrics
from slm.stages.pretrain import PretrainConfig, run as pretrain
from slm.train.config import TrainSettings
from slm.train.engine import deepspeed_config

HAS_DEEPSPEED = True
try:
    import deepspeed  # noqa: F401
except ImportError:  # pragma: no cover - the test extra installs it
    HAS_DEEPSPEED = False
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (pip install slm[deepspeed])")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def one_process(data, out, steps, *sets):
    return pretrain(PretrainConfig(data=data / "mix", out=out, config_file=data / "model.yaml", steps=steps,
                                   device="cpu", sets=list(sets)))


def extensions_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions")))


def two_processes(data, out, steps, *args, nproc=2, env=None):
    """`torchrun --nproc_per_node 2 -m slm pretrain ...` (each process gets one of the two cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions_dir()), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "slm", "pretrain", "--config", str(data / "model.yaml"), "--data",
           str(data / "mix"), "--out", str(out), "--steps", str(steps), "--device", "cpu", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def weights(ckpt):
    return Checkpoint.open(ckpt).hf_state_dict()


def assert_weights_close(a, b):
    """Within what float32 reduction order leaves after a few AdamW steps. Adam divides each gradient by its own
    running RMS, so an element whose gradient is float noise (zero in exact arithmetic but 1e-9 in floats: the key
    bias, which softmax ignores, or a rarely seen token's embedding) steps by up to about lr in a direction the
    noise picks. Such elements: those whose gradient is noise to the end (the key bias; B's second moment under 1e-8
    of the tensor's largest), and ones that had noise for a few steps before a real gradient (seen: one embedding
    element in 35k, 8e-5 to 1.1e-4 off with lr 1.5e-3, on an AVX-512 CPU). So every element within lr, and all
    but 1 in 1,000 of the others within 1e-5: a wrong gradient or sample moves most of a tensor by about lr a step,
    where reduction order leaves ~1e-6."""
    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    wa, wb, moments = ca.state_dict(), cb.state_dict(), cb.optimizer_state().moments
    lr = max(r["lr"] for r in read_metrics(cb.run_dir) if "lr" in r)
    assert wa.keys() == wb.keys() == moments.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=lr, msg=lambda m: f"{k}: {m}")
        v = moments[k]["exp_avg_sq"]
        signal = v >= 1e-8 * v.max()
        off = int(((wa[k] - wb[k]).abs() > 1e-5 + 1e-5 * wb[k].abs())[signal].sum())
        assert off <= int(signal.sum()) // 1000, f"{k}: {off} of {int(signal.sum())} elements off by more than 1e-5"


def assert_moments_close(a, b):
    a, b = Checkpoint.open(a).optimizer_state(), Checkpoint.open(b).optimizer_state()
    assert a.step == b.step and a.moments.keys() == b.moments.keys()
    for name in a.moments:
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = a.moments[name][key], b.moments[name][key]
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3 * float(y.abs().max()),
                                       msg=lambda m: f"{name} {key}: {m}")


ENGINES = [
    pytest.param(["--engine", "ddp"], id="ddp"),
    pytest.param(["--engine", "fsdp"], id="fsdp"),
    pytest.param(["--engine", "deepspeed", "--zero-stage", "1"], id="zero1", marks=needs_deepspeed),
    pytest.param(["--engine", "deepspeed", "--zero-stage", "2"], id="zero2", marks=needs_deepspeed),
    pytest.param(["--engine", "deepspeed", "--zero-stage", "3"], id="zero3", marks=needs_deepspeed),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_data):
    """One process, 6 steps of 8 samples (2 micro-batches of 4: gradient accumulation)."""
    out = tmp_path_factory.mktemp("ref") / "one"
    one_process(train_data, out, 6)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine_args", ENGINES)
def test_two_processes_compute_what_one_computes(tmp_path, train_data, reference, engine_args):
    """The same global batch on 2 processes (1 micro-batch each) gives one process's losses, gradient norms and
    weights, within float32 reduction-order noise; the checkpoint is the standard one whatever the engine."""
    out = tmp_path / "two"
    proc = two_processes(train_data, out, 6, *engine_args)
    assert proc.stdout.strip() == str(out / "checkpoints" / "step-00000006")  # printed once, by rank 0
    np.testing.assert_allclose(losses(out), losses(reference), rtol=2e-5)
    got = [r["grad_norm"] for r in read_metrics(out) if "grad_norm" in r]
    want = [r["grad_norm"] for r in read_metrics(reference) if "grad_norm" in r]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert_weights_close(out, reference)
    state = json.loads((out / "checkpoints" / "step-00000006" / "train_state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 6 * 8
    assert Checkpoint.open(out).optimizer_state().step == 6
    assert_moments_close(out, reference)


@pytest.mark.slow
@needs_deepspeed
def test_the_deepspeed_launcher(tmp_path, train_data, reference):
    """`deepspeed --num_gpus 2 --module slm pretrain ... --engine deepspeed`: the launcher's own environment and its
    --local_rank argument (on a CPU, LOCAL_SIZE says how many processes), the same run as one process."""
    out = tmp_path / "ds"
    env = dict(os.environ, LOCAL_SIZE="2", OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions")))
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "slm",
                           "pretrain", "--config", str(train_data / "model.yaml"), "--data", str(train_data / "mix"),
                           "--out", str(out), "--steps", "6", "--device", "cpu", "--engine", "deepspeed"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the launcher logs to stdout too; slm's rank 0 prints the checkpoint there once
    assert proc.stdout.splitlines().count(str(out / "checkpoints" / "step-00000006")) == 1
    assert "[rank 0/2]" in proc.stderr and "deepspeed ZeRO-1" in proc.stderr
    np.testing.assert_allclose(losses(out), losses(reference), rtol=2e-5)
    assert_weights_close(out, reference)


@pytest.mark.slow
def test_elastic_two_processes_to_one_and_back(tmp_path, train_data):
    """Checkpointed by 2 DDP processes, resumed by 1; checkpointed by 1, resumed by 2: the same samples in the
    same order (the losses of an uninterrupted run), the same weights within tolerance."""
    whole = tmp_path / "whole"
    one_process(train_data, whole, 8)
    down = tmp_path / "down"
    two_processes(train_data, down, 4)
    one_process(train_data, down, 8)
    up = tmp_path / "up"
    one_process(train_data, up, 4)
    two_processes(train_data, up, 8)
    for run in (down, up):
        np.testing.assert_allclose(losses(run), losses(whole), rtol=2e-5)
        assert_weights_close(run, whole)
        assert json.loads((run / "checkpoints" / "step-00000008" / "train_state" / "state.json").read_text())[
            "samples_seen"] == 8 * 8


@pytest.mark.slow
@needs_deepspeed
def test_resume_across_engines(tmp_path, train_data):
    """ddp (2) -> DeepSpeed ZeRO-2 (2) -> FSDP (2) -> ZeRO-3 (1) -> single: one run, four engines, two sizes."""
    whole = tmp_path / "whole"
    one_process(train_data, whole, 10)
    run = tmp_path / "run"
    two_processes(train_data, run, 2, "--engine", "ddp")
    two_processes(train_data, run, 4, "--engine", "deepspeed", "--zero-stage", "2")
    two_processes(train_data, run, 6, "--engine", "fsdp")
    two_processes(train_data, run, 8, "--engine", "deepspeed", "--zero-stage", "3", nproc=1)
    one_process(train_data, run, 10, "train.engine=single")
    np.testing.assert_allclose(losses(run), losses(whole), rtol=3e-5)
    assert_weights_close(run, whole)
    engines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in engines if "loss" in r]) == 10


def test_deepspeed_config_from_train_settings_and_a_users_file():
    t = TrainSettings(tokens_per_step=256, micro_batch_size=4, grad_clip=1.0, zero_stage=2)
    c = deepspeed_config(t, 4, 2, 2, None, "x.json")
    assert c["train_micro_batch_size_per_gpu"] == 4 and c["gradient_accumulation_steps"] == 2
    assert c["train_batch_size"] == 16 and c["gradient_clipping"] == 1.0 and c["zero_optimization"] == {"stage": 2}
    user = {"train_batch_size": "auto", "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000},
            "communication_data_type": "fp32"}
    c = deepspeed_config(t, 4, 2, 2, user, "x.json")
    assert c["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000} and c["train_batch_size"] == 16
    assert c["communication_data_type"] == "fp32"
    for bad, message in (({"optimizer": {"type": "Adam"}}, "x.json: optimizer: the optimizer comes from train.*"),
                         ({"bf16": {"enabled": True}}, "x.json: bf16: bf16 comes from train.dtype"),
                         ({"fp16": {"enabled": True}}, "x.json: fp16: slm trains in bf16 or fp32"),
                         ({"scheduler": {}}, "x.json: scheduler:"),
                         ({"train_batch_size": 64}, "x.json: train_batch_size is 64, train.* gives 16"),
                         ({"gradient_accumulation_steps": 1}, "x.json: gradient_accumulation_steps is 1"),
                         ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage: expected 1, 2 or 3")):
        with pytest.raises(SlmError, match=message.replace("*", r"\*")):
            deepspeed_config(t, 4, 2, 2, bad, "x.json")
    assert deepspeed_config(t, 4, 2, 2, {"bf16": {"enabled": False}}, "x.json")["bf16"] == {"enabled": False}


@needs_deepspeed
def test_a_stale_extension_build_lock_is_removed(tmp_path, train_data):
    """A DeepSpeed run killed while torch built DeepSpeed's communication op leaves the build's `lock` file; every
    later build then waits on it for ever, without a word. slm removes a lock whose build directory has been idle
    for 10 minutes, says so, and the run goes on."""
    ext = tmp_path / "torch_extensions"
    if extensions_dir().is_dir():  # the built op comes along: nothing to compile again
        shutil.copytree(extensions_dir(), ext, ignore=shutil.ignore_patterns("lock"))
    build = ext / "deepspeed_shm_comm"
    build.mkdir(parents=True, exist_ok=True)
    (build / "lock").touch()
    idle = time.time() - 700
    for p in build.iterdir():
        os.utime(p, (idle, idle))
    proc = two_processes(train_data, tmp_path / "run", 2, "--engine", "deepspeed", nproc=1,
                         env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert re.search(r"lock: removed a C\+\+ extension build lock idle for 1\d min", proc.stderr), proc.stderr[-2000:]
    assert not (build / "lock").exists()


@pytest.mark.slow
@needs_deepspeed
def test_a_micro_batch_larger_than_a_process_share_shrinks(tmp_path, train_data, reference):
    """train.micro_batch_size 16 on 2 processes that take 4 samples each per step (the tiny recipe's situation under
    torchrun): micro-batches of 4, said once, and the same steps as one process computes (DeepSpeed, whose batch
    arithmetic must agree, included)."""
    out = tmp_path / "two"
    proc = two_processes(train_data, out, 6, "--engine", "deepspeed", "--set", "train.micro_batch_size=16")
    said = "train.micro_batch_size 16 is more than the 4 samples each of 2 processes takes per step: using " \
           "micro-batches of 4"
    assert proc.stderr.count(said) == 1, proc.stderr[-3000:]
    np.testing.assert_allclose(losses(out), losses(reference), rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("engine_args", [pytest.param(["--engine", "fsdp"], id="fsdp"),
                                         pytest.param(["--engine", "deepspeed", "--zero-stage", "1"], id="zero1",
                                                      marks=needs_deepspeed)])
def test_a_loss_spike_on_one_rank_is_skipped_on_every_rank(tmp_path, train_data, engine_args):
    """A poisoned batch on rank 0 only (its loss x40 at step 8) lifts the all-reduced loss far above the window
    (train.spike_window 8): both processes skip that update alike, and the run ends with the weights, bit for bit,
    of the same run whose step 8 had a NaN loss on both ranks (the independent, non-finite skip)."""
    from conftest import loss_hook_env

    sets = ["--set", "train.spike_window=8", "--set", "train.save_every=1", "--set", "train.keep=20"]
    two_processes(train_data, tmp_path / "spike", 10, *engine_args, *sets, env=loss_hook_env("8:x40", rank=0))
    two_processes(train_data, tmp_path / "nan", 10, *engine_args, *sets, env=loss_hook_env("8:nan"))
    skipped = [r for r in read_metrics(tmp_path / "spike") if r.get("skipped")]
    assert [(r["step"], r["spikes_total"]) for r in skipped] == [(8, 1)], skipped
    ck = tmp_path / "spike" / "checkpoints"
    a, b = weights(ck / "step-00000008"), weights(ck / "step-00000009")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the skipped update changed nothing
    end, other = weights(ck / "step-00000010"), weights(tmp_path / "nan" / "checkpoints" / "step-00000010")
    assert all(torch.equal(end[k], other[k]) for k in end)
    assert losses(tmp_path / "spike") == losses(tmp_path / "nan")
