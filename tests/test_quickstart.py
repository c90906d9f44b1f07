"""The README's first command, run as a user would: `bash examples/quickstart.sh OUT`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from slm.formats.metrics import read_metrics
from slm.formats.mixplan import MixReader
from slm.formats.tokenizer import Tokenizer


@pytest.mark.slow
def test_quickstart_runs_every_stage(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, SLM_VENV=os.environ.get("SLM_VENV", str(ROOT / ".venv")), SLM_ENERGY="on")
    try:  # ~16 min alone on 2 cores; in CI it shares them with the other test worker
        proc = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), str(out)], capture_output=True,
                              text=True, env=env, timeout=3000)
    except subprocess.TimeoutExpired as e:  # say which stage it was in
        tail = (e.stderr or b"").decode(errors="replace")[-3000:]
        raise AssertionError(f"the quickstart ran past {e.timeout} s; its stderr ended with:\n{tail}") from None
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout carries only the paths each stage wrote
    lines = proc.stdout.splitlines()
    assert lines[:8] == ["corpus", "tokenizer", "tokens/code", "tokens/prose", "tokens/valid", "mix",
                         "runs/pretrain/checkpoints/step-00000150", "runs/cooldown/checkpoints/step-00000180"]
    i = lines.index("chatdata")  # after the generated text (which may span lines)
    assert lines[i + 1].startswith("runs/sft/checkpoints/step-") and lines[i + 2].startswith("runs/dpo/checkpoints/")
    j = lines.index("selfknow")
    assert lines[j + 1].startswith("runs/selfknow/checkpoints/step-")
    assert "".join(lines[8:i]).strip() and "".join(lines[i + 3:j]).strip()  # the generated text, the chat answer
    k = lines.index("release")
    assert "pebble" in "".join(lines[j + 2:k]).lower()  # who it is, asked with no system prompt
    assert lines[k + 1:k + 5] == ["bench", "eval", "carbon", f"# slm report: {out}"]
    # The closing summary (also report.md): every part, with the numbers of the files it summarises.
    report = "\n".join(lines[k + 4:]) + "\n"
    assert report == (out / "report.md").read_text()
    for section in ("## Training", "## DPO", "## Self-knowledge", "## Quantization (release)", "## Speed (bench)",
                    "## Evaluation (eval, suite slm-local)", "## Carbon (carbon)"):
        assert section in report, section
    bench = [line for line in report.split("## Speed (bench)")[1].split("##")[0].splitlines() if line.startswith("| ")]
    assert len(bench) == 5 and [row.split("|")[2].strip() for row in bench[1:]] == ["torch", "llama.cpp",
                                                                                      "llama.cpp", "openvino"]
    assert "the token ledger" in proc.stderr
    tok = Tokenizer(out / "tokenizer")
    assert tok.n_vocab == 8192
    reader = MixReader(out / "mix")
    plan = json.loads((out / "mix" / "plan.json").read_text())
    assert [p["name"] for p in plan["phases"]] == ["stable", "decay"]
    assert len(reader) == plan["total_samples"] > 30_000
    batch, _ = reader.batch(np.arange(4))
    assert batch.shape == (4, plan["seq_len"] + 1)
    assert [s["path"] for s in plan["sources"]] == [str(out / "tokens" / "code"), str(out / "tokens" / "prose")]
    assert plan["tokenizer_sha256"] == tok.hash
    # The tiny model learned something: its held-out loss is far below the context-free (unigram) baseline.
    valid = [r for r in read_metrics(out / "runs" / "cooldown") if "valid_loss" in r]
    assert valid[-1]["valid_loss"] < valid[-1]["unigram_loss"] - 1.0
    pre = [r for r in read_metrics(out / "runs" / "pretrain") if "valid_loss" in r][-1]
    assert f"| pretrain | runs/pretrain | 150 | {pre['tokens_seen']:,} |" in report
    assert f"| {pre['valid_loss']:.3f} | {pre['unigram_loss']:.3f} |" in report
    assert f"| cooldown | runs/cooldown | 180 | {valid[-1]['tokens_seen']:,} |" in report
    assert f"| {valid[-1]['valid_loss']:.3f} | {valid[-1]['unigram_loss']:.3f} |" in report
    cool = [r for r in read_metrics(out / "runs" / "cooldown") if "loss" in r]
    assert cool[-1]["lr"] == 0.0 and cool[-1]["step"] == 179
    # sft taught the answers (held-out loss on assistant tokens fell), dpo the preference: the held-out pairs'
    # preference accuracy rises clearly, and the reward margin against the reference is positive on most of them
    sft_valid = [r["valid_loss"] for r in read_metrics(out / "runs" / "sft") if "valid_loss" in r]
    assert sft_valid[-1] < 2.6
    assert "dpo data" in proc.stderr and "dropped: tie (equal scores)" in proc.stderr
    summary = json.loads((out / "runs" / "dpo" / "dpo.json").read_text())
    assert summary["preference_accuracy_after"] > summary["preference_accuracy_before"] + 0.15, summary
    assert summary["reward_accuracy"] > 0.65, summary
    assert (f"{summary['preference_accuracy_before']:.0%} before, **{summary['preference_accuracy_after']:.0%} "
            "after**") in report
    assert (out / "runs" / "dpo" / "reference_logprobs" / "logprobs.safetensors").is_file()
    # selfknow: the pairs are dpo's format; the held-out questions' answers state the name and maker after C-RLFT,
    # and did not before
    pairs = [json.loads(line) for line in (out / "selfknow" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) > 150 and {"prompt", "chosen", "rejected"} <= set(pairs[0])
    sk = json.loads((out / "runs" / "selfknow" / "selfknow.json").read_text())
    assert sk["before"]["name"] < 0.3 and sk["after"]["name"] > 0.7, sk
    assert sk["after"]["both"] > sk["before"]["both"] + 0.4, sk
    assert f"the name Pebble in {sk['before']['name']:.0%} before, **{sk['after']['name']:.0%} after**" in report
    # quantize: every release format, each scored by its runtime against fp32
    q = json.loads((out / "release" / "quantize.json").read_text())
    t = q["types"]
    assert set(t) == {"f16", "q8_0", "q4_0", "q4_1", "q5_k_m", "q4_k_m", "int4"}
    assert abs(t["f16"]["perplexity"] / q["reference"]["perplexity"] - 1) < 1e-3
    assert t["q4_0"]["kl_mean"] > t["q8_0"]["kl_mean"] > 0 and t["q8_0"]["top1_agreement"] > 0.98
    assert t["q4_k_m"]["tensor_types"].get("Q4_K", 0) > 0 and t["int4"]["top1_agreement"] > 0.9
    assert (out / "release" / "selfknow-q4_k_m.gguf").is_file()
    assert f"| q4_k_m | {t['q4_k_m']['bytes'] / 1e6:,.2f} MB | {t['q4_k_m']['bits_per_weight']:.2f} |" in report
    # eval: lm-eval scored the base, chat and quantized models on the local tasks; the q8_0 file agrees with the
    # checkpoint it came from
    ev = json.loads((out / "eval" / "eval.json").read_text())
    scores = {m["label"]: m["scores"] for m in ev["models"]}
    assert list(scores) == ["cooldown", "selfknow", "selfknow-q8_0", "selfknow-q4_k_m"]
    bpb = {k: v["slm_heldout"]["value"] for k, v in scores.items()}
    assert bpb["cooldown"] < bpb["selfknow"] and abs(bpb["selfknow-q8_0"] / bpb["selfknow"] - 1) < 0.01
    assert scores["cooldown"]["slm_cloze"]["n"] == 40 and "| selfknow-q4_k_m |" in proc.stderr
    # carbon: every computing stage metered its energy; the bill adds them up
    bill = json.loads((out / "carbon" / "carbon.json").read_text())
    stages = {r["stage"] for r in bill["rows"]}
    assert {"tokenize encode", "pretrain", "cooldown", "sft", "dpo", "selfknow train", "quantize", "bench",
            "eval"} <= stages
    assert f"{bill['total']['energy_kwh']:.6f} kWh" in report and bill["model_card"] in report
    assert bill["total"]["energy_kwh"] == pytest.approx(sum(r["energy_kwh"] for r in bill["rows"]))
    assert bill["total"]["energy_kwh"] > 0 and "kWh" in (out / "carbon" / "carbon.md").read_text()
    # Every artifact names every input it was made from by absolute path and sha256, so that `slm info` walks the
    # released file back to the raw text; a run directory has its own manifest.
    for m_path in sorted(out.rglob("manifest.json")):
        m = json.loads(m_path.read_text())
        for i in m.get("inputs", []):
            if i["path"] != "-" and "://" not in i["path"]:
                assert os.path.isabs(i["path"]) and len(i.get("sha256") or "") == 64, (str(m_path), i)
    newest = json.loads((out / "runs" / "selfknow" / "checkpoints" / "latest" / "manifest.json").read_text())
    assert {i["role"] for i in newest["inputs"]} >= {"parent", "data", "facts"}
    info = subprocess.run([sys.executable, "-m", "slm", "info", str(out / "release" / "selfknow-q4_k_m.gguf"),
                           "--depth", "12"], capture_output=True, text=True, cwd=out)
    assert info.returncode == 0 and "Q4_K_M" in info.stdout and "file type" not in info.stdout, info.stderr
    for ancestor in ("selfknow_pairs", "runs/dpo", "runs/cooldown", "runs/pretrain", "mix", "tokens/code",
                     "corpus/code/train.jsonl", "facts.yaml"):
        assert ancestor in info.stdout, ancestor
    rep = subprocess.run([sys.executable, "-m", "slm", "report", str(out), "--json"], capture_output=True, text=True)
    steps = {e["dir"]: e["step"] for e in json.loads(rep.stdout)["training"]}
    assert steps["runs/pretrain"] == 150 and steps["runs/cooldown"] == 180  # as the Markdown and the checkpoints say
