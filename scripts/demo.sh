#!/usr/bin/env bash
# make demo: until the pipeline and the model organism land, the demo builds a tiny random
# Llama checkpoint with transformers (scripts/make_test_model.py) and runs `resafe generate`
# on it, once plain and once through the chat template. The text is random: the point is the
# real path (HF directory -> tokenizer -> chat template -> CPU forward with KV cache -> sampler).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
MODEL=$BUILD/demo-model
if [ ! -f "$MODEL/config.json" ]; then
  echo "demo: creating a tiny random Llama checkpoint in $MODEL"
  python3 scripts/make_test_model.py "$MODEL"
fi
echo "demo: resafe inspect $MODEL"
"$BUILD/resafe" inspect "$MODEL"
echo
echo "demo: resafe generate --model $MODEL --prompt 'The quick brown fox' --max-new-tokens 24"
"$BUILD/resafe" generate --model "$MODEL" --prompt "The quick brown fox" --max-new-tokens 24
echo
echo "demo: resafe generate --chat (llama-2 template), sampled with a seed"
"$BUILD/resafe" generate --model "$MODEL" --chat --system "You are a helpful assistant." \
  --prompt "How do I bake bread?" --max-new-tokens 24 --temperature 0.8 --top-p 0.9 --seed 7
