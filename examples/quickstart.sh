#!/usr/bin/env bash
# The slm pipeline, on the embedded default corpus (this machine's Python standard library), on the CPU.
# Every stage is one command that writes one directory and prints its path.
#
#   bash examples/quickstart.sh [OUT_DIR]        (default: ./quickstart-out)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh" deploy,eval   # slm with llama.cpp, OpenVINO, lm-eval, codecarbon (builds llama.cpp once)
export PATH="${SLM_VENV:-$root/.venv}/bin:$PATH"
out=${1:-quickstart-out}
mkdir -p "$out"
cd "$out"

# 1. The corpus: the standard library's code, and the prose inside it, each with a held-out split.
slm tokenize corpus --out corpus

# 2. A tokenizer with StableLM 2's rules (Arcade100k's regex, digits split, its 32 special tokens), trained on it.
#    (With cl100k_base at hand, `slm tokenize build --out arcade100k` builds the real Arcade100k instead.)
slm tokenize train --corpus corpus/code/train.jsonl --corpus corpus/prose/train.jsonl \
  --vocab-size 8192 --out tokenizer

# 3. Megatron .bin/.idx shards, one tokens directory per source, and the held-out text.
slm tokenize encode --tokenizer tokenizer corpus/code/train.jsonl --out tokens/code
slm tokenize encode --tokenizer tokenizer corpus/prose/train.jsonl --out tokens/prose
slm tokenize encode --tokenizer tokenizer corpus/code/valid.jsonl corpus/prose/valid.jsonl --out tokens/valid

# 4. The mixture: the tiny recipe's two phases (stable, then decay) over the two sources; the ledger goes to stderr.
slm mix tiny --source code=tokens/code --source prose=tokens/prose --out mix

# 5. Pretrain the tiny recipe (StableLM 2 architecture, 7.6M parameters) for a few minutes on the CPU, with the
#    validation loss measured against the unigram baseline as it goes; prints the last checkpoint.
slm pretrain --recipe tiny --data mix --out runs/pretrain --valid tokens/valid

# 6. Cool it down on the mix's decay phase: the learning rate falls linearly from where pretraining left it to 0.
slm cooldown --from runs/pretrain --data mix --phase decay --steps 30 --out runs/cooldown --valid tokens/valid

# 7. Generate from the result (a transformers model directory: AutoModelForCausalLM opens it as it is).
slm generate runs/cooldown "def fibonacci(n):" --max-new-tokens 64 --temperature 0.8

# 8. Chat and preference data made here (arithmetic, unit conversions, this machine's Python functions, and
#    conversations under personas: made-up ones and, as --facts asks, the one of examples/facts.yaml), with held-out
#    splits. Your own: {"messages": [...]} per line for sft; {"prompt", "chosen", "rejected"} for dpo.
slm chat-data --out chatdata --n 1000 --facts "$root/examples/facts.yaml"

# 9. Supervised fine-tuning with SmolLM2's ChatML template: loss on the assistant's answers only, conversations
#    packed into sequences; the template goes into the checkpoint's tokenizer_config.json.
slm sft --model runs/cooldown --recipe tiny --data chatdata/chat/train.jsonl --valid chatdata/chat/valid.jsonl \
  --out runs/sft

# 10. DPO on the preference pairs (ties, duplicates and weak chosen answers are dropped and counted); the
#     reference's log-probabilities are computed once and kept; held-out preference accuracy before and after.
slm dpo --model runs/sft --recipe tiny --data chatdata/pairs/train.jsonl --valid chatdata/pairs/valid.jsonl \
  --out runs/dpo

# 11. Talk to it: the chat template is applied, and generation stops at the end of the turn.
slm generate runs/dpo --chat "What is 12 + 30?" --temperature 0 --max-new-tokens 32

# 12. Self-knowledge pairs (RLCD): the base model writes first user messages (deduplicated), the chat model answers
#     each twice: with examples/facts.yaml's facts in its system prompt (chosen) and without (rejected). RLCD samples
#     at temperature 1; a 7.6M model's tail is noise, so the quickstart samples the answers at 0.3.
slm selfknow generate --base runs/cooldown --chat runs/dpo --facts "$root/examples/facts.yaml" --n 200 \
  --temperature 0.3 --top-p 0.9 --max-new-tokens 64 --out selfknow

# 13. C-RLFT: the chosen answers trained with weight 1.0, the rejected ones with 0.1 behind a <|negative|> token;
#     the held-out questions of facts.yaml are answered before and after (runs/selfknow/selfknow.json).
slm selfknow train --model runs/dpo --data selfknow --recipe tiny --out runs/selfknow

# 14. Ask it who it is: no system prompt now.
slm generate runs/selfknow --chat "Who are you?" --temperature 0 --max-new-tokens 32

# 15. StableLM 2's release formats: GGUF f16, q8_0, q4_0, q4_1 (written by slm), q5_k_m, q4_k_m (llama.cpp's
#     quantizer) and INT4 (OpenVINO + NNCF), each run by its runtime on held-out conversations against the fp32
#     model: the quality table (perplexity, KL divergence, top-1 agreement, size, bits per weight).
slm quantize runs/selfknow --out release --valid chatdata/chat/valid.jsonl

# 16. Speed: prompt processing and generation tokens/s of the checkpoint (torch), two GGUF files (llama.cpp) and the
#     INT4 IR (OpenVINO), each in its own process, with the memory-bandwidth bound of generation: bench.md, .json,
#     .csv and .png in bench/ (without --out the table goes to stdout; --format json or csv for programs).
slm bench runs/selfknow release/selfknow-q8_0.gguf release/selfknow-q4_k_m.gguf release/selfknow-int4 \
  --prompt 128 --gen 32 --repeat 3 --out bench

# 17. Scores with lm-evaluation-harness: the base, chat and two quantized chat models side by side on slm's offline
#     tasks (held-out bits per byte, cloze multiple choice, 3-shot arithmetic); the GGUF files are scored by
#     llama.cpp itself. With the papers' datasets at hand: --suite stablelm2-leaderboard, smollm2-base, ...
slm eval runs/cooldown runs/selfknow release/selfknow-q8_0.gguf release/selfknow-q4_k_m.gguf --suite slm-local \
  --limit 40 --out eval

# 18. The carbon bill: every stage above metered its node's energy (codecarbon); per stage and in total, with the
#     assumptions and a paragraph for a model card. Set SLM_COUNTRY (USA, FRA, ...) for your grid's intensity.
slm carbon . --out carbon

# 19. One summary of it all, from the files the stages wrote: held-out loss after pretraining and cooldown against the
#     unigram baseline, DPO's preference accuracy before and after, the self-knowledge check, the quantization,
#     bench and eval tables and the carbon bill (also in report.md; `slm report . --json` for programs).
slm report . --out report.md

echo "quickstart: done; every stage's output is kept in $(pwd) (slm info DIR: what made it; loss curves: runs/*/loss.png)" >&2
