#!/usr/bin/env bash
# The whole slm chain as a plain script to copy and edit: one line per stage, each stage's output path passed to the
# next by $(...) substitution (every stage prints only its output path on stdout). Assumes `slm` is on PATH
# (pip install 'slm[deploy,eval]', or scripts/setup.sh deploy,eval and .venv/bin on PATH).
#
#   bash examples/pipeline.sh [OUT_DIR] [RECIPE]      (defaults: pipeline-out, tiny)
#
# Change RECIPE (stablelm-2-1_6b, smollm2-135m, ...), the corpus, the chat data and the facts for a real run; on a
# cluster each training line goes into an sbatch script (examples/slurm/).
set -euo pipefail
out=${1:-pipeline-out}
recipe=${2:-tiny}
facts=${FACTS:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/facts.yaml}
mkdir -p "$out"
cd "$out"

corpus=$(slm tokenize corpus --out corpus)                               # your corpus: any .jsonl / .parquet / .txt
tok=$(slm tokenize train --corpus "$corpus/code/train.jsonl" --corpus "$corpus/prose/train.jsonl" --vocab-size 8192 --out tokenizer)
code=$(slm tokenize encode --tokenizer "$tok" "$corpus/code/train.jsonl" --out tokens/code)
prose=$(slm tokenize encode --tokenizer "$tok" "$corpus/prose/train.jsonl" --out tokens/prose)
valid=$(slm tokenize encode --tokenizer "$tok" "$corpus/code/valid.jsonl" "$corpus/prose/valid.jsonl" --out tokens/valid)
mix=$(slm mix "$recipe" --source code="$code" --source prose="$prose" --out mix)
base=$(slm pretrain --recipe "$recipe" --data "$mix" --valid "$valid" --out runs/pretrain)
base=$(slm cooldown --from "$base" --data "$mix" --phase decay --steps 30 --valid "$valid" --out runs/cooldown)
chat=$(slm chat-data --n 1000 --facts "$facts" --out chatdata)
sft=$(slm sft --model "$base" --recipe "$recipe" --data "$chat/chat/train.jsonl" --valid "$chat/chat/valid.jsonl" --out runs/sft)
dpo=$(slm dpo --model "$sft" --recipe "$recipe" --data "$chat/pairs/train.jsonl" --valid "$chat/pairs/valid.jsonl" --out runs/dpo)
pairs=$(slm selfknow generate --base "$base" --chat "$dpo" --facts "$facts" --n 200 --temperature 0.3 --top-p 0.9 --max-new-tokens 64 --out selfknow)
final=$(slm selfknow train --model "$dpo" --data "$pairs" --recipe "$recipe" --out runs/selfknow)
release=$(slm quantize "$final" --type f16,q8_0,q4_k_m --valid "$chat/chat/valid.jsonl" --out release)
bench=$(slm bench "$final" "$release"/*-q8_0.gguf "$release"/*-q4_k_m.gguf --prompt 128 --gen 32 --repeat 3 --out bench)
scores=$(slm eval "$base" "$final" "$release"/*-q4_k_m.gguf --suite slm-local --limit 40 --out eval)
bill=$(slm carbon . --out carbon)

slm info "$final"                                                         # where the final model came from
slm report . --out report.md                                              # losses, DPO, self-knowledge, quant, bench, eval, carbon
