"""The prepared GPU check (benchmarks/gpu.sh) stays runnable where no GPU is lent: its CPU mode runs the same
tests and measurement code at a tiny shape and writes the same JSON and Markdown."""

import json
import os
import subprocess

import pytest
import torch
from conftest import ROOT, run_cli


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


@pytest.mark.slow
def test_the_decode_benchmarks_run(tmp_path, base_ckpt):
    """benchmarks/decode.py on a given checkpoint and GGUF file (the released-model form of the command), and
    benchmarks/llama_cpu.py over the CPU variants of llama.cpp this machine can run: they finish and report what
    the README's tables are made of."""
    import sys

    q = tmp_path / "q"
    run_cli("quantize", base_ckpt, "--type", "q8_0", "--no-report", "--out", q, check=True)
    gguf = next(q.glob("*.gguf"))
    common = ["--prompt", "16", "--gen", "8", "--rounds", "1"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--checkpoint", str(base_ckpt),
                           "--gguf", str(gguf), *common], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["model"] == str(base_ckpt) and r["torch_speedup"] > 0 and r["torch_compiled_speedup"] > 0
    assert 0 < r["gguf_q8_0_fraction_of_bound"] and r["llama_cpp_cpu"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llama_cpu.py"), str(gguf), *common],
                          capture_output=True, text=True, timeout=600)
    if "no variants to compare" in proc.stderr:
        pytest.skip("llama-cpp-python has one built-in CPU backend here (scripts/setup.sh builds every variant)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {"x64", "picked"} <= {x["variant"] for x in rows} and all(x["tg_tokens_per_s"] > 0 for x in rows)
    assert "| picked: " in proc.stdout and "| x64 |" in proc.stdout
