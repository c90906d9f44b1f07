import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

from slm import __version__

COMMANDS = [[], ["tokenize"], ["tokenize", "build"], ["tokenize", "train"], ["tokenize", "encode"],
            ["tokenize", "corpus"], ["mix"], ["pretrain"], ["cooldown"], ["generate"], ["plot"], ["sft"], ["dpo"],
            ["selfknow", "generate"], ["selfknow", "train"], ["chat-data"], ["quantize"], ["bench"], ["eval"],
            ["carbon"], ["info"], ["status"], ["report"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "slm")
def test_help(cmd):
    proc = run_cli(*cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: slm" in proc.stdout


def test_version_and_entry_point():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"slm {__version__}"
    exe = os.path.join(os.path.dirname(sys.executable), "slm")
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip() == f"slm {__version__}"


def test_stage_list_in_help():
    out = run_cli("--help").stdout
    for stage in ("tokenize", "mix", "pretrain", "cooldown", "generate", "plot", "sft", "dpo", "selfknow", "quantize",
                  "bench", "eval", "carbon"):
        assert stage in out


def test_usage_errors_exit_nonzero():
    proc = run_cli("tokenize", "encode")
    assert proc.returncode == 2 and "Missing" in proc.stderr
    proc = run_cli("mix", "nonexistent.yaml", "--dry-run")
    assert proc.returncode == 1 and proc.stderr == "error: nonexistent.yaml: no such file, and not a recipe name\n"


def test_debug_shows_the_traceback():
    env = dict(os.environ, SLM_DEBUG="1")
    proc = subprocess.run([sys.executable, "-m", "slm", "mix", "nonexistent.yaml", "--dry-run"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "SlmError" in proc.stderr


@pytest.mark.parametrize("shell,name", [("bash", "slm.bash"), ("zsh", "_slm"), ("fish", "slm.fish")])
def test_completion_scripts_are_current(shell, name):
    proc = run_cli("--show-completion", shell, env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert proc.returncode == 0
    assert proc.stdout == (ROOT / "completions" / name).read_text(), "run completions/generate.sh"


def test_completion_completes_commands_and_options():
    env = {"_SLM_COMPLETE": "complete_bash", "COMP_WORDS": "slm tok", "COMP_CWORD": "1"}
    assert run_cli(env=env).stdout.split() == ["tokenize"]
    env = {"_SLM_COMPLETE": "complete_bash", "COMP_WORDS": "slm tokenize encode --sk", "COMP_CWORD": "3"}
    assert run_cli(env=env).stdout.split() == ["--skip-bad"]


def test_completion_completes_option_values():
    """--recipe, a cooldown's RECIPE:STEP, --suite and --gpu complete to what the command accepts."""
    def complete(words):
        env = {"_SLM_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        return run_cli(env=env).stdout.split()

    assert complete("slm pretrain --recipe smollm2-1") == ["smollm2-135m", "smollm2-1_7b"]
    assert complete("slm sft --recipe ti") == ["tiny"]
    assert "smollm2-1_7b:long_context" in complete("slm cooldown --recipe smollm2-1_7b")
    assert complete("slm eval m --suite stablelm2-") == ["stablelm2-leaderboard", "stablelm2-multilingual"]
    assert complete("slm carbon estimate --gpu mi") == ["mi300x", "mi250x"]
