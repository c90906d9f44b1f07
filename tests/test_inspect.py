"""slm info (manifest and ancestry) and slm status (where a run is, from its own files)."""

import json
import os
import signal
import subprocess
import sys

from conftest import Gate, run_cli


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

    from slm.views.status import status

    out = tmp_path / "long"
    gate = Gate(tmp_path / "gate", step=1)  # held after its second step, however fast the machine trains
    env = gate.env(dict(os.environ, OMP_NUM_THREADS="1"))
    proc = subprocess.Popen([sys.executable, "-m", "slm", "pretrain", "--config", str(train_data / "model.yaml"),
                             "--data", str(train_data / "mix"), "--out", str(out), "--steps", "300", "--device",
                             "cpu", "--set", "train.save_every=0"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        gate.wait("reached", proc)
        p = status(out)
        assert p.get("state") == "running" and p.get("eta_s"), p
        shown = json.loads(run_cli("status", out, "--json").stdout)
        assert shown["state"] == "running" and shown["total_steps"] == 300 and shown["tokens_per_s"] > 0
        assert shown["pid"] == proc.pid and shown["eta_s"] > 0 and 1 <= shown["step"] < 300
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    dead = json.loads(run_cli("status", out, "--json").stdout)
    assert dead["state"].startswith("died"), dead
    bad = run_cli("status", tmp_path)
    assert bad.returncode == 1 and "not a training run" in bad.stderr


def _stage_dir(d, kind, name, data):
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"kind": kind, "slm_version": "x"}))
    (d / name).write_text(json.dumps(data))


def test_report_summarises_what_it_finds(tmp_path, base_ckpt):
    """slm report: the training run's numbers from its metrics.jsonl, and the parts written by dpo, selfknow,
    quantize, eval and carbon, with their numbers as the files have them; a directory with nothing, and a damaged
    file, are one-line errors."""
    import shutil

    from slm.formats.metrics import read_metrics

    root = tmp_path / "work"
    shutil.copytree(base_ckpt.parent.parent, root / "runs" / "pretrain", symlinks=True)
    (root / "runs" / "pretrain" / "dpo.json").write_text(json.dumps(
        {"valid_pairs": 10, "preference_accuracy_before": 0.5, "preference_accuracy_after": 0.8, "reward_accuracy": 0.9}))
    _stage_dir(root / "release", "quantize", "quantize.json", {
        "reference": {"perplexity": 12.0}, "types": {"q8_0": {"bytes": 2_500_000, "bits_per_weight": 8.5,
                                                              "perplexity": 12.01, "kl_mean": 0.0001,
                                                              "top1_agreement": 0.995}}})
    _stage_dir(root / "eval", "eval", "eval.json", {
        "suite": "slm-local", "tasks": [{"task": "slm_cloze", "shots": 0, "metric": "acc_norm,none"}],
        "models": [{"label": "pretrain", "scores": {"slm_cloze": {"metric": "acc_norm,none", "value": 0.25,
                                                                   "stderr": 0.05, "n": 40, "shots": 0}}}]})
    _stage_dir(root / "carbon", "carbon", "carbon.json", {
        "total": {"energy_kwh": 0.0123, "kg_co2eq": 0.0045, "device_hours": 0.5}, "model_card": "It used little."})
    proc = run_cli("report", root, "--out", tmp_path / "report.md")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (tmp_path / "report.md").read_text()
    last = [r for r in read_metrics(root / "runs" / "pretrain") if "loss" in r][-1]
    valid = [r for r in read_metrics(root / "runs" / "pretrain") if "valid_loss" in r]
    assert "| pretrain | runs/pretrain | 4 |" in proc.stdout and f"| {last['loss']:.3f} |" in proc.stdout
    if valid:
        assert f"| {valid[-1]['valid_loss']:.3f} |" in proc.stdout
    assert "50% before, **80% after**; reward accuracy 90%" in proc.stdout
    assert "| fp32 (torch) | - | 32 | 12.000 | 0 | 100% |" in proc.stdout
    assert "| q8_0 | 2.50 MB | 8.50 | 12.010 | 0.00010 | 99.5% |" in proc.stdout
    assert "| pretrain | 25.00 ± 5.00 |" in proc.stdout
    assert "0.012300 kWh, 0.004500 kg CO2eq over 0.500 device-hours." in proc.stdout and "It used little." in proc.stdout
    data = json.loads(run_cli("report", root, "--json").stdout)
    assert data["dpo"][0]["preference_accuracy_after"] == 0.8 and data["training"][0]["stage"] == "pretrain"

    (root / "eval" / "eval.json").write_text("{not json")
    proc = run_cli("report", root)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {root / 'eval' / 'eval.json'}:1: not valid JSON")
    assert proc.stderr.count("\n") == 1
    (tmp_path / "empty").mkdir()
    proc = run_cli("report", tmp_path / "empty")
    assert proc.returncode == 1 and "nothing slm wrote was found here" in proc.stderr


def test_json_summaries_of_stage_outputs(tmp_path, base_ckpt, train_data):
    """--json instead of the path: the artifact's summary (kind, stage, step, what it came from, last metrics)."""
    proc = run_cli("cooldown", "--from", base_ckpt, "--data", train_data / "mix", "--steps", "2", "--out",
                   tmp_path / "cool", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["kind"] == "checkpoint" and s["stage"] == "cooldown" and s["step"] == 6
    assert s["path"].endswith("step-00000006") and s["run"] == str(tmp_path / "cool")
    assert {f["relation"]: f["path"] for f in s["from"]}["parent"] == str(base_ckpt.resolve())
    assert s["metrics"]["step"] == 6 and isinstance(s["metrics"]["loss"], float)  # steps done, as the checkpoint
    plot = json.loads(run_cli("plot", tmp_path / "cool", "--json").stdout)
    assert plot == {"path": str(tmp_path / "cool" / "loss.png")}
    gen = run_cli("generate", tmp_path / "cool", "def", "--max-new-tokens", "4", "--temperature", "0", "--device",
                  "cpu", "--json")
    assert gen.returncode == 0, gen.stderr
    g = json.loads(gen.stdout)
    assert g["prompt"] == "def" and isinstance(g["completion"], str)
