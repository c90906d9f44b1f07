#!/usr/bin/env bash
# The prepared GPU check: slm's GPU path tested, then measured, on one CUDA device, in under 8 minutes.
#
#   bash benchmarks/gpu.sh [OUT_DIR]          (default: gpu-check; $OUT when set, as on a lent device machine)
#
# 1. `pytest -m gpu` (tests/test_gpu.py): FlexAttention document masking against masked SDPA (forward and
#    backward, both families), bf16 autocast against fp32, FSDP with its bf16 policy on one process, the compiled
#    training step, fused AdamW, the static-cache decoder, a bit-exact resume in deterministic mode.
# 2. benchmarks/gpu.py: MFU, tokens/s and peak memory of the training step at the smollm2-360m and stablelm-2-1_6b
#    shapes (largest micro-batch that fits, activation checkpointing off and on, then compiled), the dry-run
#    planner's memory beside the measured peak, deterministic mode's cost, decode tokens/s at the 135M shape.
# Writes OUT_DIR/gpu.json and OUT_DIR/gpu.md (and the tests' junit XML and log). SLM_GPU_CHECK=cpu runs the same
# on the CPU at a tiny shape, to check the script where there is no GPU (it measures nothing).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py="${SLM_VENV:-$root/.venv}/bin/python"
[ -x "$py" ] || { bash "$root/scripts/setup.sh" test >&2; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
check=()
if [ "${SLM_GPU_CHECK:-cuda}" = cpu ]; then
  export SLM_GPU_TESTS_DEVICE=cpu
  check=(--check)
else
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device here (SLM_GPU_CHECK=cpu checks the script on the CPU)')"
fi
cd "$root"
start=$(date +%s)
# The tests first: a failure is reported in gpu.md, and the measurements still run.
"$py" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q --junitxml="$out/gpu-tests.xml" \
  >"$out/gpu-tests.log" 2>&1 || echo "gpu.sh: some GPU tests failed (see $out/gpu-tests.log)" >&2
tail -n 3 "$out/gpu-tests.log" >&2
"$py" benchmarks/gpu.py --out "$out" --junit "$out/gpu-tests.xml" "${check[@]}"
echo "gpu.sh: done in $(( $(date +%s) - start )) s: $out/gpu.json, $out/gpu.md" >&2
