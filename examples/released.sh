#!/usr/bin/env bash
# Fine-tune a released model as its makers did, then release it: sft -> dpo -> quantize -> bench -> eval -> report.
# MODEL_DIR is a checkpoint directory as the hub lays it out, e.g.
#   huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir SmolLM2-135M-Instruct
# (config.json, safetensors weights, tokenizer.json, its chat template); StableLM 2 (stabilityai/stablelm-2-1_6b)
# works the same way. The model's own tokenizer and chat template are used throughout.
#
#   bash examples/released.sh MODEL_DIR [OUT_DIR]       (default: ./released-out)
#
# On a CPU the runs are short: STEPS optimizer steps (default 20) on slm's local chat data, sequences of
# MAX_LENGTH tokens (default 512); TYPES are the GGUF files made (default f16,q8_0,q4_k_m; q8_0 is scored), N the
# conversations made, EVAL_LIMIT the examples per task. On GPUs raise STEPS (or drop --steps: the recipe's epochs),
# and bring your own data (--data FILE.jsonl).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: bash examples/released.sh MODEL_DIR [OUT_DIR]" >&2; exit 2; }
model=$(cd "$1" && pwd)
out=${2:-released-out}
steps=${STEPS:-20}
limit=${EVAL_LIMIT:-40}
max_length=${MAX_LENGTH:-512}
types=${TYPES:-f16,q8_0,q4_k_m}
bash "$root/scripts/setup.sh" deploy,eval
export PATH="${SLM_VENV:-$root/.venv}/bin:$PATH"
mkdir -p "$out"
cd "$out"

# 1. What it is: architecture, parameters, dtype, context, tokenizer, chat template, hashes.
slm info "$model" >&2

# 2. Chat and preference data made here (held-out splits too); your own: {"messages": [...]} / {"prompt", ...}.
slm chat-data --out chatdata --n "${N:-400}"

# 3. Supervised fine-tuning with the model's own chat template (loss on the assistant's tokens only).
slm sft --model "$model" --data chatdata/chat/train.jsonl --valid chatdata/chat/valid.jsonl --out runs/sft \
  --steps "$steps" --set sft.max_length="$max_length" --set sft.batch_size=8 --set sft.micro_batch_size=2 --set sft.lr=2e-5

# 4. DPO from there (the reference is the sft checkpoint; its log-probabilities are computed once).
slm dpo --model runs/sft --data chatdata/pairs/train.jsonl --valid chatdata/pairs/valid.jsonl --out runs/dpo \
  --steps "$steps" --set dpo.max_length=$((max_length / 2)) --set dpo.max_prompt_length=$((max_length / 4)) \
  --set dpo.batch_size=8 \
  --set dpo.micro_batch_size=2

# 5. The release: GGUF files llama.cpp runs (with the pre-tokenizer llama.cpp knows for this tokenizer), scored
#    against the fp32 model on held-out conversations.
slm quantize runs/dpo --type "$types" --valid chatdata/chat/valid.jsonl --out release

# 6. Speed of the released model, the fine-tune's GGUF files; then all of them scored side by side.
slm bench "$model" release/*.gguf --prompt 64 --gen 16 --repeat 2 --out bench
slm eval "$model" runs/dpo release/*-q8_0.gguf --suite slm-local --limit "$limit" --out eval

# 7. One summary: training, DPO, quantization, bench, eval (also in report.md).
slm report . --out report.md
echo "released: done; every stage's output is kept in $(pwd)" >&2
