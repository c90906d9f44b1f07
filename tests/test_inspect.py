"""slm info (manifest and ancestry) and slm status (where a run is, from its own files)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli


def _walk(node):
    yield node
    for c in node.get("from", []):
        yield from _walk(c)


def test_info_shows_the_ancestry(tmp_path, base_ckpt, train_data, small_tok):
    """A checkpoint's ancestry reaches its mix, the tokens directories and the tokenizer; a GGUF written by
    `slm quantize` leads back to its checkpoint; JSON for jq, a tree for people."""
    proc = run_cli("info", base_ckpt, "--json")
    assert proc.returncode == 0, proc.stderr
    node = json.loads(proc.stdout)
    assert node["kind"] == "checkpoint" and node["stage"] == "pretrain" and node["step"] == 4
    run = base_ckpt.parent.parent
    assert node["checkpoints"] == ["step-00000004"] and node["run"] == str(run)
    assert json.loads(run_cli("info", run, "--json").stdout)["path"] == str(base_ckpt)  # a run: its newest
    (mix,) = [c for c in node["from"] if c["relation"] == "mix"]
    assert mix["kind"] == "mix" and mix["path"] == str(train_data / "mix")
    tokens = {c["relation"]: c for c in mix["from"]}
    assert set(tokens) == {"code", "prose"} and all(t["kind"] == "tokens" for t in tokens.values())
    tok = [c for c in tokens["code"]["from"] if c["relation"] == "tokenizer"]
    assert tok and tok[0]["kind"] == "tokenizer" and tok[0]["path"] == str(small_tok)
    tree = run_cli("info", base_ckpt)
    assert tree.returncode == 0 and "mix:" in tree.stdout and "tokenizer:" in tree.stdout

    q = tmp_path / "q"
    assert run_cli("quantize", base_ckpt, "--type", "f16", "--no-report", "--out", q).returncode == 0
    (gguf,) = q.glob("*-f16.gguf")
    g = json.loads(run_cli("info", gguf, "--json").stdout)
    assert g["kind"] == "gguf" and g["general.architecture"] == "stablelm"
    assert g["from"][0]["kind"] == "checkpoint" and g["from"][0]["path"] == node["path"]
    files = json.loads((base_ckpt / "manifest.json").read_text())["files"]
    assert g["slm.checkpoint_sha256"] == [f["sha256"] for f in files if f["path"] == "model.safetensors"][0]

    missing = run_cli("info", tmp_path / "nope")
    assert missing.returncode == 1 and "no such file or directory" in missing.stderr
    (tmp_path / "plain").mkdir()
    plain = run_cli("info", tmp_path / "plain")
    assert plain.returncode == 1 and "no manifest.json" in plain.stderr


def test_status_of_a_finished_and_a_running_run(tmp_path, base_ckpt, train_data):
    """A finished run: done, every step, its last checkpoint. A running one: state running with a step, rate and
    ETA while it trains; after kill -9, its process is gone and status says so."""
    run = base_ckpt.parent.parent
    p = json.loads(run_cli("status", run, "--json").stdout)
    assert p["state"] == "done" and p["step"] == p["total_steps"] == 4 and p["eta_s"] == 0
    assert p["last_checkpoint"].endswith("step-00000004") and p["stage"] == "pretrain"
    text = run_cli("status", run, "--follow").stdout  # a finished run: one report, then it returns
    assert "state            done" in text and "4/4 (100%)" in text

    from slm.stages.status import status

    out = tmp_path / "long"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "slm", "pretrain", "--config", str(train_data / "model.yaml"),
                             "--data", str(train_data / "mix"), "--out", str(out), "--steps", "300", "--device",
                             "cpu", "--set", "train.save_every=0"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        p = {}
        while time.time() < deadline and proc.poll() is None:
            if (out / "progress.json").is_file():
                p = status(out)
                if p.get("state") == "running" and p.get("step", 0) >= 2 and p.get("eta_s"):
                    proc.send_signal(signal.SIGSTOP)  # hold it there while we look
                    break
            time.sleep(0.05)
        assert p.get("state") == "running", (p, proc.poll())
        shown = json.loads(run_cli("status", out, "--json").stdout)
        assert shown["state"] == "running" and shown["total_steps"] == 300 and shown["tokens_per_s"] > 0
        assert shown["pid"] == proc.pid and shown["eta_s"] > 0 and 2 <= shown["step"] < 300
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    dead = json.loads(run_cli("status", out, "--json").stdout)
    assert dead["state"].startswith("died"), dead
    bad = run_cli("status", tmp_path)
    assert bad.returncode == 1 and "not a training run" in bad.stderr
