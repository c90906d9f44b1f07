#!/usr/bin/env bash
# SmolLM2-1.7B at full scale, from public data to a quantized, evaluated chat model: the commands in order.
# The costs of the training stages (slm's --dry-run, 256 x H100 at 40% MFU) are in examples/recipes/README.md;
# `bash examples/recipes/cost.sh smollm2-1_7b` prints them again. Each training line runs on a cluster through
# examples/slurm/stage.sbatch (SBATCH below), which survives preemption and requeues itself.
#
#   WORK=/scratch/smollm2 NODES=32 bash examples/recipes/smollm2-1_7b/run.sh
#
# Downloads need `huggingface-cli` (huggingface_hub) and a token for gated sets; 11T tokens of text is tens of TB.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=${WORK:-smollm2-1_7b}
nodes=${NODES:-32}                  # x 8 GPUs = 256, as the release
run() { sbatch --parsable --wait --nodes "$nodes" "$here/../slurm/stage.sbatch" "$@"; }   # one training stage
mkdir -p "$work" && cd "$work"

# 1. Data: each source's files from the hub (parquet / jsonl), then one tokens directory per source.
get() { huggingface-cli download "$1" --repo-type dataset --local-dir "data/$2" ${3:+--include "$3"}; }
get HuggingFaceFW/fineweb-edu fineweb_edu 'data/*'
get mlfoundations/dclm-baseline-1.0 dclm
get bigcode/starcoderdata starcoderdata
get HuggingFaceTB/stack-edu stack_edu               # file ids: fetch the contents from Software Heritage first
get open-web-math/open-web-math openwebmath
get Infi-MM/InfiMM-WebMath-40B infimm_webmath
get HuggingFaceTB/finemath finemath 'finemath-4plus/*'
get HuggingFaceTB/finemath infiwebmath 'infiwebmath-3plus/*'
get HuggingFaceTB/smollm-corpus cosmopedia_v2 'cosmopedia-v2/*'
get allenai/dolma dolma_books 'data/v1_7/books*'

# 2. Tokenizer: SmolLM2's rules (GPT-2 regex, digits split, 17 special tokens), 49,152 ids, trained on a sample.
tok=$(slm tokenize train --corpus 'data/fineweb_edu/data/CC-MAIN-2024-10/*.parquet' --corpus 'data/cosmopedia_v2/*.parquet' \
  --vocab-size 49152 --rules smollm --out tokenizer)
for src in data/*; do
  key=text; [ "$(basename "$src")" = starcoderdata ] && key=content
  slm tokenize encode --tokenizer "$tok" "$src" --text-key "$key" --workers 64 --out "tokens/$(basename "$src")" >/dev/null
done

# 3. The four-phase mix (the smollm2-1_7b recipe's, with the datasets named) and pre-training: 11T tokens.
mix=$(slm mix "$here/pretrain.yaml" --source-root tokens --out mix)
run pretrain --recipe smollm2-1_7b --data "$mix" --out runs/pretrain

# 4. Context extension 2k -> 8k: from the decay checkpoint 75B tokens (35,763 steps) before the end, the save
#    nearest it being step 5,204,000 (save_every 2000; keep it: copy it aside as the run passes, or raise
#    train.keep), theta 130k, 40% documents of 8k+ tokens, the learning rate continuing linearly to 0.
mix8k=$(slm mix "$here/long-context.yaml" --source-root tokens --out mix-8k)
run cooldown --from runs/pretrain/checkpoints/step-05204000 --data "$mix8k" --recipe smollm2-1_7b:long_context \
  --out runs/long-context

# 5. Post-training: SFT on SmolTalk (2 epochs, ChatML), DPO on UltraFeedback (beta 0.5, 2 epochs).
get HuggingFaceTB/smoltalk smoltalk 'data/all/*'
get HuggingFaceH4/ultrafeedback_binarized ultrafeedback 'data/*'
run sft --model runs/long-context --recipe smollm2-1_7b --data data/smoltalk/data/all/train-*.parquet \
  --valid data/smoltalk/data/all/test-*.parquet --out runs/sft
run dpo --model runs/sft --recipe smollm2-1_7b --data data/ultrafeedback/data/train_prefs-*.parquet \
  --valid data/ultrafeedback/data/test_prefs-*.parquet --out runs/dpo

# 6. Release, measure, account.
release=$(slm quantize runs/dpo --type f16,q8_0,q4_k_m --out release)
slm bench runs/dpo "$release"/*-q4_k_m.gguf --out bench >/dev/null
slm eval runs/long-context --suite smollm2-base --out eval-base >/dev/null
slm eval runs/dpo "$release"/*-q4_k_m.gguf --suite smollm2-instruct --out eval-instruct >/dev/null
slm carbon tokens runs release bench eval-base eval-instruct --region USA --pue 1.1 --out carbon
