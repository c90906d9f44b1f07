"""The example scripts users copy: they parse, and the SLURM chain submits each stage after the one it needs."""

import os
import subprocess

import pytest
from conftest import ROOT

SCRIPTS = ["examples/quickstart.sh", "examples/pipeline.sh", "examples/slurm/pretrain.sbatch",
           "examples/slurm/stage.sbatch", "examples/slurm/chain.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_chain_submits_dependent_jobs(tmp_path):
    """chain.sh with a stand-in sbatch on PATH: seven jobs, each after the previous one (afterok), the training
    stages through stage.sbatch with the user's sbatch options."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "sbatch").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {calls}\n'
                                   f'wc -l < {calls} | tr -d " " | sed "s/^/10/"\n')
    (bindir / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(ROOT / "examples/slurm/chain.sh"), "tiny", "mix", "chat.jsonl", "pairs.jsonl",
                           "facts.yaml", "--nodes", "2"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ids = proc.stdout.split()
    assert ids == [f"10{i}" for i in range(1, 8)]
    lines = calls.read_text().splitlines()
    assert "--dependency" not in lines[0] and "stage.sbatch pretrain --recipe tiny" in lines[0]
    for i, line in enumerate(lines[1:], 1):
        assert f"--dependency=afterok:{ids[i - 1]}" in line, line
    stages = [line.split("stage.sbatch ")[1].split(" --")[0] for line in lines if "stage.sbatch" in line]
    assert stages == ["pretrain", "cooldown", "sft", "dpo", "selfknow train"]
    assert all("--nodes 2" in line for line in lines if "stage.sbatch" in line)
    assert "selfknow generate" in lines[4] and "slm carbon" in lines[6]
    bad = subprocess.run(["bash", str(ROOT / "examples/slurm/stage.sbatch"), "tokenize"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "not a training stage" in bad.stderr
