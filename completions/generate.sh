#!/usr/bin/env bash
# Regenerate the shell completion scripts from the app (tests/test_cli.py checks they are current).
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-../.venv/bin/python}
for shell in bash zsh fish; do
  case $shell in bash) f=slm.bash ;; zsh) f=_slm ;; fish) f=slm.fish ;; esac
  _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION=1 "$py" -m slm --show-completion "$shell" > "$f"
done
