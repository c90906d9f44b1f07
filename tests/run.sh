#!/usr/bin/env bash
# Set up (or reuse) the environment and run the whole test suite, slow tests included.
#   bash tests/run.sh [pytest args]      e.g. bash tests/run.sh -m "not slow" -x
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh" test
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed compiles one small communication op at first use (~25 s): keep it with the environment.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${SLM_VENV:-$root/.venv}/torch_extensions}"
# Each test worker's torch (and what its tests start) gets its share of the cores: two workers each running as many
# OpenMP threads as there are cores spin against each other, and the suite runs slower than its work.
workers=${SLM_TEST_WORKERS:-2}
cores=$(nproc)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( workers == 0 ? cores : (cores / workers > 1 ? cores / workers : 1) ))}"
exec "${SLM_VENV:-$root/.venv}/bin/python" -m pytest -n "$workers" "$@"
