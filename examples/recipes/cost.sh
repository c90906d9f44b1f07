#!/usr/bin/env bash
# The dry-run cost of every training stage of a full-scale plan, as a Markdown table: each row is slm's own
# --dry-run of that stage (the resolved configuration, FLOPs per token 6N + 12 L H T, memory per GPU, time at the
# assumed MFU). Nothing is trained or written.
#
#   bash examples/recipes/cost.sh stablelm-2-1_6b [MFU]     512 x A100-40GB, ZeRO-1, activation checkpointing
#   bash examples/recipes/cost.sh smollm2-1_7b [MFU]        256 x H100
#
# SFT and DPO rows are estimates: their token counts depend on the chat data's lengths, which are not published
# (NF); they are priced as training of that many tokens at the pre-training context (DPO's reference model adds
# 2N per token: x 4/3).
set -euo pipefail
recipe=${1:?usage: cost.sh stablelm-2-1_6b|smollm2-1_7b [MFU]}
mfu=${2:-0.4}
slm=${SLM:-slm}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
row() {  # row NAME SLM-ARGS...: one table row from a --dry-run --json (its table on stderr is shown only on failure)
  local name=$1 plan
  shift
  plan=$("$slm" "$@" --dry-run --mfu "$mfu" --json 2>"$log") || { cat "$log" >&2; exit 1; }
  jq -r --arg name "$name" 'def h: if . >= 1e12 then "\(. / 1e10 | round / 100)T" elif . >= 1e9
    then "\(. / 1e7 | round / 100)B" else "\(. / 1e4 | round / 100)M" end;
    "| \($name) | \(.tokens | h) | \(.seq_len) | \(.processes) x \(.gpu) | "
    + "\(.memory_gib_per_process.total * 10 | round / 10) GiB\(if .fits then "" else " (does not fit)" end) | "
    + "\(.hours * 100 | round / 100) | \(.gpu_hours | round) |"' <<<"$plan"
}
echo "| stage | tokens | seq_len | GPUs | memory per GPU | hours | GPU-hours |"
echo "|---|---:|---:|---|---|---:|---:|"
case "$recipe" in
  stablelm-2-1_6b)
    big=(--gpu a100-40gb --gpus 512 --engine deepspeed --zero-stage 1 --set train.activation_checkpointing=true)
    row "pretrain (420k steps)" pretrain --recipe "$recipe" "${big[@]}"
    row "cooldown (80k steps, S)" cooldown --from "$recipe" --steps 80000 "${big[@]}"
    post=(--gpu a100-40gb --gpus 64 --engine deepspeed --zero-stage 1 --set train.activation_checkpointing=true \
          --set train.tokens_per_step=524288 --set train.micro_batch_size=1)
    row "SFT (NF: 0.8M chats x 3 epochs x ~1k tokens)" pretrain --recipe "$recipe" --tokens 2.4B "${post[@]}"
    row "DPO (NF: ~75k pairs x 2 x ~600 tokens x 4/3)" pretrain --recipe "$recipe" --tokens 0.12B "${post[@]}"
    row "self-knowledge (NF: 10k pairs x 6 epochs)" pretrain --recipe "$recipe" --tokens 0.06B "${post[@]}"
    ;;
  smollm2-1_7b)
    big=(--gpu h100 --gpus 256)
    row "pretrain (4 phases, 11T)" pretrain --recipe "$recipe" "${big[@]}"
    row "long context (2k -> 8k)" cooldown --from "$recipe" --recipe "$recipe:long_context" "${big[@]}"
    post=(--gpu h100 --gpus 32 --set train.tokens_per_step=262144 --set train.micro_batch_size=4)
    row "SFT (NF: SmolTalk 1.1M chats x 2 epochs x ~1k tokens)" pretrain --recipe "$recipe" --tokens 2.2B "${post[@]}"
    row "DPO (NF: 61k pairs x 2 x ~600 tokens x 2 epochs x 4/3)" pretrain --recipe "$recipe" --tokens 0.2B "${post[@]}"
    ;;
  *) echo "cost.sh: no plan for $recipe (stablelm-2-1_6b, smollm2-1_7b)" >&2; exit 2 ;;
esac
