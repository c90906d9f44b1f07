"""The prepared GPU check (benchmarks/gpu.sh) stays runnable where no GPU is lent: its CPU mode runs the same
tests and measurement code at a tiny shape and writes the same JSON and Markdown."""

import json
import os
import subprocess

import pytest
import torch
from conftest import ROOT


def gpu_sh(out, **env):
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)], capture_output=True, text=True,
                          env={**os.environ, "SLM_VENV": os.environ.get("SLM_VENV", str(ROOT / ".venv")), **env},
                          timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: bash benchmarks/gpu.sh measures it")
def test_the_gpu_check_says_there_is_no_gpu(tmp_path):
    proc = gpu_sh(tmp_path / "out")
    assert proc.returncode != 0 and "gpu.sh: no CUDA device here" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_in_check_mode(tmp_path):
    proc = gpu_sh(tmp_path / "out", SLM_GPU_CHECK="cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert r["tests"]["counts"] == {"passed": 9, "failure": 0, "error": 0, "skipped": 0}, r["tests"]
    assert not r["errors"], r["errors"]
    rows = {(x["activation_checkpointing"], x["compiled"]): x for x in r["train"]}
    assert set(rows) == {(False, False), (True, False), (False, True)}
    assert all(x["micro_batch_size"] == 2 and x["tokens_per_s"] > 0 and x["planner_memory_gib"] > 0
               for x in rows.values())
    assert r["deterministic"]["micro_batch_size"] == 2 and r["decode"]["tokens_per_s"] > 0
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "## Tests (`pytest -m gpu`): 9 passed, 0 failed" in md and "| check | 128 | 2 | on | no |" in md
