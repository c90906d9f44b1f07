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


def probe_wheel(folder, name="slm_gpu_probe", version="1.0"):
    """A minimal pure-Python wheel, as benchmarks/gpu_wheels.sh would download, made here without a registry."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_in_check_mode(tmp_path):
    """The whole check, as a lent machine runs it: wheels carried in SLM_WHEELS are installed beside the machine's own
    packages (without the network) and named in gpu.json, with the versions that ran."""
    probe_wheel(tmp_path / "wheels")
    proc = gpu_sh(tmp_path / "out", SLM_GPU_CHECK="cpu", SLM_WHEELS=str(tmp_path / "wheels"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpu.sh: installed 1 wheels from" in proc.stderr
    r = json.loads((tmp_path / "out" / "gpu.json").read_text())
    env = r["environment"]
    assert env["carried"] == ["slm_gpu_probe 1.0"] and env["torch"] == torch.__version__ and env["python"], env
    assert not r["skipped"], r["skipped"]
    assert r["tests"]["counts"] == {"passed": 10, "failure": 0, "error": 0, "skipped": 0}, r["tests"]
    assert not r["errors"], r["errors"]
    rows = {(x["activation_checkpointing"], x["compiled"]): x for x in r["train"]}
    # the compiled step runs at the faster eager row's setting (on a busy CPU, checkpointing on can win)
    faster = max((False, True), key=lambda ac: rows[(ac, False)]["tokens_per_s"])
    assert set(rows) == {(False, False), (True, False), (faster, True)}
    assert all(x["micro_batch_size"] == 2 and x["tokens_per_s"] > 0 and x["planner_memory_gib"] > 0
               for x in rows.values())
    assert r["deterministic"]["micro_batch_size"] == 2 and r["decode"]["tokens_per_s"] > 0
    assert r["block_mask"][0]["ms"] > 0 and r["block_mask"][0]["micro_batch_size"] == 2
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "## Tests (`pytest -m gpu`): 10 passed, 0 failed" in md and "| check | 128 | 2 | on | no |" in md


def test_the_gpu_check_stops_measuring_at_its_time_budget(tmp_path):
    """Past --deadline (gpu.sh: SLM_GPU_BUDGET_S after it starts) no measurement starts: each is listed as skipped,
    in priority order (eager steps and decode before deterministic mode and compiled steps), and the run still
    writes gpu.json and gpu.md, so that a lent machine's time limit never loses the whole report."""
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out", str(out), "--check",
                           "--deadline", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "gpu.json").read_text())
    assert r["skipped"] == ["check model", "decode"] and not r["train"] and not r["errors"], r
    md = (out / "gpu.md").read_text()
    assert "## Skipped: past the time budget (SLM_GPU_BUDGET_S)\n\n- check model\n- decode" in md


def load_gpu_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fixed,per_seq,limit,expect,tried", [
    (10, 7, 80, 8, [1, 2, 8]),          # 66 GiB predicted at 8 sequences, 122 at 16: 8 is tried and runs
    (10, 7, 60, 4, [1, 2, 8, 4]),       # fragmentation: 8 runs out although predicted to fit; halved once
    (70, 20, 80, 0, [1]),               # not even one sequence
    (40, 30, 80, 1, [1, 2]),            # one, not two
    (1, 1, 80, 64, [1, 2, 64]),         # capped at 64
])
def test_the_gpu_micro_batch_search_tries_few_sizes(monkeypatch, fixed, per_seq, limit, expect, tried):
    """On a GPU the search predicts the largest power of two from the peaks of 1 and 2 sequences (each size tried
    compiles FlexAttention again) and halves when the prediction runs out of memory. A fake device of 80 GiB whose
    step takes FIXED + PER_SEQ GiB per sequence and runs out above LIMIT."""
    gpu = load_gpu_benchmark()
    calls = []

    def fake_fits(model, micro, seq, device, ac):
        calls.append(micro)
        need = (fixed + per_seq * micro) * 2**30
        return need if need <= limit * 2**30 else None

    class Props:
        total_memory = 80 * 2**30

    monkeypatch.setattr(gpu, "fits", fake_fits)
    monkeypatch.setattr(gpu.torch.cuda, "get_device_properties", lambda device: Props())
    assert gpu.largest_micro(None, 2048, torch.device("cuda"), False, 64) == expect
    assert calls == tried


def test_the_gpu_check_refuses_a_budget_that_is_not_seconds(tmp_path):
    proc = gpu_sh(tmp_path / "out", SLM_GPU_CHECK="cpu", SLM_GPU_BUDGET_S="5m")
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu.sh: SLM_GPU_BUDGET_S=5m: expected whole seconds"
    assert not (tmp_path / "out" / "gpu.json").exists()


def test_the_gpu_check_stops_hung_tests_and_still_reports(tmp_path):
    """gpu.sh stops the GPU tests at SLM_GPU_TESTS_S (a hung collective must not eat a lent machine's minutes) and
    gpu.md says why there is no test table."""
    proc = gpu_sh(tmp_path / "out", SLM_GPU_CHECK="cpu", SLM_GPU_TESTS_S="1", SLM_GPU_BUDGET_S="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the GPU tests ran past 1 s and were stopped" in proc.stderr
    r = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert "tests" not in r and r["errors"][0].startswith("tests: no report at "), r["errors"]
    assert "ran past 1 s" in r["errors"][0] and r["skipped"] == ["check model", "decode"]
    assert "- tests: no report at" in (tmp_path / "out" / "gpu.md").read_text()


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


def test_the_training_step_benchmark_compares_packed_rows(tmp_path):
    """benchmarks/train_step.py --packed: slm on segment ids against transformers on the same rows' positions and
    document mask; it checks both models' logits equal before timing, and reports the row with its documents."""
    import sys

    bench_dir = str(ROOT / "benchmarks")
    sys.path.insert(0, bench_dir)
    try:
        import train_step  # which takes its own folder off sys.path[0] (it holds a tokenize.py)
    finally:
        if bench_dir in sys.path:
            sys.path.remove(bench_dir)
    seg = train_step.packed_segments(3, 64, 4, seed=1)
    assert [len(set(row.tolist())) for row in seg] == [4, 4, 4] and (seg[:, 1:] >= seg[:, :-1]).all()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--shapes", "tiny", "--packed",
                           "3", "--rounds", "1", "--steps", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])["tiny, 3 documents a row"]
    assert r["slm_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0


def test_the_tokenize_benchmark_interleaves_its_measurements(tmp_path, arcade_dir):
    """benchmarks/tokenize.py runs raw tiktoken (1 thread, 2 threads, 2 processes) and slm tokenize encode (1 and 2
    workers) once each per round, and prints every rate and ratio it claims in its last line."""
    import sys

    from conftest import stdlib_samples

    code = tmp_path / "corpus" / "code" / "train.jsonl"
    code.parent.mkdir(parents=True)
    code.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_samples(40)), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tokenize.py"), "--tokenizer", str(arcade_dir),
                           "--corpus", str(tmp_path / "corpus"), "--mb", "0.5", "--repeat", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["mb_text"] >= 0.5 and "best of 2 interleaved rounds" in proc.stderr
    rates = [k for k in r if k.endswith("_mb_per_s")]
    assert len(rates) == 5 and all(r[k] > 0 for k in rates)
    assert r["slm_2_workers_vs_raw_2_processes"] == pytest.approx(
        r["slm_encode_2_workers_mb_per_s"] / r["raw_tiktoken_2_processes_mb_per_s"], rel=0.01)
