#!/usr/bin/env bash
# StableLM 2 1.6B at full scale, from public data to Zephyr-style chat model that knows who it is, quantized and
# evaluated: the commands in order. The costs of the training stages (slm's --dry-run, 512 x A100-40GB, ZeRO-1,
# activation checkpointing, 40% MFU) are in examples/recipes/README.md; `bash examples/recipes/cost.sh
# stablelm-2-1_6b` prints them again. Each training line runs through examples/slurm/stage.sbatch (SBATCH below).
#
#   WORK=/scratch/stablelm2 NODES=64 bash examples/recipes/stablelm-2-1_6b/run.sh
#
# Downloads need `huggingface-cli` (huggingface_hub). Sources marked NF in pretrain.yaml have no public copy we could
# identify (FanFics, the restructured instruction data) and AMPS comes from its project page: provide them as
# .jsonl / .parquet under data/NAME, or drop them from the mix.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=${WORK:-stablelm-2-1_6b}
nodes=${NODES:-64}                  # x 8 GPUs = 512 A100-40GB
run() { sbatch --parsable --wait --nodes "$nodes" "$here/../slurm/stage.sbatch" "$@"; }   # one training stage
mkdir -p "$work" && cd "$work"

# 1. Data: the files of each source from the hub, then one tokens directory per source.
get() { huggingface-cli download "$1" --repo-type dataset --local-dir "data/$2" ${3:+--include "$3"}; }
get tiiuae/falcon-refinedweb refinedweb
get togethercomputer/RedPajama-Data-1T redpajama 'c4/*'
get togethercomputer/RedPajama-Data-1T arxiv 'arxiv/*'
get togethercomputer/RedPajama-Data-1T stackexchange 'stackexchange/*'
get togethercomputer/RedPajama-Data-1T wikipedia 'wikipedia/*'
get monology/pile-uncopyrighted pile_no_books3          # PubMed, PhilPapers, HackerNews, EuroParl, FreeLaw, DM
get bigcode/starcoderdata starcoder                      # Mathematics are its subsets (meta.pile_set_name): split
for lang in de es fr it nl pt; do get uonlp/CulturaX "culturax_$lang" "$lang/*"; done   # them into data/NAME
get allenai/peS2o s2orc
get lucadiliello/bookcorpusopen bookcorpusopen
get deepmind/pg19 pg19
get pile-of-law/pile-of-law pileoflaw
get open-web-math/open-web-math openwebmath

# 2. Tokenizer: Arcade100k (cl100k_base's ranks, digits split, 32 special tokens at 100257-100288).
tok=$(slm tokenize build --out arcade100k)
for src in data/*; do
  key=text; [ "$(basename "$src")" = starcoder ] && key=content
  slm tokenize encode --tokenizer "$tok" "$src" --text-key "$key" --workers 64 --out "tokens/$(basename "$src")" >/dev/null
done

# 3. Pre-training to the published cooldown start (420k steps of 2^23 tokens, the hybrid schedule), then the
#    cooldown: lr 2.529e-4 -> 0 over about 80k steps (S) on a mix of the higher-quality sources (NF: its weights).
mix=$(slm mix "$here/pretrain.yaml" --source-root tokens --out mix)
run pretrain --recipe stablelm-2-1_6b --data "$mix" --engine deepspeed --zero-stage 1 \
  --set train.activation_checkpointing=true --out runs/pretrain
cool=$(slm mix "$here/cooldown.yaml" --source-root tokens --out mix-cooldown)
run cooldown --from runs/pretrain --data "$cool" --steps 80000 --engine deepspeed --zero-stage 1 \
  --set train.activation_checkpointing=true --out runs/cooldown

# 4. Post-training: SFT (Zephyr template, conversations over 8 turns dropped, 3 epochs), DPO on UltraFeedback and
#    Intel Orca pairs (chosen score >= 8), then self-knowledge: RLCD pairs and C-RLFT (6 epochs).
get HuggingFaceH4/ultrachat_200k ultrachat 'data/train_sft-*'
get WizardLMTeam/WizardLM_evol_instruct_V2_196k wizardlm
get Open-Orca/SlimOrca slimorca
get anon8231489123/ShareGPT_Vicuna_unfiltered sharegpt
get LDJnr/Capybara capybara
get HuggingFaceH4/deita-10k-v0-sft deita 'data/train_sft-*'
get meta-math/MetaMathQA metamathqa      # MetaMathQA's query/response fields: turn them into {"messages": ...} first
get HuggingFaceH4/ultrafeedback_binarized ultrafeedback 'data/train_prefs-*'
get Intel/orca_dpo_pairs orca_pairs
sft_data=(); for d in ultrachat wizardlm slimorca sharegpt capybara deita metamathqa; do sft_data+=(--data "data/$d"); done
run sft --model runs/cooldown --recipe stablelm-2-1_6b "${sft_data[@]}" --out runs/sft
run dpo --model runs/sft --recipe stablelm-2-1_6b --data data/ultrafeedback --data data/orca_pairs --out runs/dpo
pairs=$(slm selfknow generate --base runs/cooldown --chat runs/dpo --facts "$here/../facts.yaml" --n 10000 \
  --out selfknow)
run selfknow train --model runs/dpo --data "$pairs" --recipe stablelm-2-1_6b --out runs/selfknow

# 5. Release as the card's GGUF and OpenVINO files, measure, account.
release=$(slm quantize runs/selfknow --type f16,q4_0,q4_1,q5_k_m,int4 --out release)
slm bench runs/selfknow "$release"/*-q4_0.gguf --out bench >/dev/null
slm eval runs/cooldown --suite stablelm2-leaderboard --out eval-base >/dev/null
slm eval runs/selfknow --suite stablelm2-leaderboard --mt-bench "$here/../mt-bench.jsonl" --judge "${JUDGE:?set JUDGE: a judge checkpoint, GGUF or OpenAI-compatible URL}" \
  --out eval-chat >/dev/null
slm carbon tokens runs release bench eval-base eval-chat --region USA --pue 1.2 --out carbon
