"""What clusters do to runs: kill -9, signals, corrupted checkpoints, a full disk, non-finite losses."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HOOKS, Gate, run_cli

from slm.errors import SlmError, Stopped
from slm.formats.checkpoint import Checkpoint, verify_checkpoint
from slm.formats.metrics import read_metrics
from slm.stages.pretrain import PretrainConfig, run as pretrain


def _pretrain(data, out, steps, *sets, **kw):
    return pretrain(PretrainConfig(data=data / "mix", out=out, config_file=data / "model.yaml", steps=steps,
                                   device="cpu", sets=list(sets), **kw))


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def same_weights(a, b):
    wa, wb = Checkpoint.open(a).hf_state_dict(), Checkpoint.open(b).hf_state_dict()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def cli_args(data, out, steps, *extra):
    return [sys.executable, "-m", "slm", "pretrain", "--config", str(data / "model.yaml"), "--data",
            str(data / "mix"), "--out", str(out), "--steps", str(steps), "--device", "cpu", *map(str, extra)]


def test_checkpoint_manifest_lists_every_file_and_files_get_the_umask(tmp_path, train_data):
    old = os.umask(0o027)
    try:
        last = _pretrain(train_data, tmp_path / "run", 2)
    finally:
        os.umask(old)
    m = json.loads((last / "manifest.json").read_text())
    listed = {f["path"] for f in m["files"]}
    on_disk = {p.relative_to(last).as_posix() for p in last.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk and "train_state/optimizer.safetensors" in listed and "model.safetensors" in listed
    for f in m["files"]:
        assert (last / f["path"]).stat().st_size == f["bytes"] and len(f["sha256"]) == 64
    for p in last.rglob("*"):
        if p.is_file():  # safetensors writes 0600 on its own; every file must follow the umask like the rest
            assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    assert verify_checkpoint(last) is None


@pytest.mark.parametrize("victim", ["model.safetensors", "train_state/optimizer.safetensors"])
def test_a_corrupted_newest_checkpoint_is_skipped_not_deleted(tmp_path, train_data, victim, capfd):
    """Truncated or flipped: the re-run names the newest checkpoint in one line, resumes from the one before, and
    ends with the weights of an uninterrupted run; the bad one is kept aside, not deleted."""
    whole = _pretrain(train_data, tmp_path / "whole", 12)
    run = tmp_path / "run"
    _pretrain(train_data, run, 10, "train.save_every=5", "train.keep=3")
    bad = run / "checkpoints" / "step-00000010" / victim
    if victim == "model.safetensors":
        with open(bad, "r+b") as f:
            f.truncate(bad.stat().st_size // 2)
        why = f"{victim} has"
    else:  # same size, one byte changed: only the sha256 can tell
        data = bytearray(bad.read_bytes())
        data[-1] ^= 0xFF
        bad.write_bytes(bytes(data))
        why = f"{victim} does not match its sha256"
    capfd.readouterr()
    last = _pretrain(train_data, run, 12, "train.save_every=5", "train.keep=3")
    err = capfd.readouterr().err
    assert f"{run / 'checkpoints' / 'step-00000010'}: skipped, it does not verify ({why}" in err
    assert "resuming" in err and "at step 5" in err
    assert same_weights(last, whole)
    assert losses(run) == losses(tmp_path / "whole")
    kept = list((run / "checkpoints").glob("step-00000010.replaced-*"))
    assert len(kept) == 1 and (kept[0] / victim).exists()  # the damaged checkpoint, moved aside when step 10 was redone
    assert verify_checkpoint(run / "checkpoints" / "step-00000010") is None


def test_no_checkpoint_verifies(tmp_path, train_data):
    run = tmp_path / "run"
    _pretrain(train_data, run, 5, "train.save_every=5")
    (run / "checkpoints" / "step-00000005" / "config.json").unlink()
    proc = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--out", run,
                   "--steps", "8", "--device", "cpu")
    assert proc.returncode == 1
    assert "step-00000005: skipped, it does not verify (config.json is missing)" in proc.stderr
    assert proc.stderr.strip().endswith("none of its 1 checkpoint verifies (see above); move checkpoints/ "
                                        "aside to start over")
    assert (run / "checkpoints" / "step-00000005" / "model.safetensors").exists()  # never deleted


@pytest.mark.parametrize("damage", ["config.json", "model.safetensors"])
def test_readers_name_the_newest_checkpoint_they_skip(tmp_path, train_data, damage):
    """`slm info`, `slm generate` and `slm quantize` of a run whose newest checkpoint lost a file (or half its
    weights) use the one before and say so, once, naming both; quantize.json records the one it used."""
    run = tmp_path / "run"
    _pretrain(train_data, run, 10, "train.save_every=5")
    bad = run / "checkpoints" / "step-00000010" / damage
    if damage == "config.json":
        bad.unlink()
    else:
        with open(bad, "r+b") as f:
            f.truncate(bad.stat().st_size // 2)
    said = f"{run / 'checkpoints' / 'step-00000010'}: skipped, not a complete checkpoint"
    info = run_cli("info", run)
    assert info.returncode == 0 and info.stderr.count(said) == 1 and "using the older step-00000005" in info.stderr
    assert "step-00000005" in info.stdout
    gen = run_cli("generate", run, "def", "--max-new-tokens", "2")
    assert gen.returncode == 0 and gen.stderr.count(said) == 1
    q = run_cli("quantize", run, "--type", "f16", "--no-report", "--out", tmp_path / "q")
    assert q.returncode == 0 and q.stderr.count(said) == 1, q.stderr
    assert "step-00000005" in (tmp_path / "q" / "manifest.json").read_text()
    assert "step-00000010" not in (tmp_path / "q" / "manifest.json").read_text()


def _can_mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(where)], capture_output=True)
    return ok


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, train_data):
    """On a real small filesystem (tmpfs) when the test may mount one: the first checkpoint fits, the second does
    not. The run stops with exit 1 and one line naming the path and the space needed; step 5 is intact."""
    mnt = tmp_path / "small"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (not root); test_disk_fills_mid_write covers the write path")
    probe = _pretrain(train_data, tmp_path / "probe", 1)
    one = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(one * 1.6)}", "tmpfs", str(mnt)], check=True)
    try:
        run = mnt / "run"
        proc = subprocess.run(cli_args(train_data, run, 10, "--set", "train.save_every=5"), capture_output=True,
                              text=True)
        assert proc.returncode == 1, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in proc.stderr
        assert f"{run / 'checkpoints'}: no room for checkpoint step-00000010: it needs about" in lines[0]
        assert "the previous checkpoints are kept" in lines[0]
        assert verify_checkpoint(run / "checkpoints" / "step-00000005") is None
        assert not list((run / "checkpoints").glob("*.tmp-*"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_fills_mid_write(tmp_path, train_data, monkeypatch):
    """The space check passes but the disk fills during the write (another job took the space): one line, the
    half-written directory removed, the previous checkpoint intact, nothing half-finished named `latest`."""
    import slm.formats.checkpoint as ck

    run = tmp_path / "run"
    _pretrain(train_data, run, 5, "train.save_every=5")
    real = torch.save

    def fills(obj, path, *a, **kw):
        if "rng" in str(path):  # the last file of a checkpoint: everything before it was written
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", fills)
    free = iter([10**12])  # room when the save starts, 1 KB once the disk is full
    monkeypatch.setattr(ck, "_free_bytes", lambda path: next(free, 1000))
    with pytest.raises(SlmError, match=r"the disk filled while writing checkpoint step-00000010 \(it needs about "
                                       r"[0-9.]+ MB, 1\.0 KB are free\); the previous checkpoints are kept"):
        _pretrain(train_data, run, 10, "train.save_every=5")
    monkeypatch.undo()
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    assert (run / "checkpoints" / "latest").resolve().name == "step-00000005"
    assert verify_checkpoint(run / "checkpoints" / "step-00000005") is None


class Poison:
    """Makes the loss of chosen steps NaN (as a bad batch or an overflow would)."""

    def __init__(self, monkeypatch, steps, samples_per_step=8, factor=float("nan")):
        from slm.model.transformer import Transformer
        from slm.train.batches import Batches

        self.steps, self.current = set(steps), None
        step, forward = Batches.step, Transformer.forward

        def batches_step(b, first_sample):
            self.current = first_sample // samples_per_step
            return step(b, first_sample)

        def poisoned_forward(model, *a, **kw):
            out = forward(model, *a, **kw)
            if kw.get("targets") is not None and model.training and self.current in self.steps:
                return out[0] * factor, out[1]
            return out

        monkeypatch.setattr(Batches, "step", batches_step)
        monkeypatch.setattr(Transformer, "forward", poisoned_forward)


@pytest.mark.parametrize("engine", ["single", "deepspeed"])
def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, train_data, monkeypatch, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    Poison(monkeypatch, {3, 4})
    run = tmp_path / "run"
    _pretrain(train_data, run, 7, "train.save_every=1", "train.keep=10", f"train.engine={engine}")
    rows = [r for r in read_metrics(run) if "valid_loss" not in r]
    assert [r["step"] for r in rows] == list(range(7))
    skipped = [r for r in rows if r.get("skipped")]
    assert [(r["step"], r["reason"], r["bad_steps_in_a_row"], r["bad_steps_total"]) for r in skipped] == [
        (3, "loss nan", 1, 1), (4, "loss nan", 2, 2)]
    assert all(np.isfinite(r["loss"]) for r in rows if not r.get("skipped"))
    ck = run / "checkpoints"
    assert same_weights(ck / "step-00000003", ck / "step-00000005")  # the two bad steps changed nothing
    assert not same_weights(ck / "step-00000005", ck / "step-00000006")
    assert Checkpoint(ck / "step-00000007").optimizer_state().step == 5  # AdamW stepped 7 - 2 times
    state = json.loads((ck / "step-00000007" / "train_state" / "state.json").read_text())
    assert state["bad_steps_total"] == 2 and state["bad_steps_in_a_row"] == 0


def test_a_loss_spike_is_skipped_exactly_as_a_nan_step(tmp_path, train_data, monkeypatch):
    """A poisoned batch at step 9 (its loss x30) is far above the window of recent losses (train.spike_window 8,
    6 sigma): the update is skipped and counted, the weights stay as they were, and the run goes on exactly as one
    whose step 9 had a NaN loss (an independent skip): the same weights, bit for bit, at the end. (Under FSDP and
    DeepSpeed on two processes: tests/test_engine.py.)"""
    sets = ("train.save_every=1", "train.keep=20", "train.spike_window=8")
    Poison(monkeypatch, {9}, factor=30.0)
    _pretrain(train_data, tmp_path / "spike", 12, *sets)
    monkeypatch.undo()
    Poison(monkeypatch, {9})
    _pretrain(train_data, tmp_path / "nan", 12, *sets)
    rows = [r for r in read_metrics(tmp_path / "spike") if "valid_loss" not in r]
    skipped = [r for r in rows if r.get("skipped")]
    assert [(r["step"], r["bad_steps_total"], r["spikes_total"]) for r in skipped] == [(9, 1, 1)], skipped
    assert skipped[0]["reason"].startswith("loss spike ") and "sigma above the mean" in skipped[0]["reason"]
    before = [r["loss"] for r in rows if r["step"] < 9]
    assert skipped[0]["spike_loss"] > 10 * max(before)
    ck = tmp_path / "spike" / "checkpoints"
    assert same_weights(ck / "step-00000009", ck / "step-00000010")  # the update changed nothing
    assert same_weights(ck / "step-00000012", tmp_path / "nan" / "checkpoints" / "step-00000012")
    assert losses(tmp_path / "spike") == losses(tmp_path / "nan")
    state = json.loads((ck / "step-00000012" / "train_state" / "state.json").read_text())
    assert len(state["loss_window"]) == 8 and state["spikes_total"] == 1


def test_spike_settings_are_checked(tmp_path, train_data):
    with pytest.raises(SlmError, match="train.spike_window: expected 0 .off. or a window of 2 steps or more, got 1"):
        _pretrain(train_data, tmp_path / "a", 1, "train.spike_window=1")
    with pytest.raises(SlmError, match="train.spike_sigma: expected a positive number"):
        _pretrain(train_data, tmp_path / "b", 1, "train.spike_sigma=0")


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, train_data, monkeypatch):
    Poison(monkeypatch, set(range(3, 100)))
    run = tmp_path / "run"
    with pytest.raises(SlmError) as e:
        _pretrain(train_data, run, 20, "train.save_every=2", "train.max_bad_steps=4")
    good = (run / "checkpoints" / "step-00000006").resolve()
    assert str(e.value) == (f"4 steps in a row (up to step 6) had a non-finite loss or gradient, or a loss spike; "
                            f"the last good "
                            f"checkpoint is {good}: lower train.lr_peak or check the data, then resume from it")
    assert e.value.exit_code == 1


def test_requeue_under_slurm_runs_scontrol_after_the_save(tmp_path, train_data):
    """SIGUSR1 with --requeue in a SLURM job: the checkpoint is saved, then `scontrol requeue JOB` (a stand-in
    scontrol records its arguments and what it saw, then kills its caller as SLURM's requeue kills the job), and
    the log already says why it stopped and where the checkpoint is (a requeued job prints nothing after)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "scontrol.txt"
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" $(ls {tmp_path}/run/checkpoints) >> {record}\n"
                                     "kill -KILL $PPID\n")
    (bindir / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    run = tmp_path / "run"
    gate = Gate(tmp_path / "gate", step=2)
    proc = subprocess.Popen(cli_args(train_data, run, 40, "--requeue", "--set", "train.save_every=1000"),
                            env=gate.env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gate.wait("reached", proc)
    gate.signal(proc, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    step = Checkpoint.open(run).step
    assert record.read_text().split() == ["requeue", "4242", "latest", f"step-{step:08d}"]
    assert (f"stopped by SIGUSR1 after step {step}; checkpoint {run / 'checkpoints' / f'step-{step:08d}'} saved; "
            "requeueing SLURM job 4242") in err.replace("\n", "")
    assert "error:" not in err and out == ""


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_gives_the_same_weights(tmp_path, train_data):
    """SIGKILL at six random moments (in a step, in a save, at start-up), each followed by the same command: the
    final weights and AdamW moments equal an uninterrupted run's bit for bit."""
    steps = 24
    whole = _pretrain(train_data, tmp_path / "whole", steps, "train.save_every=2")
    run = tmp_path / "run"
    args = cli_args(train_data, run, steps, "--set", "train.save_every=2")
    rng = random.Random(20261125)
    gate = Gate(tmp_path / "gate", step=steps - 1)
    for kill in range(6):
        # Held at a random step, a process can never finish before its kill, however fast the machine; the kill
        # comes at a random moment before that (start-up, a step, a save) or, at the latest, at the gate.
        gate.step = rng.randrange(1, steps)
        gate.close()
        proc = subprocess.Popen(args, env=gate.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + rng.uniform(0.5, 5.0)  # start-up takes about 2 s; a step and a save ms
        while time.monotonic() < deadline and not gate.markers("reached") and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, f"kill {kill}: the run ended (exit {proc.returncode}) before it was killed"
        proc.kill()
        proc.wait()
    gate.open()
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    last = Checkpoint.open(run)
    assert last.step == steps and same_weights(last.dir, whole)
    a, b = last.optimizer_state(), Checkpoint(whole).optimizer_state()
    assert all(torch.equal(a.moments[n][k], b.moments[n][k]) for n in a.moments for k in ("exp_avg", "exp_avg_sq"))
    assert losses(run) == losses(tmp_path / "whole")
    assert not list((run / "checkpoints").glob("*.tmp-*"))


def test_stopped_exit_code_is_75():
    assert Stopped("x").exit_code == 75 and SlmError("x").exit_code == 1


def test_async_save_writes_what_a_synchronous_save_writes(tmp_path, train_data):
    """train.async_save: the periodic checkpoints are written in the background from a host copy taken at the step
    boundary; each is whole (its manifest verifies), holds the weights of its step (the steps after it did not
    leak in), and `keep` prunes as before."""
    _pretrain(train_data, tmp_path / "sync", 9, "train.save_every=2", "train.keep=3")
    _pretrain(train_data, tmp_path / "async", 9, "train.save_every=2", "train.keep=3", "train.async_save=true")
    for run in ("sync", "async"):
        names = sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir())
        assert names == ["latest", "step-00000006", "step-00000008", "step-00000009"], names
    for step in ("step-00000006", "step-00000008", "step-00000009"):
        a, b = tmp_path / "sync" / "checkpoints" / step, tmp_path / "async" / "checkpoints" / step
        assert verify_checkpoint(b) is None and same_weights(a, b), step
        sa = json.loads((a / "train_state" / "state.json").read_text())
        sb = json.loads((b / "train_state" / "state.json").read_text())
        assert sa == sb
    assert losses(tmp_path / "sync") == losses(tmp_path / "async")


class WriteGate:
    """Holds slm's background checkpoint writer in the middle of step K's checkpoint (tests/hooks/sitecustomize.py):
    model.safetensors written, the rest not yet."""

    def __init__(self, path, step):
        self.path, self.step = path, step
        path.touch()

    def env(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HOOKS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.update(SLM_TEST_WRITE_GATE=str(self.path), SLM_TEST_WRITE_GATE_STEP=str(self.step))
        return env

    def wait_held(self, proc, timeout=300):
        deadline = time.monotonic() + timeout
        while not list(self.path.parent.glob(f"{self.path.name}.writing-*")):
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its write was held"
            assert time.monotonic() < deadline, "the background write was never held"
            time.sleep(0.02)


def wait_for_step(run, step, proc, timeout=300):
    """Until metrics.jsonl has STEP (0-based): training went on."""
    deadline = time.monotonic() + timeout
    while not any(r.get("step") == step for r in (read_metrics(run) if (run / "metrics.jsonl").is_file() else [])):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_during_a_background_write_keeps_the_previous_checkpoint(tmp_path, train_data):
    """The write of step 4's checkpoint is held half-done while training goes on (step 6 runs); kill -9 then: the
    newest whole checkpoint is step 2's, step 4's is only a temporary directory, and the same command resumes to
    the uninterrupted run's weights, bit for bit."""
    sets = ["--set", "train.save_every=2", "--set", "train.async_save=true"]
    whole = _pretrain(train_data, tmp_path / "whole", 8, "train.save_every=2")
    run = tmp_path / "run"
    gate = WriteGate(tmp_path / "gate", 4)
    proc = subprocess.Popen(cli_args(train_data, run, 8, *sets), env=gate.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        gate.wait_held(proc)
        wait_for_step(run, 5, proc)  # the step went on while the checkpoint was being written
    finally:
        proc.kill()
        proc.wait()
    ck = run / "checkpoints"
    assert (ck / "latest").resolve().name == "step-00000002" and verify_checkpoint(ck / "step-00000002") is None
    assert not (ck / "step-00000004").exists() and list(ck.glob("step-00000004.tmp-*"))
    gate.path.unlink()
    done = subprocess.run(cli_args(train_data, run, 8, *sets), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and "at step 2" in done.stderr
    assert same_weights(Checkpoint.open(run).dir, whole) and not list(ck.glob("*.tmp-*"))


@pytest.mark.slow
def test_sigterm_waits_for_the_write_in_flight_then_saves_and_exits_75(tmp_path, train_data):
    """SIGTERM while step 4's checkpoint is being written in the background: the run stops at the end of its step,
    waits for that write, then saves where it stopped and exits 75; both checkpoints are whole."""
    run = tmp_path / "run"
    gate = WriteGate(tmp_path / "gate", 4)
    proc = subprocess.Popen(cli_args(train_data, run, 40, "--set", "train.save_every=2", "--set",
                                     "train.async_save=true"), env=gate.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        gate.wait_held(proc)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None  # held: it waits for the write in flight
        gate.path.unlink()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-2000:]
    ck = run / "checkpoints"
    stopped = (ck / "latest").resolve()
    assert verify_checkpoint(ck / "step-00000004") is None and verify_checkpoint(stopped) is None
    assert 4 < Checkpoint(stopped).step <= 7  # the step it stopped after (the write held it at most to step 6's save)
