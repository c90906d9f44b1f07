"""The command line under the mistakes people make: for each bad input, the exit code (2 bad usage, 1 an error the
input or the machine causes), one line on stderr that says what is wrong, no traceback, and nothing left behind
where the output would have gone. Then the signals and pipes a person at a terminal uses, and the help at 80
columns."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import Gate, run_cli

CHAT = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]}] * 8


@pytest.fixture(scope="module")
def files(tmp_path_factory, train_data, base_ckpt):
    """The inputs of the table: a mix, a base checkpoint (no chat template), chat data, a directory of someone
    else's files, a mixture whose weights add up to 1.4."""
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    (d / "theirs").mkdir()
    (d / "theirs" / "thesis.tex").write_text("not a run\n")
    return {"MIX": str(train_data / "mix"), "MODEL_YAML": str(train_data / "model.yaml"), "BASE": str(base_ckpt),
            "CHAT": str(d / "chat.jsonl"), "THEIRS": str(d / "theirs"), "TOKENS": str(train_data / "tokens" / "code"),
            "MIXYAML": str(train_data / "mix.yaml"), "D": str(d)}


# (arguments, exit code, what stderr's one line says); OUT is a fresh path that must not exist afterwards.
TABLE = [
    # numbers out of their range
    ("pretrain --config MODEL_YAML --data MIX --out OUT --steps 0", 2, "--steps 0: expected a positive integer"),
    ("pretrain --config MODEL_YAML --data MIX --out OUT --steps -3", 2, "--steps -3: expected a positive integer"),
    ("pretrain --config MODEL_YAML --data MIX --out OUT --tokens 0", 2, "--tokens: expected a positive token budget, got '0'"),
    ("pretrain --config MODEL_YAML --data MIX --out OUT --keep 0", 2, "--keep 0: expected a positive integer"),
    ("pretrain --config MODEL_YAML --data MIX --out OUT --zero-stage 4", 2, "--zero-stage 4: expected 1, 2 or 3"),
    ("pretrain --config MODEL_YAML --data MIX --dry-run --mfu 2", 2, "--mfu 2.0: expected a number above 0"),
    ("pretrain --config MODEL_YAML --data MIX --dry-run --gpu b200x", 2, "--gpu 'b200x': unknown; expected one of"),
    ("sft --model BASE --data CHAT --out OUT --steps -1", 2, "--steps -1: expected a positive integer"),
    ("generate BASE hi --max-new-tokens -5", 2, "--max-new-tokens -5: expected a positive integer"),
    ("generate BASE hi --temperature -1", 2, "--temperature -1.0: expected a number >= 0"),
    ("generate BASE hi --top-p 2", 2, "--top-p 2.0: expected a number above 0, at most 1"),
    ("generate BASE hi --top-p 0", 2, "--top-p 0.0: expected a number above 0, at most 1"),
    ("generate BASE hi --top-k -4", 2, "--top-k -4: expected an integer >= 0"),
    ("selfknow generate --chat BASE --facts F --out OUT --message-top-p 0", 2, "--message-top-p 0.0: expected"),
    ("bench BASE --gen 0", 2, "--gen 0: expected a positive integer"),
    ("quantize BASE --out OUT --window 1", 2, "--window 1: expected an integer >= 2"),
    ("eval BASE --tasks x --out OUT --limit 0", 2, "--limit 0.0: expected a positive number"),
    ("status BASE --interval 0", 2, "--interval 0.0: expected a positive number"),
    ("carbon estimate --gpu-hours 10 --power -3 --intensity 5", 2, "--power -3.0: expected a positive number"),
    ("carbon estimate --gpu-hours 10 --gpu b200x --intensity 5", 2, "--gpu 'b200x': unknown; expected one of"),
    ("chat-data --out OUT --n 5", 2, "--n 5: expected at least 10 questions"),
    ("tokenize corpus --out OUT --heldout-percent 100", 2, "--heldout-percent 100.0: expected a number from 0"),
    # what is missing, unknown or malformed on the command line
    ("sft --data CHAT --out OUT", 2, "--model: missing"),
    ("sft --model BASE --out OUT", 2, "--data: missing"),
    ("sft --model BASE --data CHAT", 2, "--out: missing"),
    ("pretrain --data MIX --out OUT", 2, "--recipe: missing"),
    ("pretrain --recipe tiny --data MIX --out OUT --stepz 3", 2, "No such option: --stepz"),
    ("pretrain --recipe tiny --data MIX --out OUT --steps three", 2, "Invalid value for '--steps'"),
    ("tokenize encode", 2, "Missing argument"),
    ("cooldown --from BASE --data MIX --out OUT --set train.lr_peak=3e-4", 2, "a cooldown does not use train.lr_peak"),
    # options that name what the command does not have, and what cannot be written
    ("generate BASE --chat hi", 1, "not a chat model"),
    ("mix MIXYAML --out /proc/slm-test-mix", 1, "/proc/slm-test-mix: cannot be written"),
    ("tokenize encode --tokenizer TOK CHAT --out /proc/slm-test-tokens", 1, "cannot be written"),
    ("tokenize encode --tokenizer TOK - --out OUT", 1, "-: standard input is empty (expected at least one document"),
    ("pretrain --config MODEL_YAML --data MIX --out /proc/slm-test-run --steps 2", 1, "cannot be written"),
    ("pretrain --config MODEL_YAML --data MIX --out THEIRS --steps 2", 1, "holds what a run does not write (thesis.tex)"),
    # a training stage that fails after it started: its run directory goes (none of it is a checkpoint)
    ("pretrain --config MODEL_YAML --data MIX --out OUT --steps 2 --valid MIX", 1, "kind is 'mix', expected 'tokens'"),
]


@pytest.mark.parametrize("line,code,says", TABLE, ids=[row[0][:60] for row in TABLE])
def test_a_bad_input_is_one_line_and_leaves_nothing(tmp_path, files, small_tok, line, code, says):
    out = tmp_path / "out"
    subs = dict(files, OUT=str(out), F=str(tmp_path / "facts.yaml"), TOK=str(small_tok))
    (tmp_path / "facts.yaml").write_text("name: Ada\nmaker: Lab\n")
    proc = run_cli(*[subs.get(a, a) for a in line.split()], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines and lines[-1].startswith("error: ") and says in lines[-1], proc.stderr
    assert [x for x in lines if x.startswith("error: ")] == [lines[-1]]
    if code == 2:  # bad usage is refused before any work: nothing else is said
        assert lines == [lines[-1]], proc.stderr
    assert not out.exists(), f"{out} left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.yaml"]  # no out.tmp-*, no probe
    assert sorted(os.listdir(files["THEIRS"])) == ["thesis.tex"]


def test_the_usage_exit_codes_and_slm_alone():
    """`slm` alone: its help on stderr (stdout carries only results) and exit 2, as for a group without its
    command; --help and --version: stdout, exit 0."""
    alone = run_cli()
    assert alone.returncode == 2 and alone.stdout == "" and "Usage: slm" in alone.stderr
    assert alone.stderr.strip().splitlines()[-1] == "error: slm: give a command (slm -h lists them)"
    group = run_cli("selfknow")
    assert group.returncode == 2 and group.stdout == "" and "generate" in group.stderr
    assert run_cli("--help").returncode == 0 and run_cli("-h").stdout == run_cli("--help").stdout


def test_a_closed_pipe_ends_generate_quietly(base_ckpt):
    """`slm generate ... | head -c 1`: the reader leaves; slm stops as `cat` does (SIGPIPE), with nothing on
    stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "slm", "generate", str(base_ckpt), "def", "--max-new-tokens", "64",
                             "--temperature", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (-signal.SIGPIPE, 128 + signal.SIGPIPE), err
    assert err == b"", err


def test_ctrl_c_saves_and_a_second_stops_at_once(tmp_path, train_data):
    """SIGINT (Ctrl-C) at step 7 of 20: the step ends, a checkpoint is saved, progress.json says stopped, exit 75
    (as SIGTERM). A second SIGINT while the first is pending stops at once without saving: exit 130, and the run
    keeps the checkpoints it had; it resumes from them."""
    def start(out, gate):
        return subprocess.Popen(
            [sys.executable, "-m", "slm", "pretrain", "--config", str(train_data / "model.yaml"), "--data",
             str(train_data / "mix"), "--out", str(out), "--steps", "20", "--device", "cpu"],
            env=gate.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    gate = Gate(tmp_path / "gate", step=6)
    proc = start(tmp_path / "once", gate)
    gate.wait("reached", proc)
    gate.signal(proc, signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err
    assert "SIGINT: saving a checkpoint after step 7, then stopping (press Ctrl-C again" in err
    assert "stopped by SIGINT after step 7" in err and out == ""
    assert (tmp_path / "once" / "checkpoints" / "step-00000007").is_dir()
    assert json.loads((tmp_path / "once" / "progress.json").read_text())["state"] == "stopped"

    gate.close()
    proc = start(tmp_path / "twice", gate)
    gate.wait("reached", proc)
    proc.send_signal(signal.SIGINT)
    gate.wait("signal", proc)
    proc.send_signal(signal.SIGINT)  # while the step is held: the first signal still waits for its end
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: stopped at once by a second SIGINT during step 7, "
                                                   "without saving")
    ckpts = sorted(p.name for p in (tmp_path / "twice" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000005"]  # save_every 5: what it had, nothing of step 7
    assert json.loads((tmp_path / "twice" / "progress.json").read_text())["state"] == "stopped"
    gate.open()
    resumed = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--out",
                      tmp_path / "twice", "--steps", "8", "--device", "cpu")
    assert resumed.returncode == 0 and "resuming" in resumed.stderr and "at step 5" in resumed.stderr


@pytest.mark.parametrize("cmd", [[], ["tokenize"], ["selfknow"], ["eval"], ["selfknow", "generate"], ["quantize"],
                                 ["info"], ["carbon"], ["pretrain"], ["cooldown"], ["sft"]])
def test_help_fits_80_columns_whole(cmd):
    """At 80 columns no line is longer and no option name is cut; every command and group shows an example."""
    proc = run_cli(*cmd, "--help", env={"COLUMNS": "80"})
    assert proc.returncode == 0
    assert all(len(line) <= 80 for line in proc.stdout.splitlines()), proc.stdout
    assert "…" not in proc.stdout
    assert "Example" in proc.stdout
    import typer

    from slm.cli import app

    command = typer.main.get_command(app)
    for name in cmd:
        command = command.commands[name]
    for p in getattr(command, "params", []):
        if getattr(p, "hidden", False):
            continue
        for opt in (*p.opts, *getattr(p, "secondary_opts", [])):
            if opt.startswith("--"):
                assert opt in proc.stdout, f"{opt} is not shown whole"


def test_carbon_estimate_has_its_own_help():
    proc = run_cli("carbon", "estimate", "--help", env={"COLUMNS": "80"})
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: slm carbon estimate [OPTIONS]")
    assert "--gpu-hours" in proc.stdout and "--out" not in proc.stdout
