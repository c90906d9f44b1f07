"""pretrain and cooldown: through the real CLI where the user's view matters, in-process where speed does."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, Gate, run_cli

from slm.errors import Stopped
from slm.formats.checkpoint import Checkpoint
from slm.formats.metrics import read_metrics
from slm.stages.cooldown import CooldownConfig, run as cooldown
from slm.stages.pretrain import PretrainConfig, run as pretrain

GOLDEN = ROOT / "tests" / "data" / "golden_loss.txt"


def _pretrain(data, out, steps, **kw):
    return pretrain(PretrainConfig(data=data / "mix", out=out, config_file=data / "model.yaml", steps=steps,
                                   device="cpu", **kw))


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_cli_run_loss_falls_and_writes_a_run_directory(tmp_path, train_data):
    out = tmp_path / "run"
    proc = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--out", out,
                   "--steps", "20", "--valid", train_data / "tokens" / "valid", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    last = out / "checkpoints" / "step-00000020"
    assert proc.stdout.strip() == str(last)  # stdout: the last checkpoint, nothing else
    rows = read_metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(20))
    assert np.mean([r["loss"] for r in train[-5:]]) < train[0]["loss"] - 0.5
    for key in ("lr", "grad_norm", "tokens_per_s", "memory_gib", "tokens_seen"):
        assert key in train[-1]
    assert "mfu" not in train[-1]  # no known peak on a CPU
    valid = [r for r in rows if "valid_loss" in r]
    assert [r["step"] for r in valid] == [9, 19]
    assert valid[-1]["valid_loss"] < valid[0]["valid_loss"]
    assert 0 < valid[0]["unigram_loss"] < np.log(1024)  # the context-free baseline a trained model must beat
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000015", "step-00000020"]
    assert (out / "checkpoints" / "latest").resolve() == last.resolve()
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["kind"] == "checkpoint" and manifest["step"] == 20 and manifest["stage"] == "pretrain"
    assert manifest["tokens_seen"] == 20 * 256 and manifest["mix"]["plan_sha256"]
    state = json.loads((last / "train_state" / "state.json").read_text())
    assert state["step"] == 20 and state["samples_seen"] == 20 * 8


def test_resume_is_exact(tmp_path, train_data):
    """Stop at step 7, resume to 12: the same losses, bit for bit, and the same final weights."""
    whole = _pretrain(train_data, tmp_path / "whole", 12)
    _pretrain(train_data, tmp_path / "split", 7)
    resumed = _pretrain(train_data, tmp_path / "split", 12)
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    assert len(losses(tmp_path / "split")) == 12
    a, b = Checkpoint(whole).hf_state_dict(), Checkpoint(resumed).hf_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a, opt_b = Checkpoint(whole).optimizer_state(), Checkpoint(resumed).optimizer_state()
    assert opt_a.step == opt_b.step == 12 and opt_a.moments.keys() == opt_b.moments.keys()
    for name in opt_a.moments:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.moments[name][key], opt_b.moments[name][key]), (name, key)


def test_golden_loss_curve(tmp_path, train_data):
    """A tiny deterministic run's losses stay where they were when this file was written (within tolerance)."""
    _pretrain(train_data, tmp_path / "run", 10)
    got = losses(tmp_path / "run")
    if os.environ.get("SLM_UPDATE_GOLDEN"):
        GOLDEN.write_text("".join(f"{x:.6f}\n" for x in got))
    want = [float(x) for x in GOLDEN.read_text().split()]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_bf16_autocast_on_cpu_follows_fp32(tmp_path, train_data):
    """train.dtype: bf16 on a CPU (what `auto` picks on CPUs with bf16 units): bf16 products, fp32 master weights and
    optimizer; the loss curve stays within a few hundredths of fp32's and the weights saved are fp32."""
    _pretrain(train_data, tmp_path / "fp32", 20)
    _pretrain(train_data, tmp_path / "bf16", 20, sets=["train.dtype=bf16"])
    a, b = np.array(losses(tmp_path / "fp32")), np.array(losses(tmp_path / "bf16"))
    assert len(a) == len(b) == 20 and not np.array_equal(a, b)  # bf16 did run: not the fp32 arithmetic
    np.testing.assert_allclose(b, a, atol=0.05)
    assert b[-5:].mean() < b[0] - 0.5  # and it learns as fp32 does
    ckpt = Checkpoint(tmp_path / "bf16" / "checkpoints" / "step-00000020")
    assert all(v.dtype == torch.float32 for v in ckpt.state_dict().values())


def test_auto_dtype_follows_the_cpu(monkeypatch, tmp_path):
    """auto: bf16 on a GPU and on CPUs whose flags say avx512_bf16 or amx_bf16, fp32 on other CPUs."""
    from slm.train import engine
    from slm.train.config import TrainSettings

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for flags, want in (("fpu sse avx2 avx512f", "fp32"), ("fpu avx512f avx512_bf16 avx512_vnni", "bf16"),
                        ("fpu amx_bf16 amx_tile", "bf16")):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(engine, "CPUINFO", str(info))
        engine.cpu_has_bf16.cache_clear()
        assert engine.compute_dtype(TrainSettings(), cpu) == want
        assert engine.compute_dtype(TrainSettings(dtype="fp32"), cpu) == "fp32"
        assert engine.compute_dtype(TrainSettings(), cuda) == "bf16"
    engine.cpu_has_bf16.cache_clear()


def test_checkpoint_opens_in_transformers(tmp_path, train_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slm.inference.load import load_model

    last = _pretrain(train_data, tmp_path / "run", 3)
    hf = AutoModelForCausalLM.from_pretrained(str(last))
    tok = AutoTokenizer.from_pretrained(str(last))
    ids = tok("def main():\n    return 42\n", return_tensors="pt")["input_ids"]
    ours = load_model(Checkpoint.open(last), torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    assert type(hf).__name__ == "StableLmForCausalLM"
    # a run directory stands for its latest checkpoint
    assert Checkpoint.open(tmp_path / "run").dir == last.resolve()


def test_greedy_generate_equals_transformers(tmp_path, train_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slm.inference.generate import GenerateConfig, generate_ids

    last = _pretrain(train_data, tmp_path / "run", 6)
    prompt = "import os\n\ndef"
    ours = generate_ids(GenerateConfig(checkpoint=last, prompt=prompt, max_new_tokens=12, temperature=0,
                                       stop_at_eos=False, device="cpu"))
    hf = AutoModelForCausalLM.from_pretrained(str(last))
    tok = AutoTokenizer.from_pretrained(str(last))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    assert ours == want.tolist()
    proc = run_cli("generate", last, prompt, "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    until_eos = ours[:ours.index(tok.eos_token_id)] if tok.eos_token_id in ours else ours
    assert proc.stdout == tok.decode(until_eos) + "\n"  # streamed piece by piece, the same text
    sampled = run_cli("generate", last, prompt, "--max-new-tokens", "8", "--seed", "3", "--device", "cpu")
    again = run_cli("generate", last, prompt, "--max-new-tokens", "8", "--seed", "3", "--device", "cpu")
    assert sampled.returncode == 0 and sampled.stdout == again.stdout  # seeded sampling is reproducible


def test_cooldown_reaches_zero_and_continues_the_lineage(tmp_path, train_data):
    base = _pretrain(train_data, tmp_path / "run", 8)
    lr_at_8 = json.loads((base / "train_state" / "state.json").read_text())["lr"]
    last = cooldown(CooldownConfig(source=tmp_path / "run", data=train_data / "mix", out=tmp_path / "cool", steps=5,
                                   phase="decay", device="cpu"))
    rows = [r for r in read_metrics(tmp_path / "cool") if "loss" in r]
    assert [r["step"] for r in rows] == [8, 9, 10, 11, 12]  # step numbers continue
    assert rows[0]["lr"] == pytest.approx(lr_at_8)
    assert rows[-1]["lr"] == 0.0
    assert [r["lr"] for r in rows] == pytest.approx([lr_at_8 * (4 - i) / 4 for i in range(5)])
    m = json.loads((last / "manifest.json").read_text())
    assert m["stage"] == "cooldown" and m["parent"] == str(base.resolve()) and m["step"] == 13
    state = json.loads((last / "train_state" / "state.json").read_text())
    plan = json.loads((train_data / "mix" / "plan.json").read_text())
    decay_start = plan["phases"][0]["samples"]
    assert state["cooldown"]["data_start"] == decay_start and state["samples_seen"] == decay_start + 5 * 8
    assert state["tokens_seen"] == 13 * 256


def test_cooldown_stopped_by_a_signal_resumes_exactly(tmp_path, train_data, monkeypatch):
    from slm.formats.metrics import MetricsLog

    _pretrain(train_data, tmp_path / "run", 4)
    kw = dict(source=tmp_path / "run", data=train_data / "mix", lr_start=1e-3, device="cpu", steps=6)
    cooldown(CooldownConfig(out=tmp_path / "whole", **kw))
    write = MetricsLog.write
    seen = []

    def write_then_signal(self, record):
        write(self, record)
        seen.append(record)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends before the time limit

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    with pytest.raises(Stopped, match="stopped by SIGUSR1 after step 7"):
        cooldown(CooldownConfig(out=tmp_path / "split", **kw))
    monkeypatch.setattr(MetricsLog, "write", write)
    last = cooldown(CooldownConfig(out=tmp_path / "split", **kw))
    assert last.name == "step-00000010"
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert [r["lr"] for r in read_metrics(tmp_path / "split")][-1] == 0.0


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path, train_data):
    """A scheduler's SIGTERM: the run saves at the end of the step, exits non-zero; the same command resumes and
    the losses equal an uninterrupted run's."""
    _pretrain(train_data, tmp_path / "whole", 30)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "slm", "pretrain", "--config", str(train_data / "model.yaml"), "--data",
            str(train_data / "mix"), "--out", str(out), "--steps", "30", "--device", "cpu",
            "--set", "train.save_every=1000"]
    gate = Gate(tmp_path / "gate", step=5)
    proc = subprocess.Popen(args, env=gate.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gate.wait("reached", proc)
    gate.signal(proc, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75 and "stopped by SIGTERM" in stderr and stdout == ""  # EX_TEMPFAIL: run again
    stopped_at = Checkpoint.open(out).step
    assert 5 <= stopped_at < 30
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert losses(out) == losses(tmp_path / "whole")


def test_a_finished_run_prints_the_same_path_again(tmp_path, train_data):
    """Re-running a finished run does nothing and prints the checkpoint as the first run did (as the user named the
    run directory), so `ckpt=$(slm pretrain ...)` holds the same text either way."""
    args = ["pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--out", "runs/p",
            "--steps", "2", "--device", "cpu"]
    first, again = run_cli(*args, cwd=tmp_path), run_cli(*args, cwd=tmp_path)
    assert first.returncode == again.returncode == 0, again.stderr
    assert first.stdout == again.stdout == "runs/p/checkpoints/step-00000002\n"
    assert "already at step 2 of 2" in again.stderr and "0 steps done" in again.stderr
    m = json.loads((tmp_path / "runs" / "p" / "manifest.json").read_text())  # the run's own manifest
    assert m["kind"] == "run" and m["stage"] == "pretrain" and m["counts"]["end_step"] == 2
    assert [i["role"] for i in m["inputs"]] == ["mix"] and len(m["inputs"][0]["sha256"]) == 64


def test_refusals(tmp_path, train_data, arcade_dir):
    mix = train_data / "mix"
    cfg = train_data / "model.yaml"
    proc = run_cli("pretrain", "--config", cfg, "--data", mix, "--out", tmp_path / "r1", "--steps", "100000")
    assert proc.returncode == 1 and "plan more tokens" in proc.stderr
    proc = run_cli("pretrain", "--config", cfg, "--data", mix, "--out", tmp_path / "r2", "--steps", "2",
                   "--set", "train.tokens_per_step=250")
    assert proc.returncode == 1 and "not a multiple of the mix's seq_len 32" in proc.stderr
    proc = run_cli("pretrain", "--config", cfg, "--data", mix, "--out", tmp_path / "r3", "--steps", "2",
                   "--set", "model.vocab_size=512")
    assert proc.returncode == 1 and "the tokenizer has 1024 ids, more than the model's vocab_size 512" in proc.stderr
    proc = run_cli("pretrain", "--config", cfg, "--data", mix, "--out", tmp_path / "r4", "--steps", "2",
                   "--set", "train.lr_pek=1")
    assert proc.returncode == 1 and "train.lr_pek: unknown field; did you mean 'lr_peak'?" in proc.stderr
    proc = run_cli("pretrain", "--data", mix, "--out", tmp_path / "r5", "--steps", "2")
    assert proc.returncode == 2 and "--recipe: missing" in proc.stderr  # bad usage
    for r in ("r1", "r2", "r3", "r4", "r5"):  # each failed before its first checkpoint: nothing left
        assert not (tmp_path / r).exists(), r
    # A checkpoint trained on another tokenizer is refused before any work.
    last = _pretrain(train_data, tmp_path / "base", 1)
    other = tmp_path / "other"
    other.mkdir()
    for f in last.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    for f in ("encoding.json", "tokenizer.tiktoken"):
        (other / f).write_bytes((arcade_dir / f).read_bytes())
    proc = run_cli("pretrain", "--init", other, "--data", mix, "--out", tmp_path / "r6", "--steps", "2")
    assert proc.returncode == 1 and "the checkpoint's tokenizer" in proc.stderr
    # A run directory is not silently re-purposed with another configuration.
    proc = run_cli("pretrain", "--config", cfg, "--data", mix, "--out", tmp_path / "base", "--steps", "2",
                   "--set", "train.lr_peak=0.5")
    assert proc.returncode == 1 and "train.lr_peak is 0.003 in this run" in proc.stderr
    for d in ("r1", "r2", "r3", "r4", "r5", "r6"):
        assert not (tmp_path / d / "checkpoints").exists()


def test_plot_command(tmp_path, train_data):
    _pretrain(train_data, tmp_path / "run", 3)
    (tmp_path / "run" / "loss.png").unlink()
    proc = run_cli("plot", tmp_path / "run")
    assert proc.returncode == 0 and Path(proc.stdout.strip()).stat().st_size > 1000


def test_init_from_a_transformers_checkpoint(tmp_path, train_data):
    """slm reads a transformers directory (config.json + model.safetensors) saved by transformers itself."""
    from transformers import AutoModelForCausalLM

    last = _pretrain(train_data, tmp_path / "run", 2)
    hf = AutoModelForCausalLM.from_pretrained(str(last))
    hf.save_pretrained(str(tmp_path / "hf"))
    out = pretrain(PretrainConfig(data=train_data / "mix", out=tmp_path / "cont", init=tmp_path / "hf", steps=2,
                                  config_file=train_data / "model.yaml", device="cpu"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["parent"] == str((tmp_path / "hf").resolve())


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one(tmp_path, train_data):
    """torchrun --nproc_per_node 2 (gloo): the same samples per step, so the same losses as one process; one
    energy meter for the node (local rank 0), not one per process."""
    _pretrain(train_data, tmp_path / "one", 6)
    env = dict(os.environ, OMP_NUM_THREADS="1", SLM_ENERGY="on")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29531", "-m", "slm", "pretrain", "--config", str(train_data / "model.yaml"),
                           "--data", str(train_data / "mix"), "--out", str(tmp_path / "two"), "--steps", "6",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(tmp_path / "two" / "checkpoints" / "step-00000006")  # printed once
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "two" / "energy").glob("*.json")]
    assert record["stage"] == "pretrain" and record["energy_kwh"] > 0 and record["duration_s"] > 0


@pytest.mark.slow
def test_srun_environment_runs_ddp(tmp_path, train_data):
    """Two processes started the way srun starts them (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, no torchrun);
    the node's energy is metered once (SLURM_LOCALID 0)."""
    _pretrain(train_data, tmp_path / "one", 4)
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NTASKS_PER_NODE="2",
                   SLURM_JOB_ID="4242", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", SLM_ENERGY="on")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "slm", "pretrain", "--config", str(train_data / "model.yaml"), "--data",
             str(train_data / "mix"), "--out", str(tmp_path / "two"), "--steps", "4", "--device", "cpu"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert outs[0][0].strip().endswith("step-00000004") and outs[1][0] == ""  # rank 0 prints the path
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    assert len(list((tmp_path / "two" / "energy").glob("*.json"))) == 1


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path, train_data):
    """train.compile gives eager's losses, also in a process that compiled the same forward at another shape before
    (as the suite's workers do): with automatic dynamic shapes that made inductor's range analysis fail on torch
    2.13 ("Exponent must be non-negative"); training compiles static shapes."""
    import yaml

    from slm.model import ModelConfig, build

    # what tests/test_model.py's compiled-forward test leaves in a worker: both families' forwards at another shape
    base = {**yaml.safe_load((train_data / "model.yaml").read_text())["model"], "vocab_size": 512, "max_seq_len": 256,
            "hidden_size": 128, "num_heads": 4, "intermediate_size": 256}
    ids = torch.randint(0, 512, (1, 256), generator=torch.Generator().manual_seed(0))
    for family, kv, rotary in (("stablelm", 4, 0.25), ("llama", 2, 1.0)):
        cfg = ModelConfig.from_dict({**base, "family": family, "num_kv_heads": kv, "partial_rotary_factor": rotary,
                                     "qkv_bias": family == "stablelm"})
        other = torch.compile(build(cfg, seed=0), backend="eager")
        other(ids, targets=ids)
        other(ids, segment_ids=(torch.arange(256) >= 200).long()[None], targets=ids)
    _pretrain(train_data, tmp_path / "eager", 3)
    _pretrain(train_data, tmp_path / "compiled", 3, sets=["train.compile=true"])
    np.testing.assert_allclose(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-4)


def test_long_context_extension_as_a_cooldown(tmp_path, train_data, base_ckpt):
    """SmolLM2's 2k -> 8k step in miniature: a cooldown at twice the context (64 -> 128) and a new RoPE theta, on a
    mix whose long source keeps only windows inside documents of 256+ tokens; transformers opens the result with
    the new rope settings and computes the same logits past the old context."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slm.formats.mixplan import MixReader
    from slm.inference.load import load_model

    (tmp_path / "long.yaml").write_text(
        f"seq_len: 128\nseed: 2\nsources:\n  code: {train_data / 'tokens' / 'code'}\n"
        f"  prose: {train_data / 'tokens' / 'prose'}\n  code_long: {{source: code, min_doc_tokens: 256}}\n"
        "phases:\n  - {name: long-context, tokens: 4k, weights: {code_long: 0.4, code: 0.3, prose: 0.3}}\n")
    proc = run_cli("mix", tmp_path / "long.yaml", "--out", tmp_path / "mix-long")
    assert proc.returncode == 0, proc.stderr
    reader = MixReader(tmp_path / "mix-long")
    li = reader.plan.source_names.index("code_long")
    starts, lengths = reader.sources[li].document_bounds()
    for s in reader.samples(np.flatnonzero(reader.plan.locate(np.arange(len(reader)))[1] == li)):
        d = np.searchsorted(starts, s.start, side="right") - 1
        assert lengths[d] >= 256 and s.start + 129 <= starts[d] + lengths[d]
    proc = run_cli("cooldown", "--from", base_ckpt, "--data", tmp_path / "mix-long", "--out", tmp_path / "long",
                   "--steps", "2", "--set", "model.max_seq_len=128", "--set", "model.rope_theta=50000",
                   "--set", "train.micro_batch_size=2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "model max_seq_len 64 -> 128, rope_theta 10000.0 -> 50000" in proc.stderr
    last = Path(proc.stdout.strip())
    config = AutoConfig.from_pretrained(str(last))
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    assert config.max_position_embeddings == 128 and theta == 50000
    hf = AutoModelForCausalLM.from_pretrained(str(last))
    ids = torch.from_numpy(reader.sample(0).tokens[None, :120])
    ours = load_model(Checkpoint.open(last), torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    # Only the context and theta may change: the weights' shapes and meaning stay.
    proc = run_cli("cooldown", "--from", base_ckpt, "--data", tmp_path / "mix-long", "--out", tmp_path / "bad",
                   "--steps", "2", "--set", "model.max_seq_len=128", "--set", "model.num_heads=4", "--set", "train.micro_batch_size=2", "--device", "cpu")
    assert proc.returncode == 1 and "may change only max_seq_len, rope_theta (model.num_heads is 2 there)" in \
        proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    # The model's context must hold the mix's windows.
    proc = run_cli("cooldown", "--from", base_ckpt, "--data", tmp_path / "mix-long", "--out", tmp_path / "bad2",
                   "--steps", "2", "--set", "train.micro_batch_size=2", "--device", "cpu")
    assert proc.returncode == 1 and "the mix's seq_len 128 is longer than the model's max_seq_len 64" in proc.stderr


def test_recipe_long_context_steps():
    from slm.recipes import load_step
    from slm.stages.cooldown import CooldownConfig, with_recipe_step

    for name, theta in (("smollm2-1_7b", 130000), ("smollm2-360m", 100000), ("smollm2-135m", 100000)):
        cfg = with_recipe_step(CooldownConfig(source=Path("x"), data=None, out=None, recipe=f"{name}:long_context",
                                              sets=["model.rope_theta=1"]))
        assert cfg.tokens == 75 * 10**9
        assert cfg.sets == ["model.max_seq_len=8192", f"model.rope_theta={theta}", "train.micro_batch_size=1",
                            "model.rope_theta=1"]  # flags win
        mix = load_step(f"{name}:long_context", "mix")["mix"]
        assert mix["seq_len"] == 8192 and sum(mix["phases"][0]["weights"].values()) == pytest.approx(1.0)
        long = {k: v for k, v in mix["sources"].items() if isinstance(v, dict)}
        assert {v["min_doc_tokens"] for v in long.values()} == {8192}
        assert sum(mix["phases"][0]["weights"][k] for k in long) == pytest.approx(0.4)  # 40% long documents
    proc = run_cli("cooldown", "--from", "x", "--recipe", "smollm2-1_7b:warmup", "--dry-run")
    assert proc.returncode == 1 and "recipe smollm2-1_7b has no step 'warmup' (steps: long_context)" in proc.stderr
