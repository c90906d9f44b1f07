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
exec "${SLM_VENV:-$root/.venv}/bin/python" -m pytest -n "${SLM_TEST_WORKERS:-2}" "$@"
