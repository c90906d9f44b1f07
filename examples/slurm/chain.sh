#!/usr/bin/env bash
# Submit the training chain as dependent SLURM jobs: each starts only when the one before ended well
# (--dependency=afterok), and each survives preemption on its own (stage.sbatch requeues itself; a requeued job
# keeps its id, so the chain waits for it). Run from the directory that will hold the outputs.
#
#   bash examples/slurm/chain.sh RECIPE MIX CHAT_JSONL PAIRS_JSONL FACTS_YAML [sbatch options, e.g. --nodes 4]
#
# Prints the job ids; `squeue --me` shows them waiting on each other, `slm status runs/STAGE` where each one is.
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: chain.sh RECIPE MIX CHAT_JSONL PAIRS_JSONL FACTS_YAML [sbatch options]" >&2
  exit 2
fi
recipe=$1 mix=$2 chat=$3 pairs=$4 facts=$5
shift 5
opts=("$@")  # sbatch options for the training jobs (nodes, GPUs, time, partition ...)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
submit() {  # submit DEPENDENCY NAME SCRIPT ARGS...: prints the job id
  local dep=$1 name=$2
  shift 2
  sbatch --parsable ${dep:+--dependency=afterok:$dep} --job-name="slm-$name" ${opts[@]+"${opts[@]}"} "$@"
}
pre=$(submit "" pretrain "$here/stage.sbatch" pretrain --recipe "$recipe" --data "$mix" --out runs/pretrain)
cool=$(submit "$pre" cooldown "$here/stage.sbatch" cooldown --from runs/pretrain --data "$mix" --phase decay \
  --out runs/cooldown)
sft=$(submit "$cool" sft "$here/stage.sbatch" sft --model runs/cooldown --recipe "$recipe" --data "$chat" --out runs/sft)
dpo=$(submit "$sft" dpo "$here/stage.sbatch" dpo --model runs/sft --recipe "$recipe" --data "$pairs" --out runs/dpo)
# self-knowledge pairs need generation, not training: one task
gen=$(sbatch --parsable --dependency=afterok:"$dpo" --job-name=slm-selfknow-generate --ntasks=1 \
  --wrap "${SLM:-slm} selfknow generate --base runs/cooldown --chat runs/dpo --facts $facts --out selfknow")
sk=$(submit "$gen" selfknow "$here/stage.sbatch" selfknow train --model runs/dpo --data selfknow --recipe "$recipe" \
  --out runs/selfknow)
rel=$(sbatch --parsable --dependency=afterok:"$sk" --job-name=slm-release --ntasks=1 \
  --wrap "${SLM:-slm} quantize runs/selfknow --out release && ${SLM:-slm} eval runs/cooldown runs/selfknow \
release/selfknow-q4_k_m.gguf --suite slm-local --out eval && ${SLM:-slm} carbon . --out carbon")
echo "$pre $cool $sft $dpo $gen $sk $rel"
