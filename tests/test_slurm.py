"""A real SLURM (Debian's slurmctld and slurmd, one node, started by the test): examples/slurm/pretrain.sbatch
runs 2 tasks, gets USR1 the way a time limit sends it, saves, requeues itself and finishes with the weights of an
uninterrupted run. Skips, saying why, where SLURM is not installed (scripts/install-slurm.sh installs it)."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Gate

from slm.formats.checkpoint import Checkpoint
from slm.formats.metrics import read_metrics

SBATCH = ROOT / "examples" / "slurm" / "pretrain.sbatch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Slurm:
    """slurmctld + slurmd in the foreground, configured under a temporary directory (auth/none: a test cluster)."""

    def __init__(self, base: Path):
        self.base = base
        host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        for d in ("state", f"spool/{host}", "log"):
            (base / d).mkdir(parents=True, exist_ok=True)
        self.conf = base / "slurm.conf"
        self.conf.write_text(f"""ClusterName=slmtest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
MinJobAge=300
KillWait=30
InactiveLimit=0
NodeName={host} CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs = [subprocess.Popen([daemon, "-D", "-f", str(self.conf)], env=self.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                      for daemon in ("slurmctld", "slurmd")]
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        self.stop()
        logs = "".join(p.read_text()[-2000:] for p in (base / "log").glob("*.log"))
        raise RuntimeError(f"SLURM did not come up:\n{logs}")

    def run(self, *args, check=True) -> str:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", job_id, "-o", check=False)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def stop(self):
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing; scripts/install-slurm.sh installs it)")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs; not root here")
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_sbatch_preempted_requeues_itself_and_matches_an_uninterrupted_run(tmp_path, train_data, slurm):
    steps = 150
    args = ["--config", str(train_data / "model.yaml"), "--device", "cpu", "--steps", str(steps),
            "--set", "train.save_every=1000", "--set", "train.tokens_per_step=64",  # 2 samples: 1 per task
            "--set", "train.micro_batch_size=1"]
    ref = tmp_path / "ref"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "slm", "pretrain", "--recipe", "tiny", "--data",
                           str(train_data / "mix"), "--out", str(ref), *args], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run, log = tmp_path / "run", tmp_path / "job.log"
    gate = Gate(tmp_path / "gate", step=9)  # each task waits after its 10th step until the signal has reached it
    job_env = gate.env(dict(slurm.env, SLM=f"{sys.executable} -m slm",
                            PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    out = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=30",
                          f"--output={log}", f"--chdir={tmp_path}", str(SBATCH), "tiny", str(train_data / "mix"),
                          str(run), *args], env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    try:
        gate.wait("reached", timeout=300)
    except AssertionError:
        raise AssertionError(log.read_text() if log.exists() else "no job log") from None
    slurm.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@120 sends before the time limit
    gate.wait("signal", timeout=120)
    gate.open()
    deadline = time.time() + 600
    while time.time() < deadline:
        info = slurm.job(job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    text = log.read_text()
    assert info.get("JobState") == "COMPLETED", f"{info.get('JobState')}\n{text[-4000:]}"
    assert int(info.get("Restarts", 0)) == 1, text[-3000:]
    assert "got USR1" in text and "start 1:" in text  # the script forwarded the signal; the job ran again
    assert "stopped by SIGUSR1 after step" in text and "requeueing SLURM job" in text
    assert "resuming" in text and "slm exited with 0" in text
    # the first start ends as SLURM's requeue ends it (SIGTERM), or with slm's 75 if it exited first: never "failed"
    assert re.search(r"slm exited with (143 \(ended by SIGTERM from SLURM|75 \(saved and stopped\))", text), text
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(steps))
    a, b = Checkpoint.open(run), Checkpoint.open(ref)
    assert a.step == steps
    wa, wb = a.hf_state_dict(), b.hf_state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the requeued run's weights differ from an uninterrupted run"


STAGE = ROOT / "examples" / "slurm" / "stage.sbatch"


@pytest.mark.slow
def test_stage_sbatch_jobs_chained_afterok(tmp_path, train_data, base_ckpt, slurm):
    """examples/slurm/stage.sbatch under the real SLURM, two cooldown jobs on 2 tasks each, the second submitted with
    --dependency=afterok on the first (as chain.sh does): it waits, starts after the first completed, continues its
    checkpoint; a job whose stage fails ends FAILED with slm's one line in the log, and its dependant never runs."""
    job_env = dict(slurm.env, SLM=f"{sys.executable} -m slm", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                   OMP_NUM_THREADS="1")
    common = ["--data", str(train_data / "mix"), "--device", "cpu", "--set", "train.tokens_per_step=64",
              "--set", "train.micro_batch_size=1"]

    def submit(*args, dep=None, name):
        cmd = ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=30",
               f"--output={tmp_path / (name + '.log')}", f"--chdir={tmp_path}"]
        if dep:
            cmd.append(f"--dependency=afterok:{dep}")
        out = subprocess.run([*cmd, str(STAGE), *args], env=job_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def wait(job):
        deadline = time.time() + 600
        while time.time() < deadline:
            info = slurm.job(job)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(1)
        raise AssertionError(f"job {job} did not end: {slurm.job(job)}")

    first = submit("cooldown", "--from", str(base_ckpt), "--steps", "3", "--out", "runs/cool", *common, name="cool")
    second = submit("cooldown", "--from", "runs/cool", "--steps", "2", "--out", "runs/cool2", *common, dep=first,
                    name="cool2")
    assert "Dependency" in slurm.job(second).get("Reason", "") or slurm.job(second).get("JobState") == "PENDING"
    a, b = wait(first), wait(second)
    logs = (tmp_path / "cool.log").read_text() + (tmp_path / "cool2.log").read_text()
    assert a["JobState"] == "COMPLETED" and b["JobState"] == "COMPLETED", logs[-3000:]
    assert b["StartTime"] >= a["EndTime"]
    assert "2 task(s)" in logs and "slm exited with 0" in logs
    c1, c2 = Checkpoint.open(tmp_path / "runs/cool"), Checkpoint.open(tmp_path / "runs/cool2")
    assert c1.step == Checkpoint.open(base_ckpt).step + 3 and c2.step == c1.step + 2
    assert c2.manifest["parent"] == str(c1.dir)

    bad = submit("cooldown", "--from", str(tmp_path / "nowhere"), "--steps", "2", "--out", "runs/bad", *common,
                 name="bad")
    after = submit("cooldown", "--from", "runs/bad", "--steps", "2", "--out", "runs/never", *common, dep=bad,
                   name="never")
    assert wait(bad)["JobState"] == "FAILED"
    assert "error: " in (tmp_path / "bad.log").read_text() and "nowhere" in (tmp_path / "bad.log").read_text()
    deadline = time.time() + 60
    while time.time() < deadline and slurm.job(after).get("JobState") == "PENDING" and \
            "DependencyNeverSatisfied" not in slurm.job(after).get("Reason", ""):
        time.sleep(1)
    state = slurm.job(after)
    assert state.get("JobState") in ("PENDING", "CANCELLED") and not (tmp_path / "runs/never").exists(), state
    slurm.run("scancel", after, check=False)
