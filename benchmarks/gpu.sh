#!/usr/bin/env bash
# The prepared GPU check: slm's GPU path tested, then measured, on one CUDA device, in under 8 minutes.
#
#   bash benchmarks/gpu.sh [OUT_DIR]          (default: gpu-check; $OUT when set, as on a lent device machine)
#
# 1. `pytest -m gpu` (tests/test_gpu.py): FlexAttention document masking against masked SDPA (forward and
#    backward, both families), bf16 autocast against fp32, FSDP with its bf16 policy on one process, the compiled
#    training step, fused AdamW, the static-cache decoder (eager, compiled, CUDA graph), a bit-exact resume in
#    deterministic mode.
# 2. benchmarks/gpu.py: MFU, tokens/s and peak memory of the training step at the smollm2-360m and stablelm-2-1_6b
#    shapes (largest micro-batch that fits, activation checkpointing off and on, then compiled), the dry-run
#    planner's memory beside the measured peak, deterministic mode's cost, decode tokens/s at the 135M shape
#    (compiled, then replayed as a CUDA graph).
# Writes OUT_DIR/gpu.json and OUT_DIR/gpu.md (and the tests' junit XML and log). SLM_GPU_CHECK=cpu runs the same
# on the CPU at a tiny shape, to check the script where there is no GPU (it measures nothing).
#
# Python: SLM_PYTHON, else the project's .venv (SLM_VENV), else a python3 that already holds a CUDA torch (a GPU
# machine's own image, where nothing can be installed). slm runs from this tree (PYTHONPATH), not an installed copy.
# Wheels in .whl/ or SLM_WHEELS (benchmarks/gpu_wheels.sh downloads slm's pure-Python needs that such an image lacks) are
# installed into a temporary folder first, without the network. The run stops measuring at SLM_GPU_BUDGET_S
# seconds (default 360) after it starts, and reports what it skipped, so that it ends inside a lent machine's limits.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
start=$(date +%s)
for v in SLM_GPU_BUDGET_S SLM_GPU_TESTS_S; do
  [[ "${!v:-0}" =~ ^[0-9]+$ ]] || { echo "gpu.sh: $v=${!v}: expected whole seconds" >&2; exit 2; }
done
if [ -n "${SLM_PYTHON:-}" ]; then
  py=$SLM_PYTHON
elif [ -x "${SLM_VENV:-$root/.venv}/bin/python" ]; then
  py="${SLM_VENV:-$root/.venv}/bin/python"
elif command -v python3 >/dev/null && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  py=$(command -v python3)
  echo "gpu.sh: no .venv here: using $py, which holds a CUDA torch" >&2
else
  bash "$root/scripts/setup.sh" test >&2
  py="$root/.venv/bin/python"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
wheels=${SLM_WHEELS:-$root/.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl >&2
  export PYTHONPATH="$root:$site${PYTHONPATH#"$root"}" SLM_GPU_CARRIED="$site"
  echo "gpu.sh: installed $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site" >&2
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
check=()
if [ "${SLM_GPU_CHECK:-cuda}" = cpu ]; then
  export SLM_GPU_TESTS_DEVICE=cpu
  check=(--check)
else
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device here (SLM_GPU_CHECK=cpu checks the script on the CPU)')"
fi
cd "$root"
# The tests first: a failure is reported in gpu.md, and the measurements still run. A hung test (a collective that
# never returns, say) is stopped at SLM_GPU_TESTS_S seconds (default 240), and gpu.md says so.
rm -f "$out/gpu-tests.xml"
rc=0
timeout "${SLM_GPU_TESTS_S:-240}" "$py" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q \
  --junitxml="$out/gpu-tests.xml" >"$out/gpu-tests.log" 2>&1 || rc=$?
if [ "$rc" = 124 ]; then
  echo "gpu.sh: the GPU tests ran past ${SLM_GPU_TESTS_S:-240} s and were stopped (see $out/gpu-tests.log)" | tee -a "$out/gpu-tests.log" >&2
elif [ "$rc" != 0 ]; then
  echo "gpu.sh: some GPU tests failed (see $out/gpu-tests.log)" >&2
fi
tail -n 3 "$out/gpu-tests.log" >&2
"$py" benchmarks/gpu.py --out "$out" --junit "$out/gpu-tests.xml" --deadline $((start + ${SLM_GPU_BUDGET_S:-360})) \
  "${check[@]}"
echo "gpu.sh: done in $(( $(date +%s) - start )) s: $out/gpu.json, $out/gpu.md" >&2
